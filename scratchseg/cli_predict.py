"""``scratchseg predict`` and ``scratchseg export``: colour masks and overlays for image files and
folders (volumes: label volumes and slice pictures), through scratchseg's network or an exported ONNX graph,
and the export itself. The parsers are in ``cli.py``; ``main`` there maps the command names to these."""

from __future__ import annotations

import os

__all__ = ["cmd_predict", "cmd_export", "inference_options", "crf_options"]


def inference_options(args):
    from .inference import options_from_text

    return options_from_text(args.tile, args.overlap, args.flip, args.scales)


def crf_options(args):
    return {} if args.crf else None  # dense_crf's defaults (DeepLab's)


def cmd_predict(args):
    from .data.folder import read_image
    from .training import load_model, parse_resize, predict_array, resolve_checkpoint
    from .viz import colorize, overlay, save_png

    inference = inference_options(args)
    if args.onnx:
        if inference or args.crf:
            raise ValueError("--tile, --overlap, --flip, --scales and --crf run scratchseg's own network, not --onnx")
        return _predict_onnx(args)
    paths = list(args.paths)
    checkpoint = args.checkpoint_option or paths.pop(0)
    if not paths:
        raise ValueError("predict needs image files or folders after the checkpoint, "
                         "e.g. `scratchseg predict runs/latest photo.png`")
    path = resolve_checkpoint(checkpoint)
    model, meta = load_model(path)
    if (meta.get("task_spec") or {}).get("kind") in ("shapes3d", "volumes"):  # trained on volumes
        if inference or args.crf:
            raise ValueError("--tile, --overlap, --flip, --scales and --crf apply to images; volumes are predicted "
                             "whole")
        return _predict_volumes(model, meta, paths, args.out)
    files = _image_files(paths)
    colors = [tuple(c) for c in meta["colors"]]
    os.makedirs(args.out, exist_ok=True)
    for f in files:
        image = read_image(f, meta["in_channels"])
        pred = predict_array(model, image, meta["mean"], meta["std"], parse_resize(meta.get("resize")), inference,
                             crf_options(args))
        stem = os.path.splitext(os.path.basename(f))[0]
        colour = colorize(pred, colors)
        save_png(os.path.join(args.out, f"{stem}_pred.png"), colour)
        save_png(os.path.join(args.out, f"{stem}_overlay.png"), overlay(image, colour))
        save_png(os.path.join(args.out, f"{stem}_mask.png"), pred.astype("uint8"))
        counts = {meta["class_names"][k]: int((pred == k).sum()) for k in range(len(colors)) if (pred == k).any()}
        print(f"{f}: " + ", ".join(f"{n} {100 * c / pred.size:.1f}%" for n, c in counts.items()))
    print(f"wrote {len(files)} x (_pred.png colour mask, _overlay.png, _mask.png class indices) to {args.out}")
    return 0


def _predict_volumes(model, meta, paths, out):
    """Predict volume files: ``<stem>_pred.<the input's format>`` and ``<stem>_slices.png`` for each."""
    from .data.folder import split_extension
    from .data.volumes import VOLUME_EXTENSIONS, read_volume, write_volume
    from .training import parse_resize, predict_array
    from .viz import save_png, volume_panel

    files = _image_files(paths, VOLUME_EXTENSIONS, "volumes")
    colors = [tuple(c) for c in meta["colors"]]
    for f in files:
        volume = read_volume(f, meta["in_channels"])
        pred = predict_array(model, volume, meta["mean"], meta["std"], parse_resize(meta.get("resize")))
        stem, ext = split_extension(os.path.basename(f), VOLUME_EXTENSIONS)
        write_volume(os.path.join(out, f"{stem}_pred{ext}"), pred, like=f)
        save_png(os.path.join(out, f"{stem}_slices.png"), volume_panel(volume, pred, colors))
        counts = {meta["class_names"][k]: int((pred == k).sum()) for k in range(len(colors)) if (pred == k).any()}
        print(f"{f}: " + ", ".join(f"{n} {100 * c / pred.size:.1f}%" for n, c in counts.items()))
    print(f"wrote {len(files)} x (_pred volume in the input's format, _slices.png) to {out}")
    return 0


def _image_files(paths, extensions=None, what="images"):
    from .data.folder import IMAGE_EXTENSIONS, split_extension
    from .data.task import DataError, natural_key

    extensions = extensions or IMAGE_EXTENSIONS
    files = []
    for item in paths:
        if os.path.isdir(item):
            found = [os.path.join(item, f) for f in sorted(os.listdir(item), key=natural_key)
                     if split_extension(f, extensions)[1]]
            if not found:
                raise DataError(f"folder {item} holds no {what} ({', '.join(extensions)})")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DataError(f"input {item} does not exist")
    return files


def _predict_onnx(args):
    import numpy

    from .onnx.runtime import load, predict_images

    if args.checkpoint_option:
        raise ValueError("give either --onnx MODEL.onnx or --checkpoint, not both")
    files = _image_files(args.paths)
    try:
        model = load(args.onnx)
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    names = model.meta.get("class_names") or [str(k) for k in range(model.meta.get("num_classes", 0))]
    for f, mask in predict_images(model, files, args.out):
        counts = {names[k] if k < len(names) else str(k): int((mask == k).sum()) for k in numpy.unique(mask)}
        print(f"{f}: " + ", ".join(f"{n} {100 * c / mask.size:.1f}%" for n, c in counts.items()))
    print(f"wrote {len(files)} x (_pred.png colour mask, _overlay.png, _mask.png class indices) to {args.out} "
          f"with ONNX Runtime ({args.onnx})")
    return 0


def cmd_export(args):
    import numpy

    from .data.transforms import parse_size
    from .training import load_model, resolve_checkpoint

    try:
        from .onnx import export
    except ImportError as exc:
        raise ValueError(str(exc)) from None

    path = resolve_checkpoint(args.checkpoint)
    model, meta = load_model(path)
    size = args.size or "100x132"
    h, w = parse_size(size)
    x = numpy.random.default_rng(0).standard_normal((1, meta["in_channels"], h, w)).astype(numpy.float32)
    info = {k: meta[k] for k in ("mean", "std", "class_names", "colors", "resize", "model_name", "model_options")
            if meta.get(k) is not None}
    info["colors"] = [list(c) for c in info.get("colors", [])]
    export(model, x, args.output, opset=args.opset, dynamic_size=not args.static_size, metadata=info)
    print(f"wrote {args.output} ({meta['model_name']}, traced at {h}x{w}, opset {args.opset}) from {path}")
    return 0

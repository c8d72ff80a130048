"""The ``scratchseg`` command (also ``python -m scratchseg``).

    scratchseg train                      # small U-Net on the synthetic shapes, into runs/
    scratchseg train --data folder:DATA --ignore-index 11 --resize 0.5 --crop 128 --epochs 20
    scratchseg train --resume runs/latest # continue a stopped run exactly
    scratchseg eval runs/latest --split test
    scratchseg predict runs/latest photo.png more/ --out predictions/
    scratchseg train --data shapes3d --model unet3d   # volumes: a 3-D U-Net on synthetic volumes
    scratchseg predict runs/latest scan.nii.gz        # -> scan_pred.nii.gz and scan_slices.png
    scratchseg models | datasets | gradcheck [--backend cupy]
    scratchseg experiment --list          # the lessons as measured experiments
    scratchseg experiment fc-vs-fcn --quick

Every subcommand takes ``--backend numpy|cupy``, ``--kernels numba|numpy``
and ``--seed``. Problems with the user's input (a missing folder, a bad mask
value, a damaged checkpoint) print one ``error:`` line and exit with status 2;
Ctrl-C during training saves ``last.npz`` and exits with 130; a NaN loss
exits with 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_predict import cmd_export, cmd_predict, crf_options, inference_options

__all__ = ["main", "build_parser"]


def _parse_options(items):
    """``["base=8", "up_mode=bilinear"]`` -> ``{"base": 8, "up_mode": "bilinear"}`` (numbers, booleans parsed)."""
    out = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"model option {part!r} is not key=value (e.g. --model-option base=16)")
            value = value.strip()
            low = value.lower()
            if low in ("true", "false"):
                parsed = low == "true"
            elif low == "none":
                parsed = None
            else:
                try:
                    parsed = int(value)
                except ValueError:
                    try:
                        parsed = float(value)
                    except ValueError:
                        parsed = value
            out[key.strip()] = parsed
    return out


def _floats(text, what, count=None):
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise ValueError(f"{what} needs {count} numbers, got {text!r}")
    return values


def _common(p):
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: numpy, or $SCRATCHSEG_BACKEND)")
    p.add_argument("--kernels", choices=["numba", "numpy"], default=None,
                   help="CPU kernels: compiled Numba (default) or the pure-NumPy reference")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")


def _inference_args(p):
    """eval's and predict's --tile, --overlap, --flip and --scales (``scratchseg.inference.predict``)."""
    p.add_argument("--tile", metavar="N|HxW", help="predict in overlapping tiles of this input size: memory bounded "
                   "by the tile, not the image (the valid U-Net: the paper's overlap-tile, borders mirrored)")
    p.add_argument("--overlap", metavar="N|HxW", help="least overlap of neighbouring tiles (default a quarter of "
                   "the tile; 0 for the valid U-Net, whose tiles carry their own context)")
    p.add_argument("--flip", action="store_true", help="average with the prediction of the horizontally flipped image")
    p.add_argument("--scales", metavar="S,S,...", help="average the predictions of the image resized by these "
                   "factors, e.g. 0.5,1,1.5 (DeepLab's multi-scale evaluation)")
    p.add_argument("--crf", action="store_true", help="refine the probabilities with the dense CRF (DeepLab's "
                   "post-processing, scratchseg.crf.dense_crf with its defaults)")


def build_parser():
    parser = argparse.ArgumentParser(prog="scratchseg", description="Semantic segmentation from scratch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (no arguments: small U-Net on shapes)")
    _common(t)
    t.add_argument("--data", default="shapes", help="shapes[:key=value,...] | cells[:key=value,...] | folder:PATH | "
                   "voc:PATH | shapes3d[:key=value,...] | volumes:PATH")
    t.add_argument("--model", default=None, help="model name (see `scratchseg models`); default unet "
                   "(unet3d for volumes)")
    t.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="model option, repeatable")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    t.add_argument("--lr", type=float)
    t.add_argument("--momentum", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=["poly", "step", "constant"])
    t.add_argument("--power", type=float, help="poly schedule power (0.9)")
    t.add_argument("--step-size", type=int, help="epochs between decays for --schedule step")
    t.add_argument("--gamma", type=float, help="decay factor for --schedule step")
    t.add_argument("--warmup-iters", type=int, help="linear warm-up iterations")
    t.add_argument("--class-weights", help="'balanced' (median frequency) or K comma-separated numbers")
    t.add_argument("--loss", help="ce (default), bce, dice, jaccard, tversky, focal, lovasz, or a weighted sum "
                   "such as ce+dice or ce+0.5*dice (docs/losses.md)")
    t.add_argument("--binary", action="store_true",
                   help="two-class task as one sigmoid channel, threshold 0.5 (default loss bce)")
    t.add_argument("--label-map", help="mask value -> class, e.g. 0:0,255:1 (target 'ignore' allowed)")
    t.add_argument("--ignore-index", type=int, help="mask value that counts for nothing (e.g. 11 = void)")
    t.add_argument("--num-classes", type=int, help="number of classes when the folder has no classes.txt")
    t.add_argument("--val-split", help="hold out training samples: stems/ranges '24-29' or a fraction '0.2'")
    t.add_argument("--resize", help="resize every image: HxW, N, or a factor such as 0.5")
    t.add_argument("--crop", help="random training crop: N or HxW (volumes: N or DxHxW)")
    t.add_argument("--scale", help="random scale range for training, e.g. 0.5,2.0")
    t.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips, volumes flipped along all three axes (on by default)")
    t.add_argument("--elastic", nargs="?", type=float, const=10.0, metavar="SIGMA",
                   help="elastic deformation of the training crops: displacements on a 3x3 grid with SIGMA pixels "
                   "standard deviation (default 10, the U-Net paper's)")
    t.add_argument("--weight-map", metavar="unet[:w0=10,sigma=5]",
                   help="U-Net border weights on the cross-entropy: objects = connected components of class 1 "
                   "of a two-class task (membrane masks: --label-map 0:0,255:1); --class-weights set its w_c")
    t.add_argument("--out", help="folder for runs (default runs/)")
    t.add_argument("--name", help="run folder name (default: time-model-data)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.npz")
    t.add_argument("--init", metavar="SOURCE",
                   help="initial weights: a run folder (its best.npz, else last.npz: FCN-16s from an FCN-32s run), "
                   ".npz (scratchseg or plain) or torch .pt/.pth loading what fits; or torchvision ImageNet "
                   "weights into the backbone: vgg16:FILE (FCN, DeepLab v1), resnet50:FILE or resnet101:FILE "
                   "(also resnet18/34; DeepLab v2/v3/v3+), with --model-option width=1.0 (docs/papers.md)")
    t.add_argument("--freeze", metavar="PREFIXES", help="'backbone' or comma-separated module-name prefixes")
    t.add_argument("--checkpoint-every", type=int, help="iterations between mid-epoch checkpoints (default 50)")
    t.add_argument("--num-predictions", type=int, help="validation images drawn into predictions/ (default 4)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dtype", choices=["float32", "float64"], help="the run's float type (default float32)")
    t.add_argument("--distributed", action="store_true",
                   help="data parallel under mpirun -n R: --batch-size per process (docs/distributed.md)")
    t.add_argument("--sync-bn", action="store_true", help="with --distributed: batch norm over the global batch")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    _common(e)
    e.add_argument("checkpoint", nargs="?", help="run folder (uses best.npz) or checkpoint file")
    e.add_argument("--checkpoint", dest="checkpoint_option", metavar="PATH", help="the same, as an option")
    e.add_argument("--split", default="val", help="val (default), test or train")
    e.add_argument("--data", help="evaluate on another dataset spec (default: the one it was trained on)")
    e.add_argument("--label-map")
    e.add_argument("--ignore-index", type=int)
    e.add_argument("--val-split")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    e.add_argument("--watershed", type=float, metavar="SEED",
                   help="two-class images: the Rand error's cells by a seeded watershed of p(class 1), seeds where "
                   "p > SEED (e.g. 0.9; choose it on the training split), instead of the components of class 1")
    _inference_args(e)
    e.add_argument("--output-stride", type=int, choices=[8, 16], metavar="{8,16}",
                   help="DeepLab v3/v3+: evaluate at this output stride with the same weights (trained at 16, "
                   "evaluated at 8: one more dilated stage, ASPP rates doubled)")

    pr = sub.add_parser("predict", help="colour masks and overlays for image files or folders (volumes: "
                        "predicted volumes in the input's format and pictures of three slices)")
    _common(pr)
    pr.add_argument("paths", nargs="+", metavar="[CHECKPOINT] INPUT",
                    help="run folder or checkpoint file (unless --checkpoint is given), then image files and/or folders")
    pr.add_argument("--checkpoint", dest="checkpoint_option", metavar="PATH",
                    help="run folder (uses best.npz) or checkpoint file")
    pr.add_argument("--out", default="predictions", help="output folder (default predictions/)")
    pr.add_argument("--onnx", metavar="MODEL.onnx",
                    help="run this exported model with ONNX Runtime instead of a checkpoint (all paths are images)")
    _inference_args(pr)

    ex = sub.add_parser("export", help="export a run's model to ONNX (checked by onnx.checker)")
    _common(ex)
    ex.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder (uses best.npz) or checkpoint file")
    ex.add_argument("output", metavar="MODEL.onnx")
    ex.add_argument("--size", default=None, metavar="HxW",
                    help="example input size traced (default 100x132; for a U-Net pick one that is not a multiple "
                         "of 2**depth, so the trace takes its pad-and-crop path)")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    ex.add_argument("--static-size", action="store_true", help="fix height and width to --size (batch stays dynamic)")

    m = sub.add_parser("models", help="list the models with their parameter counts")
    _common(m)
    m.add_argument("--num-classes", type=int, default=21)
    m.add_argument("--in-channels", type=int, default=3)

    d = sub.add_parser("datasets", help="list the dataset kinds, or summarise one")
    _common(d)
    d.add_argument("spec", nargs="?", help="e.g. folder:PATH to check and summarise it")
    d.add_argument("--label-map")
    d.add_argument("--ignore-index", type=int)
    d.add_argument("--num-classes", type=int)
    d.add_argument("--val-split")

    g = sub.add_parser("gradcheck", help="check every built-in op's backward against finite differences")
    _common(g)

    x = sub.add_parser("experiment", allow_abbrev=False,
                       help="run one of the lessons as a measured experiment (--list names them)")
    x.add_argument("name", nargs="?", help="the experiment (see --list)")
    x.add_argument("--list", action="store_true", help="name and describe every experiment")
    x.add_argument("--quick", action="store_true", help="a small set-up that runs in seconds (1-2 seeds)")
    x.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick: 1 or 2)")
    x.add_argument("--out", default="experiments", help="results go to OUT/NAME/ (default experiments/)")
    x.add_argument("--data", default=None, help="folder:PATH: train on your data (training experiments only)")
    x.add_argument("--backend", choices=["numpy", "cupy"], default=None, help="array backend")
    x.add_argument("--kernels", choices=["numba", "numpy"], default=None, help="CPU kernels")
    x.set_defaults(seed=None)  # the experiment seeds itself from --seeds
    return parser


def _setup(args):
    from . import backend
    from . import random as _random

    if args.backend:
        backend.set_backend(args.backend)
    if args.kernels:
        backend.set_kernels(args.kernels)
    if args.seed is not None:
        _random.manual_seed(args.seed)


def _train_config(args):
    from .training import TrainConfig
    from .training.config import VOLUME_DEFAULTS

    cfg = TrainConfig()
    if args.data:
        cfg.data = args.data
    if args.model:
        cfg.model = args.model
        cfg.model_options = {}  # the default options belong to the default model
    elif cfg.data.split(":")[0].strip().lower() in ("shapes3d", "volumes"):
        cfg.model, cfg.model_options = "unet3d", {}  # volumes: the 3-D U-Net at its defaults
    if cfg.data.split(":")[0].strip().lower() in ("shapes3d", "volumes"):
        for key, value in VOLUME_DEFAULTS.items():  # smaller batches, more epochs; options given override them
            setattr(cfg, key, value)
    if args.model_option:
        cfg.model_options = dict(cfg.model_options, **_parse_options(args.model_option))
    simple = ["epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "power",
              "step_size", "gamma", "warmup_iters", "label_map", "ignore_index", "num_classes", "val_split",
              "out", "name", "init", "checkpoint_every", "num_predictions", "seed", "dtype"]
    for key in simple:
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    if args.class_weights is not None:
        cfg.class_weights = "balanced" if args.class_weights == "balanced" else _floats(args.class_weights,
                                                                                          "--class-weights")
    if args.resize is not None:
        text = args.resize.strip()
        cfg.resize = float(text) if "." in text and "x" not in text else text
    if args.crop is not None:
        cfg.crop = args.crop
    if args.scale is not None:
        cfg.scale = _floats(args.scale, "--scale", 2)
    if args.hflip is not None:
        cfg.hflip = args.hflip
    if args.elastic is not None:
        cfg.elastic = args.elastic
    if args.weight_map is not None:
        cfg.weight_map = args.weight_map
    if args.freeze:
        cfg.freeze = [p.strip() for p in args.freeze.split(",") if p.strip()]
    if args.loss is not None:
        cfg.loss = args.loss
    if args.binary:
        cfg.binary = True
    if args.no_progress:
        cfg.progress = False
    cfg.distributed, cfg.sync_bn = bool(args.distributed), bool(args.sync_bn)
    return cfg


def _cmd_train(args):
    from . import distributed
    from .training import NonFiniteLossError, TrainingInterrupted, train

    if args.distributed:
        distributed.init()  # under mpirun: join the job (rank 0 alone prints and writes)
    elif distributed.launcher_world_size() > 1:
        raise ValueError(f"started by mpirun/srun as one of {distributed.launcher_world_size()} processes but "
                         "without --distributed: each would train alone; add --distributed")
    log = print if distributed.is_main() else (lambda *a, **k: None)
    # an error on one process ends the job with its message; those raised by all at once end it normally
    with distributed.abort_on_error(collective=(TrainingInterrupted, NonFiniteLossError)):
        if args.resume:
            given = [a for a in sys.argv[2:] if a.startswith("--") and a.split("=")[0] not in
                     ("--resume", "--backend", "--kernels", "--no-progress", "--distributed")]
            if given and distributed.is_main():
                print(f"note: --resume continues with the run's own settings; ignoring {', '.join(given)}",
                      file=sys.stderr)
            result = train(resume=args.resume, log=log)
        else:
            result = train(_train_config(args), log=log)
    return 0 if result else 1


def _cmd_eval(args):
    from .data import make_task, task_from_spec
    from .data.task import Task
    from .metrics import format_scores
    from .training import evaluate, load_model, parse_resize, resolve_checkpoint

    if not (args.checkpoint or args.checkpoint_option):
        raise ValueError("eval needs a run folder or checkpoint file, e.g. `scratchseg eval runs/latest`")
    path = resolve_checkpoint(args.checkpoint_option or args.checkpoint)
    model, meta = load_model(path)
    if args.output_stride is not None:
        if not hasattr(model, "set_output_stride"):
            raise ValueError(f"--output-stride applies to deeplabv3 and deeplabv3plus; {meta['model_name']} in "
                             f"{path} has a fixed output stride")
        model.set_output_stride(args.output_stride)
    if args.data:
        task = make_task(args.data, label_map=args.label_map, ignore_index=args.ignore_index,
                         num_classes=meta["num_classes"] if args.data.startswith(("folder:", "volumes:")) else None,
                         val_split=args.val_split)
        if task.num_classes != meta["num_classes"] or task.in_channels != meta["in_channels"]:
            raise ValueError(f"{args.data} has {task.num_classes} classes and {task.in_channels} channels, but the "
                             f"model in {path} was trained for {meta['num_classes']} and {meta['in_channels']}")
    else:
        task = task_from_spec(meta["task_spec"])
    task = Task(name=task.name, splits=task.splits, class_names=meta.get("class_names", task.class_names),
                colors=[tuple(c) for c in meta.get("colors", task.colors)], ignore_index=task.ignore_index,
                in_channels=task.in_channels, mean=tuple(meta.get("mean", task.mean)),
                std=tuple(meta.get("std", task.std)), spec=task.spec)
    inference = inference_options(args)
    crf = crf_options(args)
    if (inference or args.crf) and (meta.get("task_spec") or {}).get("kind") in ("shapes3d", "volumes"):
        raise ValueError("--tile, --overlap, --flip, --scales and --crf apply to images; volumes are evaluated whole")
    scores = evaluate(model, task, args.split, args.batch_size, parse_resize(meta.get("resize")), inference=inference,
                      crf=crf, watershed=args.watershed)
    stride = f" at output stride {args.output_stride}" if args.output_stride is not None else ""
    print(f"{path}{stride} on {task.name} / {args.split} ({len(task.split(args.split))} images):")
    print(format_scores(scores, task.class_names))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(scores, fh, indent=1)
    return 0


def _cmd_models(args):
    from . import models

    print(f"{'model':<16} {'parameters':>12}   (num_classes={args.num_classes}, in_channels={args.in_channels}, "
          "default options; unet3d takes volumes)")
    for name in models.available():
        try:
            model = models.create(name, num_classes=args.num_classes, in_channels=args.in_channels)
            count = f"{model.num_parameters():,}"
        except Exception as exc:  # a broken entry should not hide the others
            count = f"error: {exc}"
        print(f"{name:<16} {count:>12}")
    return 0


def _cmd_datasets(args):
    from .data import describe_datasets, make_task

    if not args.spec:
        print(describe_datasets())
        return 0
    task = make_task(args.spec, label_map=args.label_map, ignore_index=args.ignore_index,
                     num_classes=args.num_classes, val_split=args.val_split)
    for note in task.notes:
        print(f"note: {note}")
    print(task.describe())
    for name, ds in task.splits.items():
        if len(ds):
            image = ds[0][0]
            if image.ndim == 4:  # a volume (D, H, W, C)
                print(f"  {name}: {len(ds)} volumes, first {ds.names[0]} is {'x'.join(map(str, image.shape[:3]))} "
                      f"(DxHxW) with {image.shape[3]} channel(s)")
                continue
            print(f"  {name}: {len(ds)} images, first {ds.names[0]} is {image.shape[1]}x{image.shape[0]} "
                  f"with {image.shape[2]} channel(s)")
    return 0


def _cmd_gradcheck(args):
    from . import backend, gradcheck

    ok = gradcheck.check_builtin_ops(file=sys.stdout, backend=args.backend or backend.current())
    return 0 if ok else 1


def _cmd_experiment(args):
    from . import experiments

    if args.list:
        if args.name:
            raise ValueError(f"give either --list or an experiment name, not both (got {args.name!r})")
        print(experiments.list_experiments())
        return 0
    if not args.name:
        raise ValueError("name an experiment, e.g. `scratchseg experiment fc-vs-fcn`; known experiments: "
                         + ", ".join(experiments.EXPERIMENTS))
    try:
        experiments.run_experiment(args.name, quick=args.quick, seeds=args.seeds, out=args.out, data=args.data,
                                   log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("interrupted: the finished runs are kept in results.partial.json", file=sys.stderr)
        return 130
    return 0


def _is_main():
    from . import distributed

    return distributed.is_main()


def main(argv=None):
    """Entry point of the ``scratchseg`` command; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # `scratchseg` alone does the README's main job
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .backend import BackendError
    from .checkpoint import CheckpointError
    from .data.task import DataError
    from .distributed import DistributedError
    from .training import NonFiniteLossError, TrainingInterrupted

    commands = {"train": _cmd_train, "eval": _cmd_eval, "predict": cmd_predict, "models": _cmd_models,
                "datasets": _cmd_datasets, "gradcheck": _cmd_gradcheck, "export": cmd_export,
                "experiment": _cmd_experiment}
    try:
        _setup(args)
        return commands[args.command](args)
    except TrainingInterrupted as exc:
        if _is_main():
            print(f"\n{exc}", file=sys.stderr)
        return 130
    except NonFiniteLossError as exc:
        if _is_main():
            print(f"error: {exc}", file=sys.stderr)
        return 3
    except (DataError, CheckpointError, BackendError, FileNotFoundError, ValueError, DistributedError) as exc:
        if os.environ.get("SCRATCHSEG_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

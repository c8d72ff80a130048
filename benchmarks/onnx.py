"""Inference: ONNX Runtime on the exported graph vs scratchseg's own forward, same model, same input, same process.

    python benchmarks/onnx.py                                  # unet, deeplabv3plus, fcn8s at 1x3x256x256
    python benchmarks/onnx.py --model unet --batch 4 --size 128x160 --rounds 10

Each model is built with default options (the U-Net as `scratchseg train`
builds it), exported with ``scratchseg.onnx.export`` to a temporary file,
and both forwards run interleaved round by round after warm-up (see
``_common.interleaved``): scratchseg under ``no_grad`` in evaluation mode,
ONNX Runtime with its default CPU session (all graph optimisations, one
intra-op thread per core). The table gives medians and minimums in
milliseconds, the ratio of the medians (ONNX Runtime / scratchseg: below 1
means ONNX Runtime is faster) and the largest difference between the two
outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402  (imports scratchseg before NumPy)

# this file is named onnx.py: with its folder first on sys.path, `import onnx` would find it, not the package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import numpy  # noqa: E402

import scratchseg  # noqa: E402
from scratchseg import models  # noqa: E402

DEFAULT_MODELS = ["unet", "deeplabv3plus", "fcn8s"]


def cpu_name():
    """The CPU's model name from /proc/cpuinfo (or the platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def build(name):
    if name == "unet":  # the model `scratchseg train` trains by default
        from scratchseg.training.config import TrainConfig

        cfg = TrainConfig()
        return models.create("unet", num_classes=4, in_channels=3, **dict(cfg.model_options or {}))
    return models.create(name, num_classes=21, in_channels=3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append",
                   help="model name, repeatable (default: " + ", ".join(DEFAULT_MODELS) + ")")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", default="256x256", help="HxW (default 256x256)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    import onnxruntime

    from scratchseg.onnx import export

    h, _, w = args.size.lower().partition("x")
    H, W = int(h), int(w or h)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    print(f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, scratchseg {scratchseg.__version__}, "
          f"kernels {scratchseg.backend.kernels()}")
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min) at start: %.2f %.2f %.2f" % os.getloadavg())
    rows = []
    folder = tempfile.mkdtemp()
    for name in args.model or DEFAULT_MODELS:
        scratchseg.manual_seed(0)
        model = build(name).eval()
        x = numpy.random.default_rng(0).standard_normal((args.batch, 3, H, W)).astype(numpy.float32)
        path = os.path.join(folder, f"{name}.onnx")
        export(model, x, path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def ours():
            with scratchseg.no_grad():
                return model(scratchseg.Tensor(x)).numpy()

        def theirs():
            return session.run(None, {"input": x})[0]

        diff = float(numpy.abs(ours() - theirs()).max())
        times = _common.interleaved({"scratchseg": ours, "onnxruntime": theirs}, args.rounds, args.warmup)
        s, o = _common.stats(times["scratchseg"]), _common.stats(times["onnxruntime"])
        rows.append({"model": name, "input": f"{args.batch}x3x{H}x{W}",
                     "scratchseg ms": 1e3 * s["median"], "(min)": 1e3 * s["min"],
                     "onnxruntime ms": 1e3 * o["median"], "(min) ": 1e3 * o["min"],
                     "ort/scratchseg": o["median"] / s["median"], "max |diff|": f"{diff:.1e}"})
    _common.print_table(rows, ["model", "input", "scratchseg ms", "(min)", "onnxruntime ms", "(min) ",
                               "ort/scratchseg", "max |diff|"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

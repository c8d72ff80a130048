"""Peak memory of predicting one large image: tiled (``inference.predict(..., tile=...)``) against whole.

    python benchmarks/inference_memory.py                          # 2048x2048, tile 256, the default U-Net
    python benchmarks/inference_memory.py --size 1024 --tile 128 --batch-size 1
    python benchmarks/inference_memory.py --model unet --model-option base=32,depth=4

Each measurement runs in a fresh child process (see ``_common``): the child
builds the model (the one `scratchseg train` builds unless told otherwise)
and the random normalized image (1, 3, S, S) float32, predicts a small image
once so that compiled kernels and allocator pools exist, notes its resident
size, resets the kernel's high-water mark, predicts the large image, and
reports that high-water mark minus the baseline: everything the prediction
added, the output probabilities (1, K, S, S) included. The table gives both
peaks, the size of the output array for scale, and the time of the
prediction (on a busy machine the time moves; the memory does not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402  (imports scratchseg before NumPy)

import numpy  # noqa: E402

import scratchseg  # noqa: E402
from scratchseg import models  # noqa: E402
from scratchseg.cli import _parse_options  # noqa: E402
from scratchseg.inference import predict  # noqa: E402


def build(args):
    options = {}
    if args.model == "unet":  # the model `scratchseg train` trains by default
        from scratchseg.training.config import TrainConfig

        options = dict(TrainConfig().model_options or {})
    options.update(_parse_options(args.model_option))
    return models.create(args.model, num_classes=args.num_classes, in_channels=3, **options)


def child(args):
    """One measurement in this fresh process; prints a JSON line."""
    scratchseg.manual_seed(0)
    model = build(args).eval()
    tile = args.tile if args.mode == "tiled" else None
    image = numpy.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(numpy.float32)
    predict(model, image[:, :, :64, :64], tile=min(tile or 64, 64), batch_size=args.batch_size)  # warm-up
    base = _common.rss_bytes()
    _common.reset_maxrss()
    start = time.perf_counter()
    probs = predict(model, image, tile=tile, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    peak = _common.maxrss_bytes() - base
    print(json.dumps({"mode": args.mode, "peak": peak, "seconds": seconds, "output": int(probs.nbytes)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    parser.add_argument("--model", default="unet", help="model name (default unet, as `scratchseg train`)")
    parser.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="model option, repeatable")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--no-whole", action="store_true", help="measure the tiled prediction only")
    parser.add_argument("--memory-child", choices=["tiled", "whole"], dest="mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return child(args)

    reports = [_common.child_peak_memory(os.path.abspath(__file__), mode, sys.argv[1:])
               for mode in (["tiled"] if args.no_whole else ["tiled", "whole"])]
    mib = 2.0**20
    print(f"{args.model} on one 3x{args.size}x{args.size} float32 image, tile {args.tile}, batch {args.batch_size}, "
          f"backend {scratchseg.backend.current()}, kernels {scratchseg.backend.kernels()}")
    columns = ["prediction", "peak memory (MiB)", "output array (MiB)", "time (s)"]
    rows = [dict(zip(columns, [r["mode"], f"{r['peak'] / mib:.0f}", f"{r['output'] / mib:.0f}", f"{r['seconds']:.1f}"]))
            for r in reports]
    _common.print_table(rows, columns)
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min) at end: %.2f %.2f %.2f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())

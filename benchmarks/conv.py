"""conv2d forward and forward+backward at U-Net shapes: scratchseg vs PyTorch, same process.

    python benchmarks/conv.py                    # CPU: scratchseg (NumPy + Numba) vs PyTorch CPU
    python benchmarks/conv.py --backend cupy     # GPU: scratchseg on CuPy vs PyTorch CUDA

Shapes (batch 8, 3x3 kernels, 'same' padding, as in a U-Net):
    8x64x128x128 -> 64, 8x128x64x64 -> 128, and 8x64x128x128 -> 64 with dilation 2.

For each: the median and minimum time of both frameworks over interleaved
rounds after warm-up, the ratio of the medians (scratchseg / torch), and the
achieved GFLOP/s (2*N*K*C*kh*kw*Ho*Wo per product; forward+backward counts
three products) beside this machine's SGEMM peak measured in the same run.
These are the flops of the direct sum: a product computed with Winograd's
F(2x2, 3x3) (scratchseg's CPU forward and input gradient of these shapes)
does 16/36 of those multiply-adds, so its effective rate can pass the peak.
On the CPU it also times the first conv2d in a fresh process (Numba cache warm).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (imports scratchseg before NumPy)

import numpy  # noqa: E402

import scratchseg  # noqa: E402
import scratchseg.functional as F  # noqa: E402

SHAPES = [  # (name, (N, C, H, W), K, dilation)
    ("8x64x128x128", (8, 64, 128, 128), 64, 1),
    ("8x128x64x64", (8, 128, 64, 64), 128, 1),
    ("8x64x128x128 d2", (8, 64, 128, 128), 64, 2),
]

FIRST_CALL = r"""
import time
t0 = time.perf_counter()
import sys; sys.path.insert(0, {root!r})
import numpy as np, scratchseg, scratchseg.functional as F
t1 = time.perf_counter()
x = scratchseg.tensor(np.ones((1, 64, 32, 32), np.float32), requires_grad=True)
w = scratchseg.tensor(np.ones((64, 64, 3, 3), np.float32), requires_grad=True)
y = F.conv2d(x, w, padding=1)
y.backward(np.ones(y.shape, np.float32))
t2 = time.perf_counter()
print(f"{{t1 - t0:.3f}} {{t2 - t1:.3f}}")
"""


def first_call_seconds():
    """(import seconds, first conv2d forward+backward seconds) in a new process, Numba cache warm."""
    code = FIRST_CALL.format(root=_common.ROOT)
    env = dict(os.environ)
    result = None
    for _ in range(2):  # the first run fills the Numba cache if it is cold
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        result = tuple(float(v) for v in out.stdout.split())
    return result


def main(argv=None):
    parser = _common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--only", type=int, nargs="*", help="indices of SHAPES to run (default all)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    xp, device = _common.setup_backend(args.backend)
    lines, peak = _common.where_report(device)  # CPU, vector extensions, BLAS and its kernel, SGEMM peak
    print("\n".join(lines))
    print(_common.apply_precision(args, device))
    print(f"rounds {args.rounds} after {args.warmup} warm-up, interleaved, each call after "
          f"{_common.IDLE_BEFORE_CALL} s idle; times in ms\n")

    rng = numpy.random.default_rng(0)
    rows = []
    for index, (name, (N, C, H, W), K, d) in enumerate(SHAPES):
        if args.only and index not in args.only:
            continue
        x_host = rng.standard_normal((N, C, H, W), dtype=numpy.float32)
        w_host = (rng.standard_normal((K, C, 3, 3), dtype=numpy.float32) / numpy.sqrt(9 * C)).astype(numpy.float32)
        b_host = rng.standard_normal(K, dtype=numpy.float32)
        g_host = rng.standard_normal((N, K, H, W), dtype=numpy.float32)

        x = scratchseg.Tensor(xp.asarray(x_host), requires_grad=True)
        w = scratchseg.Tensor(xp.asarray(w_host), requires_grad=True)
        b = scratchseg.Tensor(xp.asarray(b_host), requires_grad=True)
        g = xp.asarray(g_host)
        tx = torch.from_numpy(x_host).to(device).requires_grad_()
        tw = torch.from_numpy(w_host).to(device).requires_grad_()
        tb = torch.from_numpy(b_host).to(device).requires_grad_()
        tg = torch.from_numpy(g_host).to(device)

        def ours_forward():
            with scratchseg.no_grad():
                F.conv2d(x, w, b, padding=d, dilation=d)

        def torch_forward():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, tb, padding=d, dilation=d)

        def ours_step():
            x.grad = w.grad = b.grad = None
            F.conv2d(x, w, b, padding=d, dilation=d).backward(g)

        def torch_step():
            tx.grad = tw.grad = tb.grad = None
            torch.nn.functional.conv2d(tx, tw, tb, padding=d, dilation=d).backward(tg)

        # check once that both compute the same thing before timing them
        ours_step(), torch_step()
        err = float(numpy.abs(scratchseg.backend.asnumpy(w.grad) - tw.grad.cpu().numpy()).max())
        scale = float(numpy.abs(tw.grad.cpu().numpy()).max())
        if not err <= 1e-3 * scale:
            raise AssertionError(f"{name}: weight gradients differ (max abs diff {err:.3g}, scale {scale:.3g})")

        flops = 2.0 * N * K * C * 9 * H * W
        for mode, ours, theirs, products in (
            ("forward", ours_forward, torch_forward, 1),
            ("fwd+bwd", ours_step, torch_step, 3),
        ):
            times = _common.interleaved({"scratchseg": ours, "torch": theirs}, args.rounds, args.warmup, device)
            s, t = _common.stats(times["scratchseg"]), _common.stats(times["torch"])
            rows.append({
                "shape": name, "mode": mode,
                "ours med": 1e3 * s["median"], "ours min": 1e3 * s["min"],
                "torch med": 1e3 * t["median"], "torch min": 1e3 * t["min"],
                "ratio": s["median"] / t["median"],
                "ours GF/s": products * flops / s["median"] / 1e9,
                "torch GF/s": products * flops / t["median"] / 1e9,
            })
            print(f"  done: {name} {mode}", file=sys.stderr)
        del x, w, b, g, tx, tw, tb, tg
    columns = ["shape", "mode", "ours med", "ours min", "torch med", "torch min", "ratio", "ours GF/s", "torch GF/s"]
    _common.print_table(rows, columns)
    print(f"(SGEMM peak: numpy/cupy {peak['scratchseg']:.0f}, torch {peak['torch']:.0f} GFLOP/s)")
    if device == "cpu":
        imp, first = first_call_seconds()
        print(f"\nnew process, Numba cache warm: import scratchseg {imp:.2f} s, "
              f"first conv2d forward+backward (1x64x32x32) {first:.2f} s")
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min) at end: %.2f %.2f %.2f" % os.getloadavg())
    return rows


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")

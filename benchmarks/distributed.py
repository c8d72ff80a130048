"""Data-parallel costs: allreduce time against message size, a training step with and without communication.

    python benchmarks/distributed.py volume                       # bytes exchanged per step, each built-in model
    mpirun -n 2 python benchmarks/distributed.py allreduce        # MPI_Allreduce time, 4 KiB .. 64 MiB
    NUMBA_NUM_THREADS=2 python benchmarks/distributed.py step --global-batch 8              # 1 process x 2 threads
    NUMBA_NUM_THREADS=1 mpirun -n 2 python benchmarks/distributed.py step --global-batch 8  # 2 processes x 1 thread

``step`` times the U-Net of ``scratchseg train``'s main job (base 12, depth 3)
on random images: forward + loss + backward (compute), the wait for the slower
rank (a barrier, timed apart), the gradient exchange (``all_reduce_gradients``:
one allreduce of one flat buffer, with its copies in and out) and the update, as
medians over ``--steps`` steps; then the same steps without the exchange. Rank 0
prints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import scratchseg
import scratchseg.distributed as dist
import scratchseg.functional as F
from scratchseg import models, optim
from scratchseg.autograd import Tensor


def say(*args):
    if dist.is_main():
        print(*args, flush=True)


def volume(args):
    """Per step each process sends and receives about 2 (R-1)/R times the gradient bytes (ring allreduce)."""
    print(f"gradient bytes per step (float32, {args.num_classes} classes, default options); a ring allreduce moves "
          "2(R-1)/R times this in and out of each process")
    print(f"{'model':<16} {'parameters':>12} {'MiB':>9} {'R=2 MiB/step':>13} {'R=8 MiB/step':>13}")
    for name in models.available():
        try:
            n = models.create(name, num_classes=args.num_classes, in_channels=3).num_parameters(trainable_only=True)
        except Exception as exc:  # pragma: no cover - a broken entry should not hide the rest
            print(f"{name:<16} error: {exc}")
            continue
        _volume_row(name, n)
    main_job = models.create("unet", num_classes=4, in_channels=3, base=12, depth=3)
    _volume_row("unet 12/3 (*)", main_job.num_parameters(trainable_only=True))
    print("(*) the U-Net of `scratchseg train`'s main job: base 12, depth 3, 4 classes")


def _volume_row(name, n):
    mib = 4 * n / 2 ** 20
    print(f"{name:<16} {n:>12,} {mib:>9.2f} {mib:>13.2f} {mib * 2 * 7 / 8:>13.2f}")


def allreduce(args):
    dist.init()
    comm = dist.comm._state["comm"]
    say(f"MPI_Allreduce (sum, in place, float32) on {dist.world_size()} processes; median of {args.reps}")
    say(f"{'bytes':>12} {'time (us)':>11} {'GB/s (algbw)':>13}")
    for power in range(12, 27, 2):
        a = np.ones(2 ** power // 4, dtype=np.float32)
        times = []
        for _ in range(args.reps):
            comm.Barrier()
            t = time.perf_counter()
            dist.all_reduce_sum(a)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        say(f"{a.nbytes:>12,} {med * 1e6:>11.1f} {a.nbytes / med / 1e9:>13.2f}")


def step(args):
    dist.init()
    R = dist.world_size()
    if args.global_batch % R:
        sys.exit(f"--global-batch {args.global_batch} is not a multiple of the {R} processes")
    b = args.global_batch // R
    scratchseg.manual_seed(0)
    model = models.create("unet", num_classes=4, in_channels=3, base=12, depth=3)
    dist.broadcast_parameters(model)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(dist.rank())
    x = rng.standard_normal((b, 3, args.size, args.size)).astype(np.float32)
    y = rng.integers(0, 4, size=(b, args.size, args.size))
    comm = dist.comm._state["comm"]
    report = {}
    for exchange in (True, False) if R > 1 else (False,):
        parts = {"compute": [], "wait": [], "allreduce": [], "update": [], "step": []}
        for i in range(args.warmup + args.steps):
            comm.Barrier()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(Tensor(x)), y)
            opt.zero_grad()
            loss.backward()
            t1 = time.perf_counter()
            if exchange:
                comm.Barrier()  # only to tell waiting for the slower rank from moving the bytes
            tw = time.perf_counter()
            if exchange:
                dist.all_reduce_gradients(model)
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if i >= args.warmup:
                for key, value in (("compute", t1 - t0), ("wait", tw - t1), ("allreduce", t2 - tw),
                                   ("update", t3 - t2), ("step", t3 - t0)):
                    parts[key].append(value)
        report[exchange] = {k: 1e3 * statistics.median(v) for k, v in parts.items()}
    n = model.num_parameters()
    say(f"U-Net base 12 depth 3 ({n:,} parameters, {4 * n / 2 ** 20:.2f} MiB of gradients), global batch "
        f"{args.global_batch}x3x{args.size}x{args.size} = {R} process(es) x {b}; threads per process: "
        f"{scratchseg.backend.kernels()} kernels, NUMBA_NUM_THREADS={__import__('os').environ.get('NUMBA_NUM_THREADS')}")
    say(f"{'(medians, ms)':<22} {'step':>8} {'compute':>9} {'wait':>6} {'allreduce':>10} {'update':>8}")
    for exchange, r in report.items():
        label = "with gradient exchange" if exchange else "without communication"
        say(f"{label:<22} {r['step']:>8.1f} {r['compute']:>9.1f} {r['wait']:>6.1f} {r['allreduce']:>10.1f} "
            f"{r['update']:>8.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["volume", "allreduce", "step"])
    p.add_argument("--num-classes", type=int, default=21, help="volume: classes of the models (21, as VOC)")
    p.add_argument("--reps", type=int, default=50, help="allreduce: repetitions per size")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="step: image side")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    {"volume": volume, "allreduce": allreduce, "step": step}[args.what](args)


if __name__ == "__main__":
    main()

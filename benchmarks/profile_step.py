"""Where the time of one U-Net training step goes (the network of ``train_step.py``).

    python benchmarks/profile_step.py                  # CPU
    python benchmarks/profile_step.py --backend cupy   # GPU

Four views of the same step:

1. host time against device time of a whole step (on the GPU: CUDA events
   around the step beside the host's clock; when the two are close the step
   is bound by launching kernels, not by running them);
2. each op's forward and backward, and the optimizer, timed with a
   device synchronisation before and after (so the parts add up, a little
   above the real step), as milliseconds per step, calls per step and share;
3. the host's time by function, sampled (a thread looks at the main thread's
   stack every half millisecond, so the steps run at full speed, unlike under
   cProfile, whose per-call cost inflates the many small calls of a step);
4. with ``--gpu-kernels`` on the GPU: the device time of every kernel the step
   launches (CuPy's and cuBLAS's alike), from PyTorch's profiler, which traces
   every kernel of the process, and their sum: the time the GPU is busy.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (imports scratchseg before NumPy)

import numpy  # noqa: E402

import scratchseg  # noqa: E402
from scratchseg.autograd import Function  # noqa: E402
from train_step import OursRunner, make_data, parse_with_data_args  # noqa: E402


def _subclasses(cls):
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


class OpTimer:
    """Patches every Function's forward/backward and the optimizer step with synchronised timers."""

    def __init__(self, sync):
        self.sync = sync
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self._undo = []

    def _wrap(self, owner, attr, label, static):
        original = owner.__dict__[attr]
        fn = original.__func__ if static else original
        timer = self

        def timed(*args, **kwargs):
            timer.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timer.sync()
            timer.total[label] += time.perf_counter() - t0
            timer.calls[label] += 1
            return out

        setattr(owner, attr, staticmethod(timed) if static else timed)
        self._undo.append((owner, attr, original))

    def __enter__(self):
        for cls in _subclasses(Function):
            for attr in ("forward", "backward"):
                if attr in cls.__dict__:
                    self._wrap(cls, attr, f"{cls.__name__}.{attr}", static=True)
        from scratchseg import optim

        for cls in (optim.SGD, optim.Optimizer):
            for attr in ("step", "zero_grad"):
                if attr in cls.__dict__:
                    self._wrap(cls, attr, f"{cls.__name__}.{attr}", static=False)
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        return False


class StackSampler:
    """Samples the main thread's Python stack from a helper thread: exclusive and inclusive counts."""

    def __init__(self, interval=5e-4):
        self.interval = interval
        self.own, self.total, self.samples = Counter(), Counter(), 0
        self._target = threading.main_thread().ident
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            frame = sys._current_frames().get(self._target)
            seen = set()
            leaf = True
            while frame is not None:
                code = frame.f_code
                key = f"{os.path.relpath(code.co_filename, _common.ROOT) if code.co_filename.startswith(_common.ROOT) else os.path.basename(code.co_filename)}:{code.co_firstlineno}({code.co_name})"
                if leaf:
                    self.own[key] += 1
                    leaf = False
                if key not in seen:
                    self.total[key] += 1
                    seen.add(key)
                frame = frame.f_back
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self):
        # the main thread must hand over the GIL often, or the samples fall only where it lets go itself
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(self.interval / 5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        sys.setswitchinterval(self._switch)
        return False

    def report(self, top):
        lines = [f"{self.samples} samples; share of samples with the function on top of the stack (own) "
                 "and anywhere on it (incl.):"]
        for key, n in self.own.most_common(top):
            lines.append(f"  own {100 * n / self.samples:5.1f}%  incl. {100 * self.total[key] / self.samples:5.1f}%  {key}")
        lines.append("inclusive:")
        for key, n in self.total.most_common(top):
            lines.append(f"  incl. {100 * n / self.samples:5.1f}%  {key}")
        return "\n".join(lines)


def gpu_kernel_table(runner, steps, top):
    """Device time per kernel over ``steps`` steps (PyTorch's profiler sees CuPy's kernels too)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _common.synchronize("cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.step()
        _common.synchronize("cuda")
    rows = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            rows[evt.name][0] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
            rows[evt.name][1] += 1
    busy = sum(v[0] for v in rows.values()) / steps / 1e3
    lines = [f"GPU busy {busy:.2f} ms per step in {sum(v[1] for v in rows.values()) / steps:.0f} kernels/copies:"]
    for name, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {us / steps / 1e3:7.3f} ms  {n / steps:5.1f}x  {name[:90]}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (default 10)")
    parser.add_argument("--top", type=int, default=30, help="rows of the sampled-profile table")
    parser.add_argument("--gpu-kernels", action="store_true", help="GPU: device time per kernel (needs PyTorch)")
    parser.add_argument("--tf32", action="store_true", help="GPU: convolutions multiply in TF32 (set_allow_tf32)")
    args = parse_with_data_args(parser, argv)

    xp, device = _common.setup_backend(args.backend)
    print("\n".join(_common.environment_report(device)))
    if args.tf32:
        _common.scratchseg.backend.set_allow_tf32(True)
    print(f"TF32 convolutions: {_common.scratchseg.backend.allow_tf32()}")
    runner = OursRunner(xp, net=args.net)
    runner.set_data(*make_data(batch=args.batch, size=args.size))
    print(f"batch {args.batch}x3x{args.size}x{args.size}")
    sync = (lambda: _common.synchronize(device)) if device == "cuda" else (lambda: None)
    for _ in range(3):
        runner.step()
    sync()

    # 1. host against device time of whole steps
    host, dev = [], []
    for _ in range(args.steps):
        sync()
        if device == "cuda":
            import cupy

            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
        t0 = time.perf_counter()
        runner.step()
        host.append(time.perf_counter() - t0)  # the host's time to issue the step (no wait at its end)
        if device == "cuda":
            end.record()
            end.synchronize()
            dev.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    print(f"\nstep: host issue time median {1e3 * numpy.median(host):.2f} ms"
          + (f", device time (events) median {1e3 * numpy.median(dev):.2f} ms" if dev else ""))

    # 2. synchronised per-op times
    with OpTimer(sync) as timer:
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            runner.step()
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    rows = sorted(timer.total.items(), key=lambda kv: -kv[1])
    accounted = sum(timer.total.values())  # the timed parts do not nest
    print(f"\nsynchronised step {1e3 * wall:.2f} ms; per op (ms per step, calls per step, share of the step):")
    for label, seconds in rows:
        per = seconds / args.steps
        print(f"  {label:34s} {1e3 * per:8.3f} ms  {timer.calls[label] / args.steps:6.1f}  {100 * per / wall:5.1f}%")
    print(f"  {'(autograd walk, tensors, rest)':34s} {1e3 * (wall - accounted / args.steps):8.3f} ms")

    # 3. host-side cost, unsynchronised and sampled
    with StackSampler() as sampler:
        for _ in range(max(args.steps, 20)):
            runner.step()
        sync()
    print("\nhost time, sampled:\n" + sampler.report(args.top))

    # 4. device time per kernel
    if args.gpu_kernels and device == "cuda":
        print("\n" + gpu_kernel_table(runner, args.steps, args.top))


if __name__ == "__main__":
    main()

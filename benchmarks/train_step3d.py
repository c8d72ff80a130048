"""One 3-D U-Net training step: scratchseg vs PyTorch on the CPU, time and peak memory.

    python benchmarks/train_step3d.py                # 2x1x64x64x64, base 16: the issue's step
    python benchmarks/train_step3d.py --base 8       # the model's default width (what trains on a CPU)
    python benchmarks/train_step3d.py --size 32      # a smaller volume

The network is ``scratchseg.models.create("unet3d", ...)`` (Çiçek et al.: four
levels = three 2x2x2 max-poolings, two 3x3x3 conv + BatchNorm + ReLU per level,
2x2x2 stride-2 transposed convolutions up, skips concatenated, a 1x1x1 conv to
3 classes), and PyTorch's twin below is the same network module for module,
so the two state dicts share their keys. scratchseg's weights are copied into
the twin; the first step's losses are printed and compared before anything is
timed. Voxel-wise cross-entropy, SGD with momentum 0.9, float32.

Time: interleaved rounds after warm-up in this process (``_common.interleaved``),
medians. Peak memory: each framework in a fresh child process (see
``_common``), the resident-size high-water mark during the steps minus the
resident size before them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (imports scratchseg before NumPy)

import numpy  # noqa: E402

import scratchseg  # noqa: E402

BATCH, IN_CHANNELS, SIZE, CLASSES, BASE, DEPTH = 2, 1, 64, 3, 16, 3


def torch_unet3d(base=BASE, depth=DEPTH):
    """scratchseg's ``unet3d`` (``scratchseg/models/unet3d.py``) written in torch.nn, with the same parameter names."""
    import torch
    from torch import nn

    class DoubleConv3d(nn.Module):
        def __init__(self, in_ch, mid_ch, out_ch):
            super().__init__()
            self.conv1 = nn.Conv3d(in_ch, mid_ch, 3, padding=1, bias=False)
            self.norm1 = nn.BatchNorm3d(mid_ch)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv3d(mid_ch, out_ch, 3, padding=1, bias=False)
            self.norm2 = nn.BatchNorm3d(out_ch)
            self.relu2 = nn.ReLU()

        def forward(self, x):
            return self.relu2(self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x))))))

    class Up3d(nn.Module):
        def __init__(self, in_ch, skip_ch, out_ch):
            super().__init__()
            self.upsample = nn.ConvTranspose3d(in_ch, in_ch, 2, stride=2, bias=False)
            self.conv = DoubleConv3d(in_ch + skip_ch, out_ch, out_ch)

        def forward(self, x, skip):
            return self.conv(torch.cat([skip, self.upsample(x)], 1))

    class UNet3D(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList()
            c = IN_CHANNELS
            for i in range(depth + 1):
                self.down.append(DoubleConv3d(c, base * 2**i, base * 2 ** (i + 1)))
                c = base * 2 ** (i + 1)
            self.pool = nn.MaxPool3d(2)
            self.up = nn.ModuleList()
            for i in reversed(range(depth)):
                skip = base * 2 ** (i + 1)
                self.up.append(Up3d(c, skip, skip))
                c = skip
            self.head = nn.Conv3d(c, CLASSES, 1)

        def forward(self, x):
            skips = []
            for i, level in enumerate(self.down):
                x = level(x)  # (N, 2b * 2**i, D / 2**i, H / 2**i, W / 2**i)
                if i < depth:
                    skips.append(x)
                    x = self.pool(x)
            for up, skip in zip(self.up, reversed(skips)):
                x = up(x, skip)
            return self.head(x)  # (N, CLASSES, D, H, W)

    return UNet3D()


def make_data(batch=BATCH, size=SIZE, seed=0):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, IN_CHANNELS, size, size, size), dtype=numpy.float32)
    y = rng.integers(0, CLASSES, (batch, size, size, size)).astype(numpy.int64)
    return x, y


class OursRunner:
    def __init__(self, base=BASE):
        from scratchseg import models, optim

        self.model = models.create("unet3d", num_classes=CLASSES, in_channels=IN_CHANNELS, base=base, depth=DEPTH,
                                   up_mode="transposed", norm="batch").train()
        self.opt = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def set_data(self, x, y):
        self.x, self.y = scratchseg.Tensor(x), y

    def step(self):
        import scratchseg.functional as F

        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def state_dict_numpy(self):
        return {k: numpy.array(scratchseg.backend.asnumpy(getattr(v, "data", v))) for k, v in
                self.model.state_dict().items()}


class TorchRunner:
    def __init__(self, base=BASE, state=None):
        import torch

        self.torch = torch
        self.model = torch_unet3d(base).train()
        if state is not None:  # scratchseg's weights, so that both start from the same point
            self.model.load_state_dict({k: torch.from_numpy(numpy.asarray(v)) for k, v in state.items()})
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def set_data(self, x, y):
        self.x, self.y = self.torch.from_numpy(x), self.torch.from_numpy(y)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss


def memory_child(framework, batch, size, base, steps=2):
    """Runs in a fresh process: peak memory of ``steps`` training steps, as JSON on stdout."""
    runner = OursRunner(base) if framework == "scratchseg" else TorchRunner(base)
    runner.set_data(*make_data(batch=1, size=16, seed=1))  # loads the kernels (Numba cache, oneDNN) first
    runner.step()
    runner.set_data(*make_data(batch=batch, size=size))
    report = {"framework": framework, "batch": batch, "size": size, "base": base}
    base_rss = _common.rss_bytes()
    report["hwm_reset"] = _common.reset_maxrss()
    for _ in range(steps):
        runner.step()
    report.update(baseline=base_rss, maxrss=_common.maxrss_bytes(), peak=_common.maxrss_bytes() - base_rss)
    print(json.dumps(report))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per framework (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds per framework (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: one per core)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"volumes per step (default {BATCH})")
    parser.add_argument("--size", type=int, default=SIZE, help=f"volume edge (default {SIZE}; a multiple of 8)")
    parser.add_argument("--base", type=int, default=BASE, help=f"first convolution's width (default {BASE})")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--memory-child", choices=("scratchseg", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size < 8 or args.size % 8:
        parser.error(f"--batch must be >= 1 and --size a positive multiple of 8, got {args.batch} and {args.size}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args.batch, args.size, args.base)

    print("\n".join(_common.environment_report("cpu")))
    ours = OursRunner(args.base)
    theirs = TorchRunner(args.base, ours.state_dict_numpy())
    x, y = make_data(batch=args.batch, size=args.size)
    ours.set_data(x, y)
    theirs.set_data(x, y)
    n_params = sum(p.numel() for p in theirs.model.parameters())
    print(f"3-D U-Net base {args.base}, depth {DEPTH} (four levels), {n_params / 1e6:.2f} M parameters, "
          f"batch {args.batch}x{IN_CHANNELS}x{args.size}x{args.size}x{args.size}, {CLASSES} classes, "
          f"SGD momentum 0.9, float32")

    # same weights, same data: the first losses agree before anything is timed
    rows = _common.compare_steps(ours, theirs, args.rounds, args.warmup, what="3-D U-Nets")
    if not args.no_memory:
        del ours, theirs  # the children measure in fresh processes
        extra = ["--batch", str(args.batch), "--size", str(args.size), "--base", str(args.base)]
        extra += ["--threads", str(args.threads)] if args.threads else []
        rows += _common.memory_rows(os.path.abspath(__file__), extra)
    _common.print_step_table(rows)
    return rows


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")

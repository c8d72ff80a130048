"""One U-Net training step: scratchseg vs PyTorch, time and peak memory.

    python benchmarks/train_step.py                  # CPU: scratchseg (NumPy + Numba) vs PyTorch CPU
    python benchmarks/train_step.py --backend cupy   # GPU: scratchseg on CuPy vs PyTorch CUDA
    python benchmarks/train_step.py --size 32        # small images: the same network on 8x3x32x32
    python benchmarks/train_step.py --net deeplab    # DeepLab v3+: atrous convolutions and ASPP
    python benchmarks/train_step.py --suite          # U-Net 128, 32, 16 and DeepLab v3+ 128, a ratio each

The network (built here from ``nn`` layers, the same code for both
frameworks, so it does not depend on ``scratchseg.models``): batch 8 of
3x128x128 images, four resolutions with 32-64-128-256 channels, two 3x3
conv + BatchNorm + ReLU per block, 2x2 max-pool down, 2x2 stride-2
transposed conv up, skip connections by concatenation, a 1x1 conv to 4
classes, pixel-wise cross-entropy, SGD with momentum 0.9.

``--net deeplab``: a DeepLab v3+ of the same scale (``make_deeplab``): a
backbone of stride-2 3x3 convolutions (32, 64, 128 channels) down to 1/8, two
atrous 3x3 convolutions (dilation 2) at 1/8 with 256 channels, ASPP (a 1x1
convolution, three 3x3 atrous ones at rates 3, 6 and 9 -- DeepLab's 6, 12, 18
scaled to a 16x16 map -- and global average pooling, 128 channels each), the
decoder that joins the 1/4 features (reduced to 48 channels) with the ASPP
output upsampled bilinearly, two 3x3 convolutions, a 1x1 to the classes and a
bilinear upsampling to the input size; BatchNorm and ReLU after every
convolution but the last.

Both start from the same weights (torch's, loaded into scratchseg); the first
step's losses are compared before anything is timed. Time: interleaved rounds
after warm-up in this process. Peak memory: each framework in a fresh child
process (see ``_common``), the resident-size high-water mark during the steps
minus the resident size before them.
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

BATCH, IN_CHANNELS, SIZE, CLASSES = 8, 3, 128, 4
WIDTHS = (32, 64, 128, 256)


def make_unet(nn, cat):
    """The benchmark U-Net as a class of framework ``nn`` (torch.nn or scratchseg.nn)."""

    def double_conv(c_in, c_out):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        )

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = WIDTHS
            self.down = nn.ModuleList([double_conv(IN_CHANNELS, w[0])] + [double_conv(w[i], w[i + 1]) for i in range(3)])
            self.pool = nn.MaxPool2d(2)
            self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(3))])
            self.merge = nn.ModuleList([double_conv(2 * w[i], w[i]) for i in reversed(range(3))])
            self.head = nn.Conv2d(w[0], CLASSES, 1)

        def forward(self, x):
            skips = []
            for i, block in enumerate(self.down):
                x = block(x if i == 0 else self.pool(x))  # (N, w[i], SIZE/2^i, SIZE/2^i)
                skips.append(x)
            x = skips.pop()
            for up, merge in zip(self.up, self.merge):
                x = merge(cat([up(x), skips.pop()], 1))  # (N, 2*w[i], ...) -> (N, w[i], ...)
            return self.head(x)  # (N, CLASSES, SIZE, SIZE)

    return UNet


def make_deeplab(nn, cat, interpolate):
    """The benchmark DeepLab v3+ as a class of framework ``nn`` (see the module docstring)."""

    def cbr(c_in, c_out, k=3, stride=1, dilation=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=dilation * (k // 2), dilation=dilation,
                                       bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    class ASPP(nn.Module):
        def __init__(self, c_in, c_out, rates):
            super().__init__()
            self.branches = nn.ModuleList([cbr(c_in, c_out, 1)] + [cbr(c_in, c_out, 3, dilation=r) for r in rates])
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), cbr(c_in, c_out, 1))
            self.project = cbr(c_out * (len(rates) + 2), c_out, 1)

        def forward(self, x):
            size = tuple(x.shape[-2:])
            pooled = interpolate(self.pool(x), size=size, mode="bilinear", align_corners=False)  # (N, c_out, h, w)
            return self.project(cat([b(x) for b in self.branches] + [pooled], 1))

    class DeepLabV3Plus(nn.Module):
        def __init__(self):
            super().__init__()
            w = WIDTHS
            self.low = nn.Sequential(cbr(IN_CHANNELS, w[0], stride=2), cbr(w[0], w[1], stride=2))  # 1/4
            self.high = nn.Sequential(cbr(w[1], w[2], stride=2), cbr(w[2], w[3], dilation=2),
                                      cbr(w[3], w[3], dilation=2))  # 1/8, atrous
            self.aspp = ASPP(w[3], 128, (3, 6, 9))
            self.reduce = cbr(w[1], 48, 1)
            self.decode = nn.Sequential(cbr(128 + 48, 128), cbr(128, 128))
            self.head = nn.Conv2d(128, CLASSES, 1)

        def forward(self, x):
            size = tuple(x.shape[-2:])
            low = self.low(x)  # (N, 64, H/4, W/4)
            high = self.aspp(self.high(low))  # (N, 128, H/8, W/8)
            high = interpolate(high, size=tuple(low.shape[-2:]), mode="bilinear", align_corners=False)
            y = self.head(self.decode(cat([high, self.reduce(low)], 1)))  # (N, CLASSES, H/4, W/4)
            return interpolate(y, size=size, mode="bilinear", align_corners=False)  # (N, CLASSES, H, W)

    return DeepLabV3Plus


def make_network(net, nn, cat, interpolate):
    """The benchmark network ``net`` ("unet" or "deeplab") as a class of framework ``nn``."""
    if net == "unet":
        return make_unet(nn, cat)
    if net == "deeplab":
        return make_deeplab(nn, cat, interpolate)
    raise ValueError(f"unknown benchmark network {net!r}; expected 'unet' or 'deeplab'")


def make_data(batch=BATCH, size=SIZE, seed=0):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, IN_CHANNELS, size, size), dtype=numpy.float32)
    y = rng.integers(0, CLASSES, (batch, size, size)).astype(numpy.int64)
    return x, y


def parse_with_data_args(parser, argv):
    """``parser.parse_args(argv)`` with ``--batch`` and ``--size`` (the step's images) added and checked."""
    parser.add_argument("--batch", type=int, default=BATCH, help=f"images per step (default {BATCH})")
    parser.add_argument("--size", type=int, default=SIZE,
                        help=f"image height and width (default {SIZE}; a multiple of 8, for the three poolings)")
    parser.add_argument("--net", choices=("unet", "deeplab"), default="unet",
                        help="the network: the U-Net (default) or DeepLab v3+ (atrous convolutions, ASPP)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size < 8 or args.size % 8:
        parser.error(f"--batch must be >= 1 and --size a positive multiple of 8, got {args.batch} and {args.size}")
    return args


class TorchRunner:
    def __init__(self, device, net="unet"):
        import torch

        torch.manual_seed(0)
        self.torch, self.device = torch, device
        self.model = make_network(net, torch.nn, torch.cat, torch.nn.functional.interpolate)().to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def set_data(self, x, y):
        self.x = self.torch.from_numpy(x).to(self.device)
        self.y = self.torch.from_numpy(y).to(self.device)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def state_dict_numpy(self):
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}


class OursRunner:
    def __init__(self, xp, state=None, net="unet"):
        import scratchseg.functional as F
        from scratchseg import nn, optim

        self.xp = xp
        self.model = make_network(net, nn, scratchseg.cat, F.interpolate)()
        if state is not None:
            self.model.load_state_dict(state)
        if xp.__name__ == "cupy":
            self.model.to("cuda")
        self.model.train()
        self.opt = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def set_data(self, x, y):
        self.x = scratchseg.Tensor(self.xp.asarray(x))
        self.y = self.xp.asarray(y)

    def step(self):
        import scratchseg.functional as F

        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss


def memory_child(framework, backend, steps=3, batch=BATCH, size=SIZE, net="unet"):
    """Runs in a fresh process: peak memory of ``steps`` training steps, as JSON on stdout."""
    xp, device = _common.setup_backend(backend)
    runner = OursRunner(xp, net=net) if framework == "scratchseg" else TorchRunner(device, net)
    # a tiny warm-up step loads kernels (Numba cache, oneDNN) before the baseline
    runner.set_data(*make_data(batch=2, size=32, seed=1))  # 2: the pooled ASPP branch has a batch norm
    runner.step()
    runner.set_data(*make_data(batch=batch, size=size))
    report = {"framework": framework, "device": device, "batch": batch, "size": size}
    if device == "cpu":
        base = _common.rss_bytes()
        report["hwm_reset"] = _common.reset_maxrss()
        for _ in range(steps):
            runner.step()
        report.update(baseline=base, maxrss=_common.maxrss_bytes(), peak=_common.maxrss_bytes() - base)
    else:
        if framework == "torch":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_reserved()
            for _ in range(steps):
                runner.step()
            torch.cuda.synchronize()
            report.update(baseline=base, peak=torch.cuda.max_memory_reserved() - base)
        else:
            import cupy

            pool = cupy.get_default_memory_pool()
            cupy.cuda.Device().synchronize()
            base = pool.total_bytes()
            for _ in range(steps):
                runner.step()
            cupy.cuda.Device().synchronize()
            report.update(baseline=base, peak=pool.total_bytes() - base)
    print(json.dumps(report))


def idle_burn(runner, repeats=3):
    """CPU seconds (user + sys, all threads) the process burns in 0.2 s of sleep right after a step: the median.

    What a library leaves spinning (BLAS or OpenMP workers) is paid by whatever else runs on the machine.
    """
    import resource

    burns = []
    for _ in range(repeats):
        runner.step()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(0.2)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        burns.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return float(numpy.median(burns))


# --suite: (network, image size) of each configuration, the first one with its peak memory
SUITE = (("unet", 128), ("unet", 32), ("unet", 16), ("deeplab", 128))


def measure(args, xp, device, net, size, memory):
    """One configuration: first losses compared, times interleaved, idle CPU after a step, peak memory."""
    theirs = TorchRunner(device, net)
    ours = OursRunner(xp, theirs.state_dict_numpy(), net)
    x, y = make_data(batch=args.batch, size=size)
    theirs.set_data(x, y)
    ours.set_data(x, y)
    n_params = sum(p.numel() for p in theirs.model.parameters())
    title = "U-Net " + str(WIDTHS) if net == "unet" else "DeepLab v3+ (atrous 1/8, ASPP rates 3, 6, 9)"
    print(f"\n{title}, {n_params / 1e6:.2f} M parameters, batch {args.batch}x{IN_CHANNELS}x{size}x{size}, "
          f"{CLASSES} classes, SGD momentum 0.9")

    # same weights, same data: the first losses agree before anything is timed
    what = "U-Nets" if net == "unet" else "DeepLabs"
    rows = _common.compare_steps(ours, theirs, args.rounds, args.warmup, device, what=what)
    if device == "cpu":
        b_ours, b_theirs = idle_burn(ours), idle_burn(theirs)
        rows.append({"measure": "CPU s burnt in 0.2 s idle after a step", "scratchseg med": b_ours,
                     "torch med": b_theirs, "ratio": b_ours / max(b_theirs, 1e-6)})
    if memory:
        del ours, theirs  # the children measure in fresh processes
        extra = ["--backend", args.backend, "--batch", str(args.batch), "--size", str(size), "--net", net]
        extra += ["--threads", str(args.threads)] if args.threads else []
        extra += ["--no-tf32"] if args.no_tf32 else ["--tf32"] if args.tf32 else []

        def check(m):
            if (m["batch"], m["size"]) != (args.batch, size):
                raise AssertionError(f"the memory child measured batch {m['batch']} of size {m['size']}, "
                                     f"not the timed {args.batch} of {size}")

        rows += _common.memory_rows(os.path.abspath(__file__), extra, device, check)
    _common.print_step_table(rows)
    return rows


def main(argv=None):
    parser = _common.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--memory-child", choices=("scratchseg", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--suite", action="store_true",
                        help="measure " + ", ".join(f"{n} {s}" for n, s in SUITE) + " (--net and --size are ignored; "
                             "peak memory of the first only), then a summary of the ratios")
    args = parse_with_data_args(parser, argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _common.apply_precision(args, "cuda" if args.backend == "cupy" else "cpu")
        return memory_child(args.memory_child, args.backend, batch=args.batch, size=args.size, net=args.net)

    xp, device = _common.setup_backend(args.backend)
    lines, _ = _common.where_report(device)
    print("\n".join(lines))
    print(_common.apply_precision(args, device))
    configs = SUITE if args.suite else ((args.net, args.size),)
    results = []
    for k, (net, size) in enumerate(configs):
        rows = measure(args, xp, device, net, size, memory=not args.no_memory and k == 0)
        results.append((net, size, rows))
    if len(results) > 1:
        print("\nsummary (ratio = scratchseg / torch, medians):")
        summary = [{"network": f"{net} {args.batch}x{IN_CHANNELS}x{size}x{size}", "measure": row["measure"],
                    "scratchseg": row["scratchseg med"], "torch": row["torch med"], "ratio": row["ratio"]}
                   for net, size, rows in results for row in rows]
        _common.print_table(summary, ["network", "measure", "scratchseg", "torch", "ratio"])
    return results[0][2] if len(results) == 1 else results


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")

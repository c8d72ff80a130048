"""Train the same U-Net from the same initial weights on the same batches in scratchseg and in PyTorch.

Both sides get identical NumPy batches from ``scratchseg.data.Loader`` (the
shapes dataset, seeded), the same Adam settings and the same poly schedule;
PyTorch's model is a mirror of ``scratchseg.models.unet`` with the same
state-dict names, so scratchseg's initial weights are loaded into it as they
are. The script prints both loss curves epoch by epoch, both final validation
scores (computed by the same metrics code from each model's predictions), the
largest parameter difference at the end, and the time each side took.

In float64 the two runs stay equal to many digits; in float32 rounding
differences grow slowly during training (as between two PyTorch builds), so
the curves agree within noise rather than bit for bit.

    python benchmarks/train_vs_torch.py                     # float32, a few minutes on 2 cores
    python benchmarks/train_vs_torch.py --dtype float64 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import scratchseg  # noqa: E402
import scratchseg.functional as F  # noqa: E402
from scratchseg import models, optim  # noqa: E402
from scratchseg.data import Loader, shapes  # noqa: E402
from scratchseg.metrics import ConfusionMatrix  # noqa: E402


# ------------------------------------------------------- the torch mirror
class DoubleConv(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.relu1 = tnn.ReLU()
        self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.relu2 = tnn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class Up(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.upsample = tnn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = DoubleConv(2 * cout, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.upsample(x)], dim=1))


class TorchUNet(tnn.Module):
    """scratchseg's padded U-Net (batchnorm, transposed up-sampling), same names, same shapes."""

    def __init__(self, num_classes, in_channels, base, depth):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = tnn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(DoubleConv(c, w))
            c = w
        self.pool = tnn.MaxPool2d(2)
        self.up = tnn.ModuleList([Up(widths[i + 1], widths[i]) for i in reversed(range(depth))])
        self.head = tnn.Conv2d(base, num_classes, 1)

    def forward(self, x):
        skips = []
        for i, level in enumerate(self.down):
            x = level(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return self.head(x)


# ----------------------------------------------------------------- the run
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=384)
    p.add_argument("--n-val", type=int, default=48)
    p.add_argument("--base", type=int, default=8)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    scratchseg.set_default_dtype(dtype)
    scratchseg.manual_seed(args.seed)
    task = shapes.make_task(n_train=args.n_train, n_val=args.n_val, n_test=0, size=args.size, seed=args.seed)
    K = task.num_classes

    ours = models.create("unet", num_classes=K, in_channels=3, base=args.base, depth=args.depth)
    theirs = TorchUNet(K, 3, args.base, args.depth).to(getattr(torch, args.dtype))
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})

    loader = Loader(task.split("train"), batch_size=args.batch_size, shuffle=True, seed=args.seed, drop_last=True,
                    mean=task.mean, std=task.std, dtype=dtype)
    total = args.epochs * len(loader)
    opt_s = optim.Adam(list(ours.parameters()), lr=args.lr)
    sched_s = optim.PolyLR(opt_s, max_iters=total, power=0.9)
    opt_t = torch.optim.Adam(theirs.parameters(), lr=args.lr)
    sched_t = torch.optim.lr_scheduler.LambdaLR(opt_t, lambda t: max(1 - t / total, 0.0) ** 0.9)

    def evaluate(predict):
        cm = ConfusionMatrix(K)
        val = Loader(task.split("val"), batch_size=16, mean=task.mean, std=task.std, dtype=dtype)
        for x, y, _ in val.batches():
            cm.update(predict(x), y)
        return cm.compute()

    def predict_ours(x):
        ours.eval()
        with scratchseg.no_grad():
            out = ours(scratchseg.Tensor(x)).data.argmax(1)
        ours.train()
        return out

    def predict_theirs(x):
        theirs.eval()
        with torch.no_grad():
            out = theirs(torch.from_numpy(x)).argmax(1).numpy()
        theirs.train()
        return out

    print(f"U-Net base {args.base} depth {args.depth} ({ours.num_parameters():,} parameters), shapes {args.size}x"
          f"{args.size}, {args.n_train} train / {args.n_val} val images, batch {args.batch_size}, Adam lr {args.lr} "
          f"poly, {args.epochs} epochs x {len(loader)} iterations, {args.dtype}, torch {torch.__version__} "
          f"({args.threads} threads), scratchseg kernels {scratchseg.backend.kernels()}")
    print(f"{'epoch':>5} {'loss scratchseg':>16} {'loss torch':>12} {'rel diff':>9} {'mIoU scratchseg':>16} "
          f"{'mIoU torch':>11} {'s scratchseg':>13} {'s torch':>8}")
    time_s = time_t = 0.0
    for epoch in range(args.epochs):
        losses_s, losses_t = [], []
        for x, y, _ in loader.batches(epoch):
            t0 = time.perf_counter()
            loss = F.cross_entropy(ours(scratchseg.Tensor(x)), y)
            opt_s.zero_grad()
            loss.backward()
            opt_s.step()
            sched_s.step()
            losses_s.append(float(loss.item()))
            t1 = time.perf_counter()
            loss_t = TF.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
            opt_t.zero_grad()
            loss_t.backward()
            opt_t.step()
            sched_t.step()
            losses_t.append(float(loss_t.item()))
            t2 = time.perf_counter()
            time_s += t1 - t0
            time_t += t2 - t1
        ls, lt = np.mean(losses_s), np.mean(losses_t)
        ms, mt = evaluate(predict_ours)["miou"], evaluate(predict_theirs)["miou"]
        print(f"{epoch + 1:>5} {ls:>16.6f} {lt:>12.6f} {abs(ls - lt) / abs(lt):>9.2e} {ms:>16.4f} {mt:>11.4f} "
              f"{time_s:>13.1f} {time_t:>8.1f}")
    final_s, final_t = evaluate(predict_ours), evaluate(predict_theirs)
    worst = max(float(np.max(np.abs(np.array(v) - theirs.state_dict()[k].numpy())) /
                      (np.max(np.abs(np.array(v))) + 1e-12))
                for k, v in ours.state_dict().items() if np.asarray(v).dtype.kind == "f")
    print(f"final val mIoU: scratchseg {final_s['miou']:.4f}, torch {final_t['miou']:.4f}; "
          f"pixel acc {final_s['pixel_acc']:.4f} vs {final_t['pixel_acc']:.4f}")
    print("per-class IoU scratchseg: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(task.class_names,
                                                                                  final_s["per_class_iou"])))
    print("per-class IoU torch:      " + ", ".join(f"{n} {v:.3f}" for n, v in zip(task.class_names,
                                                                                  final_t["per_class_iou"])))
    print(f"largest parameter difference after training (relative to the tensor's max): {worst:.2e}")
    print(f"training time: scratchseg {time_s:.1f} s, torch {time_t:.1f} s")


if __name__ == "__main__":
    main()

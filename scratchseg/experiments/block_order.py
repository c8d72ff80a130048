"""``block-order``: conv -> batch norm -> activation -> dropout -> pool, and its permutations.

Two measurements.

1. Which orders compute the same function. Pairs of operations are applied
   in both orders to the same random input (float64, the same weights, the
   same dropout mask) and the largest absolute difference of the two outputs
   is reported: 0 means the orders are the same function, a difference of a
   few units in the last place means the same function up to rounding,
   anything larger means a different function. Max-pooling commutes with any
   non-decreasing function applied element-wise (``max(f(a), f(b)) =
   f(max(a, b))``): ReLU, sigmoid, and a batch norm at evaluation time, which
   is a per-channel affine map with a positive scale. Average-pooling commutes
   with affine maps (both linear) but not with ReLU. Batch norm in training
   mode normalises by the statistics of whatever it is given, so moving it past
   a ReLU or a pooling changes what it computes.

2. What each order does to training: the same small network (a stem
   convolution, three blocks in the order under test, a 1x1 classifier and a
   bilinear up-sampling) is trained from the same seeds with each order, and
   the validation mIoU after every epoch is recorded.

The network, ``SmallFCN``, is also what ``dropout-activation`` and
``batchnorm-small-batch`` train.
"""

from __future__ import annotations

import numpy

from .. import functional as F
from .. import manual_seed, nn
from ..autograd import Tensor, no_grad
from ._common import compare, fit, fmt_ms, line_plot, markdown_table, mean_std

NAME = "block-order"
SUMMARY = "conv/bn/act/dropout/pool in different orders: which are the same function, how each trains"
QUESTION = ("In which order should a block apply convolution, batch norm, activation, dropout and pooling: "
            "which orders compute the same function, and how does the order change training?")
TAKES_DATA = True
QUICK_SEEDS = 1

# Full and quick set-ups. The full one trains 192 images of 24x24 for 6 epochs per run (sized for a shared
# two-core machine). `cells` rather than `shapes`: a network this small learns cells within a few epochs,
# shapes needs many more.
FULL = dict(data="cells:n_train=192,n_val=32,n_test=0,size=24", epochs=6, width=12, dropout=0.1, lr=0.01,
            batch_size=8)
QUICK = dict(data="cells:n_train=32,n_val=16,n_test=0,size=16", epochs=2, width=8, dropout=0.1, lr=0.01,
             batch_size=8)

REFERENCE = "conv-bn-act-dropout-pool"
ORDERS = [  # (order, what it changes compared with the reference)
    (REFERENCE, "the usual block"),
    ("conv-bn-pool-act-dropout", "pool before the activation"),
    ("conv-act-bn-dropout-pool", "batch norm after the activation"),
    ("conv-dropout-bn-act-pool", "dropout before batch norm"),
    ("bn-act-conv-dropout-pool", "pre-activation (norm and activation before the conv)"),
]


class SmallFCN(nn.Module):
    """A stem convolution, a Sequential of blocks, a 1x1 classifier, bilinear up-sampling to the input size.

    ``blocks`` is a list of modules taking ``width`` channels in and giving
    ``out_width`` out (the poolings inside them shrink the map; the
    up-sampling restores it).

    Shape:
        (N, in_channels, H, W) -> stem (N, width, H, W) -> blocks (N, out_width, h, w)
        -> head (N, num_classes, h, w) -> (N, num_classes, H, W)
    """

    def __init__(self, in_channels, num_classes, blocks, width, out_width):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(out_width, num_classes, 1)

    def forward(self, x):
        y = self.head(self.blocks(self.stem(x)))  # (N, K, h, w)
        return F.interpolate(y, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)  # (N, K, H, W)


def convblock_net(task, order, width, dropout, norm="batch", activation="relu"):
    """``SmallFCN`` whose three blocks are ``nn.ConvBlock``s in ``order``: width -> width (pool),
    width -> 2 width (pool), 2 width -> 2 width (no pool: ``-pool`` removed from the order)."""
    last = "-".join(p for p in order.split("-") if p != "pool")
    blocks = [
        nn.ConvBlock(width, width, order=order, pool="max", dropout=dropout, norm=norm, activation=activation),
        nn.ConvBlock(width, 2 * width, order=order, pool="max", dropout=dropout, norm=norm, activation=activation),
        nn.ConvBlock(2 * width, 2 * width, order=last, dropout=dropout, norm=norm, activation=activation),
    ]
    return SmallFCN(task.in_channels, task.num_classes, blocks, width, 2 * width)


# ------------------------------------------------------------------ 1. equal functions
def _bn(x, stats, training):
    """Batch norm of (N, C, H, W) ``x`` with ``stats`` = (running mean, running var, weight, bias); in
    training mode on copies of the running statistics (batch_norm updates them in place)."""
    rm, rv, w, b = stats
    return F.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)


def _pairs(rng, C):
    """(what, first order, second order, mode, f, g): two functions of an (N, C, H, W) Tensor."""
    stats = (rng.standard_normal(C), rng.uniform(0.5, 2.0, C), rng.uniform(0.5, 2.0, C), rng.standard_normal(C))
    mask_seed = int(rng.integers(2 ** 31))

    def drop(t):  # the same mask on both sides: a generator seeded alike
        return F.dropout(t, 0.5, generator=numpy.random.default_rng(mask_seed))

    def mp(t):
        return F.max_pool2d(t, 2)

    def ap(t):
        return F.avg_pool2d(t, 2)

    def bn_train(t):
        return _bn(t, stats, True)

    def bn_eval(t):
        return _bn(t, stats, False)

    return [
        ("max-pool, ReLU", "relu-pool", "pool-relu", "any", lambda t: mp(F.relu(t)), lambda t: F.relu(mp(t))),
        ("max-pool, sigmoid", "sigmoid-pool", "pool-sigmoid", "any",
         lambda t: mp(F.sigmoid(t)), lambda t: F.sigmoid(mp(t))),
        ("avg-pool, ReLU", "relu-pool", "pool-relu", "any", lambda t: ap(F.relu(t)), lambda t: F.relu(ap(t))),
        ("batch norm, ReLU", "bn-relu", "relu-bn", "train",
         lambda t: F.relu(bn_train(t)), lambda t: bn_train(F.relu(t))),
        ("batch norm, max-pool", "bn-pool", "pool-bn", "train", lambda t: mp(bn_train(t)), lambda t: bn_train(mp(t))),
        ("batch norm, max-pool", "bn-pool", "pool-bn", "eval", lambda t: mp(bn_eval(t)), lambda t: bn_eval(mp(t))),
        ("batch norm, avg-pool", "bn-pool", "pool-bn", "eval", lambda t: ap(bn_eval(t)), lambda t: bn_eval(ap(t))),
        ("dropout (same mask), ReLU", "relu-dropout", "dropout-relu", "train",
         lambda t: drop(F.relu(t)), lambda t: F.relu(drop(t))),
    ]


def verdict(diff, scale):
    """'identical' (0), 'equal up to rounding' (at most 1e-12 of the values' size in float64) or 'different'."""
    if diff == 0:
        return "identical"
    if diff <= 1e-12 * max(1.0, scale):
        return "equal up to rounding"
    return "different"


def _block_pairs(rng, C_in, C):
    """Whole ``nn.ConvBlock``s built in two orders with the same weights: (what, a, b, mode, block_a, block_b)."""
    out = []
    for a, b, mode in (("conv-bn-act-pool", "conv-bn-pool-act", "train"),
                       ("conv-bn-act-pool", "conv-pool-bn-act", "train"),
                       ("conv-bn-act-pool", "conv-pool-bn-act", "eval"),
                       ("conv-bn-act-dropout-pool", "conv-bn-pool-act-dropout", "eval")):
        blocks = [nn.ConvBlock(C_in, C, order=o, pool="max", dropout=0.1 if "dropout" in o else 0.0).double()
                  for o in (a, b)]
        weight = rng.standard_normal((C, C_in, 3, 3))
        stats = (rng.standard_normal(C), rng.uniform(0.5, 2.0, C), rng.uniform(0.5, 2.0, C), rng.standard_normal(C))
        for block in blocks:  # the same weights in both; a conv bias (no norm right after) stays zero
            block.conv.weight.data[...] = weight
            if block.conv.bias is not None:
                block.conv.bias.data[...] = 0.0
            for name, value in zip(("running_mean", "running_var", "weight", "bias"), stats):
                held = getattr(block.bn, name)  # a Parameter (weight, bias) or a plain array (buffers)
                (held.data if isinstance(held, Tensor) else held)[...] = value
            block.train(mode == "train")
        out.append(("ConvBlock", a, b, mode, blocks[0], blocks[1]))
    return out


def equivalences(seed=0, shape=(2, 4, 8, 8)):
    """Measure which orders compute the same function: a list of dicts
    ``{what, a, b, mode, max_abs_diff, max_abs_value, values, verdict}`` (float64 throughout)."""
    rng = numpy.random.default_rng(seed)
    N, C, H, W = shape
    x = Tensor(rng.standard_normal(shape))  # (N, C, H, W) float64
    rows = []
    with no_grad():
        for what, a, b, mode, f, g in _pairs(rng, C):
            ya, yb = f(x).data, g(x).data
            rows.append((what, a, b, mode, ya, yb))
        xi = Tensor(rng.standard_normal((N, 3, H, W)))  # a block's input: 3 channels in
        for what, a, b, mode, ba, bb in _block_pairs(rng, 3, C):
            rows.append((what, a, b, mode, ba(xi).data, bb(xi).data))
    out = []
    for what, a, b, mode, ya, yb in rows:
        diff = float(numpy.abs(ya - yb).max())
        scale = float(numpy.abs(ya).max())
        out.append(dict(what=what, a=a, b=b, mode=mode, max_abs_diff=diff, max_abs_value=scale,
                        values=int(ya.size), verdict=verdict(diff, scale)))
    return out


def same_at_init(task, order, width, dropout, seed):
    """Max |difference| in eval mode between the reference network and ``order``'s, both freshly built with
    the reference's weights copied over; None when the two have different parameters (names or shapes)."""
    manual_seed(seed)
    ref = convblock_net(task, REFERENCE, width, dropout)
    manual_seed(seed)
    other = convblock_net(task, order, width, dropout)
    ref_state, other_state = ref.state_dict(), other.state_dict()
    if set(ref_state) != set(other_state) or any(ref_state[k].shape != other_state[k].shape for k in ref_state):
        return None
    other.load_state_dict(ref_state)
    x = Tensor(numpy.random.default_rng(seed).standard_normal((2, task.in_channels, 16, 16)).astype(numpy.float32))
    ref.eval(), other.eval()
    with no_grad():
        return float(numpy.abs(ref(x).data - other(x).data).max())


# ------------------------------------------------------------------ the experiment
def _fmt_diff(d):
    return "0" if d == 0 else f"{d:.1e}"


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["data"], QUICK["data"])
    checks = equivalences(seed=0)
    ctx.record("equivalences", {"checks": checks})

    keys = [f"{order}/seed{s}" for order, _ in ORDERS for s in ctx.seeds]
    ctx.expect(["equivalences"] + keys)
    runs = {}
    for order, _ in ctx.progress(ORDERS, total=len(ORDERS), desc="orders"):
        init_diff = same_at_init(task, order, cfg["width"], cfg["dropout"], ctx.seeds[0])
        for s in ctx.seeds:
            manual_seed(s)  # the initial weights
            model = convblock_net(task, order, cfg["width"], cfg["dropout"])
            result = fit(model, task, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=s)
            result.update(order=order, seed=s, parameters=model.num_parameters(), init_diff_vs_reference=init_diff)
            ctx.record(f"{order}/seed{s}", result)
            runs.setdefault(order, []).append(result)

    # ---- the numbers
    results = {"equivalences": checks, "orders": {}, "setup": dict(cfg, data=ctx.data or cfg["data"])}
    ref_final = [r["val_miou"][-1] for r in runs[REFERENCE] if not r["diverged"]]
    rows, findings = [], []
    for order, change in ORDERS:
        rs = runs[order]
        finals = [r["val_miou"][-1] for r in rs if not r["diverged"]]
        steps = [r["step_seconds"] for r in rs if r["step_seconds"]]
        m, s = mean_std(finals) if finals else (None, None)
        ms, ss = mean_std(steps) if steps else (None, None)
        init_diff = rs[0]["init_diff_vs_reference"]
        results["orders"][order] = dict(change=change, final_miou=finals, miou_mean=m, miou_std=s,
                                        step_seconds_mean=ms, diverged=sum(r["diverged"] for r in rs),
                                        init_diff_vs_reference=init_diff)
        same = ("different parameters" if init_diff is None
                else f"{'same' if init_diff < 1e-5 else 'different'} (max diff {_fmt_diff(init_diff)})")
        rows.append([f"`{order}`", change, fmt_ms(m, s, percent=True) if finals else "diverged",
                     f"{1000 * ms:.1f}" if steps else "-", same])
        if order != REFERENCE and finals and ref_final:
            findings.append(compare(f"`{order}`", finals, f"`{REFERENCE}`", ref_final, what="final val mIoU"))
    eq_rows = [[c["what"], c["mode"], f"`{c['a']}` vs `{c['b']}`", _fmt_diff(c["max_abs_diff"]), c["verdict"]]
               for c in checks]
    same = [f"{c['what']} ({c['mode']} mode): `{c['a']}` and `{c['b']}` are the same function (max |difference| "
            f"0 over {c['values']} outputs)." for c in checks if c["verdict"] == "identical"]
    rounding = [f"{c['what']} ({c['mode']} mode): `{c['a']}` and `{c['b']}` agree up to rounding (max |difference| "
                f"{c['max_abs_diff']:.1e})." for c in checks if c["verdict"] == "equal up to rounding"]
    different = [f"{c['what']} (`{c['a']}` vs `{c['b']}`, {c['mode']} mode, max |difference| {c['max_abs_diff']:.2g})"
                 for c in checks if c["verdict"] == "different"]
    findings = same + rounding + (["Orders that compute different functions: " + "; ".join(different) + "."]
                                  if different else []) + findings
    pool_first = results["orders"].get("conv-bn-pool-act-dropout", {})
    ref_info = results["orders"][REFERENCE]
    if pool_first.get("step_seconds_mean") and ref_info.get("step_seconds_mean"):
        ratio = pool_first["step_seconds_mean"] / ref_info["step_seconds_mean"]
        findings.append(f"Pooling before the activation and dropout makes a training step take {ratio:.2f}x the "
                        "reference's time (the activation and dropout see a quarter of the pixels; step times "
                        "measured on a shared machine).")
    epochs = list(range(1, cfg["epochs"] + 1))
    line_plot(ctx.plot_path("val_miou.png"), epochs,
              {order: [r["val_miou"] for r in runs[order] if not r["diverged"]] or [[None] * len(epochs)]
               for order, _ in ORDERS},
              "epoch", "validation mIoU", "Block order: validation mIoU (mean ± std over seeds)")
    table = ("Which orders compute the same function (float64, random input, same weights):\n\n"
             + markdown_table(["operations", "mode", "orders", "max abs diff", "verdict"], eq_rows)
             + "\n\nTraining (final validation mIoU in %, mean ± std over seeds; step time in ms):\n\n"
             + markdown_table(["order", "what changes", "final val mIoU", "step ms", "same function as reference "
                               "at init (eval mode)"], rows))
    ctx.finish(results, table, findings)

"""Check hand-written backward passes against central finite differences.

``gradcheck(fn, inputs)`` is the tool to reach for after writing a layer of
your own: it compares the gradient your ``backward`` computes with

    dL/dx_j ~ (L(x + eps e_j) - L(x - eps e_j)) / (2 eps)

in float64, and says where the two disagree most. Example: a custom
``Function`` for ``y = x^3`` with a deliberately wrong backward::

    >>> import numpy as np, scratchseg
    >>> from scratchseg.gradcheck import gradcheck
    >>> class Cube(scratchseg.Function):
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         ctx.x = x
    ...         return x ** 3
    ...     @staticmethod
    ...     def backward(ctx, dout):
    ...         return 3 * ctx.x ** 2 * dout      # dx = 3 x^2 dout
    >>> x = scratchseg.Tensor(np.linspace(-1, 1, 6).reshape(2, 3), requires_grad=True)
    >>> gradcheck(Cube.apply, (x,))
    True
    >>> class BadCube(Cube):
    ...     @staticmethod
    ...     def backward(ctx, dout):
    ...         return 2 * ctx.x ** 2 * dout      # wrong factor
    >>> gradcheck(BadCube.apply, (x,), raise_exception=False)
    False

A layer's parameters are checked by passing them as inputs: they are
perturbed in place, so a module that holds them sees the change::

    >>> from scratchseg import nn
    >>> conv = nn.Conv2d(2, 3, 3).double()
    >>> x = scratchseg.Tensor(np.random.default_rng(0).random((1, 2, 5, 5)), requires_grad=True)
    >>> gradcheck(lambda x, *params: conv(x), (x, *conv.parameters()))
    True

How it compares:

* every Tensor input with ``requires_grad=True`` is checked (a floating NumPy
  or CuPy array is wrapped as one); other inputs are passed through as they are;
* the outputs are contracted with a fixed random upstream gradient ``v``
  (never a sum of ones, which hides transposition bugs): L = <v, f(x)>;
* small inputs (at most ``max_full_jacobian`` checked elements): every
  element is perturbed; when the output is small too the full Jacobian is
  compared entry by entry, otherwise each ``(J^T v)_j``;
* large inputs: ``num_directions`` random directions ``u`` per input, the
  directional derivative (L(x + eps u) - L(x - eps u)) / (2 eps) against
  ``<J^T v, u>``;
* an entry passes when ``|analytical - numerical| <= atol + rtol * |numerical|``.

Inputs that are checked must be float64: float32 finite differences are
noise. Call ``.double()`` on a module first.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy

from . import backend
from . import random as _random
from .autograd import Tensor, no_grad

__all__ = ["gradcheck", "GradcheckError", "GradcheckResult", "check_gradients", "check_builtin_ops"]


class GradcheckError(RuntimeError):
    """The analytical and numerical gradients disagree (the message says where)."""


@dataclass
class GradcheckResult:
    """What ``check_gradients`` found.

    ``input_index``: which input the worst entry belongs to; ``position``: its
    index in that input (in ``"full"`` mode also the output entry, as
    ``(output index, output position)`` in ``output``), or the direction
    number in ``"directional"`` mode; ``rel_error``: |a - n| / max(|n|, atol).
    """

    passed: bool
    mode: str
    input_index: int = -1
    position: tuple = ()
    output: tuple = ()
    analytical: float = 0.0
    numerical: float = 0.0
    rel_error: float = 0.0
    checked: int = 0

    def describe(self):
        where = f"input {self.input_index}"
        if self.mode == "directional":
            where += f", random direction {self.position[0]}"
        else:
            where += f" at position {self.position}"
            if self.output:
                where += f", output {self.output[0]} at {self.output[1]}"
        return (
            f"{where}: analytical {self.analytical:.10g}, numerical {self.numerical:.10g}, "
            f"relative error {self.rel_error:.3e} ({self.mode} mode, {self.checked} entries checked)"
        )


# ----------------------------------------------------------------- helpers
def _prepare_inputs(inputs):
    """Wrap floating arrays as Tensors that require grad; find the checked ones."""
    if isinstance(inputs, Tensor) or (hasattr(inputs, "shape") and hasattr(inputs, "dtype")):
        inputs = (inputs,)
    args, checked = [], []
    for i, a in enumerate(inputs):
        if not isinstance(a, Tensor) and hasattr(a, "dtype") and numpy.dtype(a.dtype).kind == "f":
            a = Tensor(a.astype(numpy.float64), requires_grad=True)
        if isinstance(a, Tensor) and a.requires_grad:
            if a.dtype != numpy.float64:
                raise TypeError(
                    f"gradcheck input {i} has dtype {a.dtype}; finite differences need float64 "
                    "(use .double() on tensors and modules)"
                )
            checked.append(i)
        args.append(a)
    if not checked:
        raise ValueError("gradcheck needs at least one input that requires grad (a float64 Tensor or array)")
    return args, checked


def _outputs(result):
    """The function's output(s) as a list of Tensors."""
    outs = list(result) if isinstance(result, (tuple, list)) else [result]
    fixed = []
    for k, o in enumerate(outs):
        if not isinstance(o, Tensor):
            if not hasattr(o, "shape"):
                raise TypeError(f"gradcheck: output {k} is a {type(o).__name__}, expected a Tensor")
            o = Tensor(o)
        if o.dtype.kind != "f":
            raise TypeError(f"gradcheck: output {k} has dtype {o.dtype}, expected floating point")
        fixed.append(o)
    return fixed


def _loss_value(outs, vs):
    """L = sum_k <v_k, out_k> as a Python float (float64)."""
    return float(sum(float((backend.asnumpy(o.data).astype(numpy.float64) * v).sum()) for o, v in zip(outs, vs)))


def _vector(outs):
    return numpy.concatenate([backend.asnumpy(o.data).astype(numpy.float64).ravel() for o in outs])


def _clear_grads(args, checked):
    for i in checked:
        args[i].grad = None


def _grad_of(arg):
    g = arg.grad
    return numpy.zeros(arg.shape) if g is None else backend.asnumpy(g).astype(numpy.float64)


class _Scorer:
    """Keeps the entry with the largest |a - n| / (atol + rtol |n|)."""

    def __init__(self, mode, atol, rtol):
        self.mode, self.atol, self.rtol = mode, atol, rtol
        self.best_ratio, self.result, self.checked = -1.0, GradcheckResult(True, mode), 0

    def add(self, analytical, numerical, make_location):
        """``analytical``, ``numerical``: arrays of the same shape; ``make_location(flat_index)``."""
        a, n = numpy.asarray(analytical, dtype=numpy.float64), numpy.asarray(numerical, dtype=numpy.float64)
        self.checked += a.size
        if a.size == 0:
            return
        diff = numpy.abs(a - n)
        ratio = diff / (self.atol + self.rtol * numpy.abs(n))
        ratio = numpy.where(numpy.isfinite(ratio), ratio, numpy.inf)
        j = int(numpy.argmax(ratio))
        if ratio.flat[j] > self.best_ratio:
            self.best_ratio = float(ratio.flat[j])
            input_index, position, output = make_location(j)
            av, nv = float(a.flat[j]), float(n.flat[j])
            rel = abs(av - nv) / max(abs(nv), self.atol)
            self.result = GradcheckResult(
                bool(self.best_ratio <= 1.0), self.mode, input_index, position, output, av, nv, rel
            )

    def final(self):
        self.result.checked = self.checked
        if self.best_ratio < 0:
            self.result.passed = True
        return self.result


# ------------------------------------------------------------- the check
def check_gradients(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, max_full_jacobian=256, num_directions=8, seed=0):
    """Run the comparison and return a ``GradcheckResult`` (never raises on a mismatch).

    See the module docstring for what is compared; ``gradcheck`` wraps this.
    """
    args, checked = _prepare_inputs(inputs)
    rng = numpy.random.default_rng(seed)
    saved_grads = {i: args[i].grad for i in checked}

    # analytical: one forward with a graph, one backward of L = <v, f(x)>
    _clear_grads(args, checked)
    outs = _outputs(fn(*args))
    vs = [rng.standard_normal(o.shape) for o in outs]
    graph = [k for k, o in enumerate(outs) if o.requires_grad]
    n_out = sum(o.data.size for o in outs)
    n_in = sum(args[i].data.size for i in checked)
    full = n_in <= max_full_jacobian
    full_jacobian = full and n_out <= max_full_jacobian

    def backward_into_grads(o, upstream):
        xp = backend.get_array_module(o.data)
        o.backward(xp.asarray(upstream.astype(o.dtype)), retain_graph=True)

    try:
        for k in graph:
            backward_into_grads(outs[k], vs[k])
        vjp = {i: _grad_of(args[i]) for i in checked}  # (J^T v) per input

        if full_jacobian:
            # analytical J row by row: backward of each one-hot output entry
            rows = numpy.zeros((n_out, n_in))
            offsets, start = {}, 0
            for i in checked:
                offsets[i] = start
                start += args[i].data.size
            r = 0
            for k, o in enumerate(outs):
                for e in range(o.data.size):
                    if k in graph:
                        _clear_grads(args, checked)
                        onehot = numpy.zeros(o.data.size)
                        onehot[e] = 1.0
                        backward_into_grads(o, onehot.reshape(o.shape))
                        for i in checked:
                            rows[r, offsets[i] : offsets[i] + args[i].data.size] = _grad_of(args[i]).ravel()
                    r += 1
    finally:
        for i in checked:
            args[i].grad = saved_grads[i]

    out_index = []  # flat output entry -> (output number, position)
    if full_jacobian:
        for k, o in enumerate(outs):
            out_index.extend((k, tuple(int(t) for t in numpy.unravel_index(e, o.shape))) for e in range(o.data.size))

    def evaluate():
        with no_grad():
            return _outputs(fn(*args))

    scorer = _Scorer("full" if full else "directional", atol, rtol)
    if full:
        for i in checked:
            data = args[i].data
            shape = data.shape
            for j in range(data.size):
                idx = tuple(int(t) for t in numpy.unravel_index(j, shape))
                original = data[idx].copy()
                data[idx] = original + eps
                plus = evaluate()
                data[idx] = original - eps
                minus = evaluate()
                data[idx] = original
                location = lambda flat, i=i, idx=idx: (i, idx, out_index[flat] if out_index else ())  # noqa: E731
                if full_jacobian:
                    column = (_vector(plus) - _vector(minus)) / (2 * eps)
                    col_a = rows[:, offsets[i] + j]
                    scorer.add(col_a, column, location)
                else:
                    numerical = (_loss_value(plus, vs) - _loss_value(minus, vs)) / (2 * eps)
                    scorer.add(vjp[i].ravel()[j : j + 1], [numerical], lambda flat, i=i, idx=idx: (i, idx, ()))
    else:
        for i in checked:
            data = args[i].data
            xp = backend.get_array_module(data)
            original = data.copy()
            for d in range(num_directions):
                u = rng.standard_normal(data.shape)
                u /= numpy.linalg.norm(u)
                step = xp.asarray(eps * u)
                data[...] = original + step
                plus = _loss_value(evaluate(), vs)
                data[...] = original - step
                minus = _loss_value(evaluate(), vs)
                data[...] = original
                numerical = (plus - minus) / (2 * eps)
                analytical = float((vjp[i] * u).sum())
                scorer.add([analytical], [numerical], lambda flat, i=i, d=d: (i, (d,), ()))
    return scorer.final()


def gradcheck(
    fn,
    inputs,
    eps=1e-6,
    atol=1e-5,
    rtol=1e-3,
    raise_exception=True,
    max_full_jacobian=256,
    num_directions=8,
    seed=0,
):
    """Compare ``fn``'s hand-written gradients with central finite differences (float64).

    ``fn(*inputs)`` returns a Tensor (or a tuple of Tensors). Returns ``True``
    when every checked entry satisfies ``|a - n| <= atol + rtol * |n|``;
    otherwise raises ``GradcheckError`` naming the worst entry (input index,
    position, analytical, numerical, relative error), or returns ``False``
    when ``raise_exception=False``. ``max_full_jacobian``: inputs with at most
    this many checked elements (and outputs, for the full Jacobian) are
    checked element by element; larger ones along ``num_directions`` random
    directions per input. ``seed`` fixes the random ``v`` and directions.
    """
    result = check_gradients(fn, inputs, eps, atol, rtol, max_full_jacobian, num_directions, seed)
    if not result.passed and raise_exception:
        raise GradcheckError("gradcheck failed: " + result.describe())
    return result.passed


# ------------------------------------------------------- built-in op table
def _builtin_cases(xp):
    """(op, configuration, fn, inputs) for every built-in op, small enough for the full Jacobian."""
    from . import functional as F

    rng = numpy.random.default_rng(1234)

    def t(*shape, scale=1.0, grad=True):
        return Tensor(xp.asarray(rng.standard_normal(shape) * scale), requires_grad=grad)

    def distinct(*shape):
        # well separated values: no ties in max-pool, far from finite-difference steps
        n = int(numpy.prod(shape))
        values = (rng.permutation(n) + rng.uniform(0.2, 0.8, n)) / n * 4 - 2
        return Tensor(xp.asarray(values.reshape(shape)), requires_grad=True)

    def off_zero(*shape):
        # |x| >= 0.1: away from the kink of relu / leaky_relu
        x = rng.standard_normal(shape)
        x = numpy.sign(x) * (0.1 + numpy.abs(x))
        return Tensor(xp.asarray(x), requires_grad=True)

    def seeded(f):
        # the same dropout mask on every evaluation
        def run(*a):
            _random.manual_seed(7)
            return f(*a)

        return run

    target = rng.integers(0, 4, size=(2, 3, 3))
    target[0, 0, 0] = target[1, 2, 1] = -1  # ignored pixels
    ce_weight = xp.asarray(rng.uniform(0.5, 2.0, 4))
    bn_mean, bn_var = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    # max_pool2d's indices of a 5x5 input: where max_unpool2d puts each value back
    # (its own generator, so the other cases draw the same numbers as before)
    pooled = numpy.random.default_rng(5).permutation(2 * 2 * 5 * 5).reshape(2, 2, 5, 5).astype(numpy.float64)
    _, unpool_idx = F.max_pool2d(xp.asarray(pooled), 2, return_indices=True)

    cases = [
        ("conv2d", "3x3 padding=1", lambda x, w, b: F.conv2d(x, w, b, padding=1), (t(2, 3, 5, 5), t(4, 3, 3, 3), t(4))),
        ("conv2d", "stride=2 padding=1 dilation=2", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, dilation=2),
         (t(1, 2, 7, 7), t(3, 2, 3, 3), t(3))),
        ("conv2d", "groups=2 no bias", lambda x, w: F.conv2d(x, w, None, padding=1, groups=2),
         (t(1, 4, 4, 4), t(4, 2, 3, 3))),
        ("conv_transpose2d", "stride=2 padding=1 output_padding=1",
         lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
         (t(1, 3, 3, 3), t(3, 2, 3, 3), t(2))),
        ("conv_transpose2d", "dilation=2 groups=2", lambda x, w: F.conv_transpose2d(x, w, None, dilation=2, groups=2),
         (t(1, 4, 3, 3), t(4, 1, 2, 2))),
        ("batch_norm", "training", lambda x, w, b: F.batch_norm(
            x, xp.asarray(bn_mean.copy()), xp.asarray(bn_var.copy()), w, b, training=True),
         (t(4, 3, 2, 2), t(3), t(3))),
        ("batch_norm", "eval (running stats)", lambda x, w, b: F.batch_norm(
            x, xp.asarray(bn_mean), xp.asarray(bn_var), w, b, training=False),
         (t(2, 3, 2, 2), t(3), t(3))),
        *_norm_cases(xp),
        ("dropout", "p=0.4 fixed generator", seeded(lambda x: F.dropout(x, 0.4, True)), (t(3, 4, 3),)),
        ("dropout2d", "p=0.5 fixed generator", seeded(lambda x: F.dropout2d(x, 0.5, True)), (t(2, 4, 3, 3),)),
        ("max_pool2d", "2x2 stride 2", lambda x: F.max_pool2d(x, 2), (distinct(2, 2, 4, 4),)),
        ("max_pool2d", "3x3 stride 2 padding 1", lambda x: F.max_pool2d(x, 3, 2, 1), (distinct(1, 2, 5, 5),)),
        ("avg_pool2d", "3x3 stride 2 padding 1", lambda x: F.avg_pool2d(x, 3, 2, 1), (t(1, 2, 5, 5),)),
        ("adaptive_avg_pool2d", "7x5 -> 3x2", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), (t(1, 2, 7, 5),)),
        ("relu", "", lambda x: F.relu(x), (off_zero(2, 3, 4),)),
        ("leaky_relu", "negative_slope=0.1", lambda x: F.leaky_relu(x, 0.1), (off_zero(2, 3, 4),)),
        ("tanh", "", lambda x: F.tanh(x), (t(2, 3, 4),)),
        ("sigmoid", "", lambda x: F.sigmoid(x), (t(2, 3, 4),)),
        ("softmax", "dim=1", lambda x: F.softmax(x, dim=1), (t(2, 4, 3),)),
        ("log_softmax", "dim=1", lambda x: F.log_softmax(x, dim=1), (t(2, 4, 3),)),
        ("interpolate", "nearest x2", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (t(1, 2, 3, 3),)),
        ("interpolate", "bilinear align_corners=False",
         lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=False), (t(1, 2, 3, 4),)),
        ("interpolate", "bilinear align_corners=True",
         lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True), (t(1, 2, 3, 4),)),
        ("interpolate", "trilinear align_corners=False",
         lambda x: F.interpolate(x, size=(3, 4, 5), mode="trilinear", align_corners=False), (t(1, 1, 2, 3, 3),)),
        ("cross_entropy", "weight + ignore_index=-1",
         lambda x: F.cross_entropy(x, xp.asarray(target), weight=ce_weight, ignore_index=-1), (t(2, 4, 3, 3),)),
        ("cat", "dim=1", lambda a, b: F.cat([a, b], dim=1), (t(2, 2, 3), t(2, 3, 3))),
        ("pad", "(1, 2, 0, 1)", lambda x: F.pad(x, (1, 2, 0, 1)), (t(2, 2, 3, 3),)),
        ("pad", "reflect (2, 1, -1, 2)", lambda x: F.pad(x, (2, 1, -1, 2), mode="reflect"), (t(2, 2, 3, 4),)),
        ("pad", "replicate (1, 3, 2, 0)", lambda x: F.pad(x, (1, 3, 2, 0), mode="replicate"), (t(2, 2, 3, 3),)),
        ("linear", "(2, 3, 5) -> 4 with bias", lambda x, w, b: F.linear(x, w, b), (t(2, 3, 5), t(4, 5), t(4))),
        ("linear", "1-D input, no bias", lambda x, w: F.linear(x, w), (t(5), t(3, 5))),
        ("pixel_shuffle", "upscale_factor=2", lambda x: F.pixel_shuffle(x, 2), (t(2, 8, 2, 3),)),
        ("pixel_unshuffle", "downscale_factor=2", lambda x: F.pixel_unshuffle(x, 2), (t(2, 2, 4, 6),)),
        ("max_unpool2d", "2x2 indices of a 5x5 input", lambda x: F.max_unpool2d(x, unpool_idx, 2, output_size=(5, 5)),
         (t(2, 2, 2, 2),)),
    ]
    cases += _loss_cases(xp, t, target)
    cases += _volume_cases(xp)
    return cases


def _norm_cases(xp):
    """group_norm, layer_norm, instance_norm (any rank), batch_norm_relu, with weight and bias."""
    from . import functional as F

    rng = numpy.random.default_rng(2468)  # its own generator: the cases around draw what they always drew

    def t(*shape):
        return Tensor(xp.asarray(rng.standard_normal(shape)), requires_grad=True)

    running = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    return [
        ("group_norm", "G=2, (N, C, L)", lambda x, w, b: F.group_norm(x, 2, w, b), (t(2, 4, 3), t(4), t(4))),
        ("group_norm", "G=3, 5-D", lambda x, w, b: F.group_norm(x, 3, w, b), (t(2, 6, 2, 2, 2), t(6), t(6))),
        ("layer_norm", "normalized_shape (3, 4)", lambda x, w, b: F.layer_norm(x, (3, 4), w, b),
         (t(2, 3, 4), t(3, 4), t(3, 4))),
        ("instance_norm", "affine + running stats", lambda x, w, b: F.instance_norm(
            x, xp.asarray(running[0].copy()), xp.asarray(running[1].copy()), w, b), (t(2, 3, 2, 3), t(3), t(3))),
        # the ReLU's kink: the drawn inputs keep every normalised value more than 0.01 away from it
        ("batch_norm_relu", "training", lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, training=True),
         (t(4, 3, 2, 2), t(3), t(3))),
    ]


def _loss_cases(xp, t, target):
    """The sigmoid BCE and the ``scratchseg.losses`` (ignored pixels included), small enough for the full Jacobian."""
    from . import functional as F
    from . import losses as L

    rng = numpy.random.default_rng(4321)  # its own generator: the cases above draw what they always drew
    labels = xp.asarray(target)  # (2, 3, 3) in [0, 4), -1 ignored
    binary = rng.integers(0, 2, size=(2, 3, 3))
    binary[0, 1, 1] = -1
    binary = xp.asarray(binary)
    w, pw = xp.asarray(rng.uniform(0.5, 2.0, (3, 1, 1))), xp.asarray(rng.uniform(0.5, 3.0, (3, 1, 1)))
    return [
        ("bce_with_logits", "weight + pos_weight, input and target",
         lambda x, y: F.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw), (t(2, 3, 2, 2), t(2, 3, 2, 2))),
        ("dice_loss", "multiclass, ignore_index=-1", lambda x: L.dice_loss(x, labels, ignore_index=-1),
         (t(2, 4, 3, 3),)),
        ("dice_loss", "binary micro smooth=0", lambda x: L.dice_loss(x, binary, "binary", 0.0, "micro", -1),
         (t(2, 1, 3, 3),)),
        ("jaccard_loss", "multiclass, ignore_index=-1", lambda x: L.jaccard_loss(x, labels, ignore_index=-1),
         (t(2, 4, 3, 3),)),
        ("tversky_loss", "binary alpha=0.3 beta=0.7",
         lambda x: L.tversky_loss(x, binary, "binary", 0.3, 0.7, ignore_index=-1), (t(2, 1, 3, 3),)),
        ("focal_loss", "multiclass gamma=2 alpha per class",
         lambda x: L.focal_loss(x, labels, gamma=2.0, alpha=[0.5, 1.0, 1.5, 2.0], ignore_index=-1), (t(2, 4, 3, 3),)),
        ("focal_loss", "binary gamma=1.5 alpha=0.25",
         lambda x: L.focal_loss(x, binary, "binary", 1.5, 0.25, ignore_index=-1), (t(2, 1, 3, 3),)),
        ("lovasz_softmax", "present classes, ignore_index=-1",
         lambda x: L.lovasz_softmax(x, labels, ignore_index=-1), (t(2, 4, 3, 3),)),
        ("lovasz_hinge", "per image, ignore_index=-1", lambda x: L.lovasz_hinge(x, binary, ignore_index=-1),
         (t(2, 1, 3, 3),)),
    ]


def _volume_cases(xp):
    """The 3-D ops on 5-D (N, C, D, H, W) input, small enough for the full Jacobian (or a few directions)."""
    from . import functional as F

    rng = numpy.random.default_rng(3333)  # its own generator: the cases above draw what they always drew

    def t(*shape):
        return Tensor(xp.asarray(rng.standard_normal(shape)), requires_grad=True)

    def distinct(*shape):
        # well separated values: no ties in max-pool, far from finite-difference steps
        n = int(numpy.prod(shape))
        values = (rng.permutation(n) + rng.uniform(0.2, 0.8, n)) / n * 4 - 2
        return Tensor(xp.asarray(values.reshape(shape)), requires_grad=True)

    def seeded(f):
        def run(*a):
            _random.manual_seed(7)
            return f(*a)

        return run

    target = rng.integers(0, 3, size=(2, 2, 2, 3))
    target[0, 1, 0, 2] = -1  # an ignored voxel
    ce_weight = xp.asarray(rng.uniform(0.5, 2.0, 3))
    bn_mean, bn_var = rng.standard_normal(2), rng.uniform(0.5, 2.0, 2)
    return [
        ("conv3d", "3x3x3 padding=1", lambda x, w, b: F.conv3d(x, w, b, padding=1),
         (t(1, 2, 3, 4, 3), t(3, 2, 3, 3, 3), t(3))),
        ("conv3d", "stride (1,2,2) dilation (2,1,1) g=2",
         lambda x, w: F.conv3d(x, w, None, stride=(1, 2, 2), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2),
         (t(1, 4, 4, 5, 4), t(2, 2, 2, 2, 2))),
        ("conv3d", "padding='same' 2x2x2", lambda x, w: F.conv3d(x, w, padding="same"),
         (t(1, 2, 3, 3, 3), t(2, 2, 2, 2, 2))),
        ("conv_transpose3d", "2x2x2 stride 2", lambda x, w, b: F.conv_transpose3d(x, w, b, stride=2),
         (t(1, 3, 2, 2, 2), t(3, 2, 2, 2, 2), t(2))),
        ("conv_transpose3d", "s=2 p=1 output_padding=(1,0,1) g=2",
         lambda x, w: F.conv_transpose3d(x, w, None, stride=2, padding=1, output_padding=(1, 0, 1), groups=2),
         (t(1, 2, 2, 3, 2), t(2, 1, 3, 3, 3))),
        ("max_pool3d", "2x2x2 stride 2", lambda x: F.max_pool3d(x, 2), (distinct(1, 2, 4, 4, 4),)),
        ("max_pool3d", "3 stride 2 padding 1 ceil_mode", lambda x: F.max_pool3d(x, 3, 2, 1, ceil_mode=True),
         (distinct(1, 1, 4, 5, 6),)),
        ("avg_pool3d", "3 s=2 p=1 count_include_pad=False",
         lambda x: F.avg_pool3d(x, 3, 2, 1, count_include_pad=False), (t(1, 2, 3, 5, 4),)),
        ("adaptive_avg_pool3d", "3x5x4 -> 2x3x1", lambda x: F.adaptive_avg_pool3d(x, (2, 3, 1)), (t(1, 2, 3, 5, 4),)),
        ("dropout3d", "p=0.5 fixed generator", seeded(lambda x: F.dropout3d(x, 0.5, True)), (t(2, 3, 2, 2, 2),)),
        ("batch_norm", "5-D training", lambda x, w, b: F.batch_norm(
            x, xp.asarray(bn_mean.copy()), xp.asarray(bn_var.copy()), w, b, training=True),
         (t(3, 2, 2, 2, 3), t(2), t(2))),
        ("interpolate", "nearest 5-D (3, 5, 2)", lambda x: F.interpolate(x, size=(3, 5, 2), mode="nearest"),
         (t(1, 2, 2, 3, 3),)),
        ("interpolate", "trilinear align_corners=True",
         lambda x: F.interpolate(x, size=(3, 4, 5), mode="trilinear", align_corners=True), (t(1, 1, 2, 3, 3),)),
        ("cross_entropy", "5-D weight + ignore_index=-1",
         lambda x: F.cross_entropy(x, xp.asarray(target), weight=ce_weight, ignore_index=-1), (t(2, 3, 2, 2, 3),)),
    ]


def check_builtin_ops(file=sys.stdout, backend=None):
    """Gradcheck every built-in op on the active backend (or ``backend``) and print a table.

    Columns: op, configuration, worst relative error, pass/fail. Returns
    ``True`` when every op passes. The global random generator's state is
    restored afterwards (the dropout checks reseed it).
    """
    from . import backend as _backend

    import contextlib

    context = _backend.use(backend) if backend is not None else contextlib.nullcontext()
    all_passed = True
    state = _random.get_state()
    with context:
        name = _backend.current()
        xp = _backend.xp()
        print(f"gradcheck of the built-in ops on backend {name!r} (float64, central differences)", file=file)
        header = f"{'op':<20} {'configuration':<38} {'worst rel err':>13}  result"
        print(header, file=file)
        print("-" * len(header), file=file)
        try:
            cases = _builtin_cases(xp)
        except Exception as exc:  # pragma: no cover - functional package broken
            print(f"cannot build the cases: {type(exc).__name__}: {exc}", file=file)
            return False
        try:
            for op, config, fn, inputs in cases:
                try:
                    result = check_gradients(fn, inputs)
                    err, ok = f"{result.rel_error:.2e}", result.passed
                    status = "pass" if ok else "FAIL  " + result.describe()
                except Exception as exc:
                    err, ok, status = "-", False, f"ERROR {type(exc).__name__}: {exc}"
                all_passed &= ok
                print(f"{op:<20} {config:<38} {err:>13}  {status}", file=file)
        finally:
            _random.set_state(state)
    print(f"{'all ops pass' if all_passed else 'SOME OPS FAIL'}", file=file)
    return all_passed

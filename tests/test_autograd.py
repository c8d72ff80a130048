"""The autograd core (Tensor, Function, backward walk) and the shape ops against torch autograd."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from helpers import Double, assert_close, to_numpy

import scratchseg
import scratchseg.functional as F
from scratchseg.autograd import Function, Tensor, unbroadcast


def both(*arrays):
    """Each array as (scratchseg leaf, torch leaf), both requiring grad."""
    return [(Tensor(a.copy(), requires_grad=True), torch.from_numpy(a.copy()).requires_grad_()) for a in arrays]


def check(fn, arrays, rng, fn_torch=None, rtol=1e-7):
    """Run ``fn`` on scratchseg and torch leaves, backward a random upstream gradient, compare all."""
    pairs = both(*arrays)
    ours = fn(*[p[0] for p in pairs])
    ref = (fn_torch or fn)(*[p[1] for p in pairs])
    assert ours.shape == tuple(ref.shape)
    assert_close(ours, ref, rtol=rtol)
    g = rng.standard_normal(ours.shape)
    ours.backward(g)
    ref.backward(torch.from_numpy(g))
    for (a, t) in pairs:
        if t.grad is None:
            assert a.grad is None
        else:
            assert a.grad.shape == a.shape
            assert_close(a.grad, t.grad, rtol=rtol)


# ------------------------------------------------------------ arithmetic
BROADCAST_SHAPES = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((2, 1, 4), (3, 1)),
    ((1,), (2, 3)),
    ((), (2, 3)),
    ((5, 1, 1), (1, 4, 1)),
]


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
def test_broadcasting_binary_ops(rng, op, shapes):
    a = rng.standard_normal(shapes[0])
    b = rng.uniform(0.5, 2.0, shapes[1]) * rng.choice([-1, 1], shapes[1])  # away from 0 for division
    fn = {
        "add": lambda x, y: x + y,
        "sub": lambda x, y: x - y,
        "mul": lambda x, y: x * y,
        "div": lambda x, y: x / y,
    }[op]
    check(fn, [a, b], rng)
    check(fn, [b, a], rng)


def test_python_numbers_and_arrays_on_either_side(rng):
    a = rng.uniform(0.5, 2.0, (3, 2))
    c = rng.standard_normal((2,))

    def fn(x, arr):
        return 2.0 * x - 1 + x / 3 - 4 / x + (-x) + 1.5 - x * 0.5 + arr - x**2 + x**0.5 * 3

    check(lambda x: fn(x, c), [a], rng, lambda x: fn(x, torch.from_numpy(c)))
    # ndarray on the left must call Tensor's reflected operators (not broadcast element-wise)
    x = Tensor(a, requires_grad=True)
    y = c + x
    assert isinstance(y, Tensor) and y.requires_grad
    y = c * x - c / x
    assert isinstance(y, Tensor)
    y.backward(np.ones(y.shape))
    assert_close(x.grad, (c + c / a**2) * np.ones_like(a))


def test_tensor_used_twice_accumulates(rng):
    a = rng.standard_normal((3, 4))
    check(lambda x: x * x + x * 3 - x.exp() * x, [a], rng)
    # a diamond: y feeds two branches that join again
    check(lambda x: (lambda y: y * y.exp() + y / 2)(x * 2 + 1), [a], rng)


def test_exp_log_pow_matmul(rng):
    a = rng.uniform(0.5, 2.0, (3, 4))
    check(lambda x: (x.log() * 2).exp() + x**3 - x**-1.5, [a], rng)
    check(lambda x, y: x @ y, [rng.standard_normal((3, 4)), rng.standard_normal((4, 5))], rng)
    check(lambda x, y: x @ y, [rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))], rng)
    check(lambda x, y: x @ y, [rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 2))], rng)
    check(lambda x, y: x @ y, [rng.standard_normal((3, 4)), rng.standard_normal((4,))], rng)
    check(lambda x, y: x @ y, [rng.standard_normal((4,)), rng.standard_normal((4, 5))], rng)


# ------------------------------------------------------------ reductions
@pytest.mark.parametrize("dim", [None, 0, 1, -1, (0, 2), (-1, -3)])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_sum_mean(rng, dim, keepdim, reduce):
    a = rng.standard_normal((2, 3, 4))
    if dim is None:
        # torch spells "every dimension, kept" as dim=(0, 1, 2)
        ours = lambda x: getattr(x, reduce)(keepdim=keepdim)  # noqa: E731
        check(ours, [a], rng, lambda x: getattr(x, reduce)(dim=(0, 1, 2), keepdim=keepdim))
    else:
        check(lambda x: getattr(x, reduce)(dim=dim, keepdim=keepdim), [a], rng)


def test_reduction_dim_out_of_range():
    with pytest.raises(IndexError, match="out of range"):
        Tensor(np.zeros((2, 3))).sum(dim=2)


# ------------------------------------------------------------ shapes
def test_reshape_permute_transpose(rng):
    a = rng.standard_normal((2, 3, 4))
    check(lambda x: x.reshape(4, 6) * 2, [a], rng)
    check(lambda x: x.reshape((3, -1)), [a], rng)
    check(lambda x: x.view(-1), [a], rng)
    check(lambda x: x.permute(2, 0, 1), [a], rng)
    check(lambda x: x.permute((1, 2, 0)).reshape(3, 8), [a], rng)
    check(lambda x: x.transpose(0, 2), [a], rng)
    check(lambda x: x.transpose(-1, 1), [a], rng)
    check(lambda x: x.unsqueeze(1).squeeze(1).flatten(1), [a], rng)


INDICES = [
    (slice(None), slice(1, 3)),
    1,
    -1,
    (0, slice(None), 2),
    (slice(None, None, -1),),
    (slice(None), slice(None, None, -2), slice(3, 0, -1)),
    (Ellipsis, 0),
    (None, slice(None), 1),
    (np.array([0, 0, 1, 0]),),  # advanced indexing with repeats
    (slice(None), np.array([2, 0, 2, 2]), slice(1, 3)),
    (np.array([1, 0, 1]), np.array([2, 2, 2])),  # the same element three times
]


@pytest.mark.parametrize("index", INDICES, ids=[str(i) for i in range(len(INDICES))])
def test_getitem(rng, index):
    a = rng.standard_normal((2, 3, 4))
    # torch has no negative slice steps: ask NumPy which flat elements the index picks
    # and gather those from torch's flattened tensor, whose gradient torch knows
    flat = torch.from_numpy(np.ascontiguousarray(np.arange(a.size).reshape(a.shape)[index]))
    check(lambda x: x[index], [a], rng, lambda x: x.reshape(-1)[flat])


def test_basic_indices_are_told_from_advanced_ones():
    """Basic indices (each element read at most once) take the plain-assignment backward."""
    from scratchseg.autograd.indexing import _is_basic

    for index in [1, np.int64(2), slice(1, 3), (slice(None), 0), (Ellipsis, None, slice(None, None, -2)), ()]:
        assert _is_basic(index), index
    for index in [[0, 0], np.array([1, 1]), (slice(None), np.array([0, 0])), True, (np.bool_(True),),
                  np.zeros((2,), bool)]:
        assert not _is_basic(index), index


def test_getitem_boolean_mask_and_tensor_index(rng):
    a = rng.standard_normal((3, 4))
    mask = a > 0.2
    check(lambda x: x[mask] * 2, [a], rng, lambda x: x[torch.from_numpy(mask)] * 2)
    idx = Tensor(np.array([2, 2, 0]))
    x = Tensor(a, requires_grad=True)
    x[idx].backward(np.ones((3, 4)))
    expected = np.zeros((3, 4))
    expected[2] = 2
    expected[0] = 1
    assert_close(x.grad, expected)


def test_cat(rng):
    a, b, c = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 1, 4)), rng.standard_normal((2, 5, 4))
    check(lambda x, y, z: scratchseg.cat([x, y, z], dim=1), [a, b, c], rng, lambda x, y, z: torch.cat([x, y, z], dim=1))
    check(lambda x, y: F.cat((x, y), -1), [a, a], rng, lambda x, y: torch.cat((x, y), -1))
    # a plain array (no gradient) among tensors, and the same tensor twice
    x = Tensor(a, requires_grad=True)
    out = scratchseg.cat([x, np.zeros((2, 3, 4)), x], dim=0)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    assert_close(x.grad, g[:2] + g[4:])
    with pytest.raises(ValueError, match="expected"):
        scratchseg.cat([Tensor(a), Tensor(c)], dim=0)
    with pytest.raises(ValueError):
        scratchseg.cat([], dim=0)


@pytest.mark.parametrize("pads", [(1, 2), (1, 2, 0, 3), (0, 0, 2, 1, 1, 1), (-1, 2), (-1, -1, 2, -2), (2, -3, 0, 0)])
def test_pad(rng, pads):
    a = rng.standard_normal((2, 3, 4, 5))
    check(lambda x: F.pad(x, pads, value=0.5), [a], rng, lambda x: torch.nn.functional.pad(x, pads, value=0.5))


def test_pad_errors():
    with pytest.raises(ValueError, match="even"):
        F.pad(np.zeros((2, 3)), (1, 2, 3))
    with pytest.raises(ValueError, match="negative"):
        F.pad(np.zeros((2, 3)), (-2, -2))
    with pytest.raises(ValueError, match="constant"):
        F.pad(np.zeros((2, 3)), (1, 1), mode="circular")


@pytest.mark.parametrize("size", [(3, 3), (4, 5), (6, 7), (1, 2)])
def test_center_crop(rng, size):
    a = rng.standard_normal((2, 3, 6, 7))
    h, w = size
    top, left = (6 - h) // 2, (7 - w) // 2
    check(lambda x: F.center_crop(x, size), [a], rng, lambda x: x[..., top : top + h, left : left + w])
    with pytest.raises(ValueError, match="larger"):
        F.center_crop(np.zeros((1, 1, 3, 3)), (4, 3))


def test_crop(rng):
    a = rng.standard_normal((1, 2, 5, 6))
    check(lambda x: F.crop(x, 1, 2, 3, 4), [a], rng, lambda x: x[..., 1:4, 2:6])
    with pytest.raises(ValueError, match="does not fit"):
        F.crop(np.zeros((1, 1, 3, 3)), 1, 1, 3, 1)


# ------------------------------------------------------------ grad mode and tensor basics
def test_no_grad_and_enable_grad(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    with scratchseg.no_grad():
        y = x * 2
        assert not scratchseg.is_grad_enabled()
        with scratchseg.enable_grad():
            z = x * 2
    assert scratchseg.is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad

    @scratchseg.no_grad()
    def f(t):
        return t * 3

    assert not f(x).requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_detach_item_numpy(rng):
    a = rng.standard_normal((2, 2))
    x = Tensor(a, requires_grad=True)
    d = (x * 2).detach()
    assert not d.requires_grad and d.is_leaf
    assert_close(d, 2 * a)
    (x * Tensor(d.data) + d).sum().backward()  # the detached branch gives no gradient
    assert_close(x.grad, 2 * a)
    s = (x * 1).sum()
    assert isinstance(s.item(), float) and abs(s.item() - a.sum()) < 1e-12
    with pytest.raises(ValueError, match="one element"):
        x.item()
    n = x.numpy()
    assert isinstance(n, np.ndarray) and np.array_equal(n, a)
    assert x.tolist() == a.tolist()


def test_backward_with_explicit_grad_and_accumulation(rng):
    a = rng.standard_normal((2, 3))
    g = rng.standard_normal((2, 3))
    x = Tensor(a, requires_grad=True)
    y = x * 3
    y.backward(g, retain_graph=True)
    assert_close(x.grad, 3 * g)
    y.backward(Tensor(g))  # gradients add up across calls, as in torch
    assert_close(x.grad, 6 * g)
    assert x.grad.flags.writeable


def test_retain_grad_on_non_leaf(rng):
    a = rng.standard_normal(3)
    x = Tensor(a, requires_grad=True)
    y = (x * 2).retain_grad()
    (y * y).sum().backward()
    assert_close(y.grad, 2 * (2 * a))
    assert_close(x.grad, 8 * a)


def test_graph_frees_intermediate_results_nobody_saved(rng):
    """A result that only the graph refers to is freed after the forward (torch's behaviour): the
    graph holds nodes, not tensors; a result a backward saved, or one the caller holds, stays."""
    import gc
    import weakref

    x = Tensor(rng.standard_normal(1000), requires_grad=True)
    h = Double.apply(x)
    out = Double.apply(Double.apply(h))
    freed = weakref.ref(h.data)
    del h
    gc.collect()
    assert freed() is None, "the intermediate array is still alive though no backward saved it"
    out.backward(np.ones(1000))
    assert_close(x.grad, 8 * np.ones(1000))
    # saved by a backward (Mul keeps its inputs): kept until the backward has run
    y = Tensor(rng.standard_normal(5), requires_grad=True)
    m = Double.apply(y)
    kept = weakref.ref(m.data)
    prod = (m * m).sum()
    del m
    gc.collect()
    assert kept() is not None
    prod.backward()
    assert_close(y.grad, 8 * y.data)
    # a retained gradient reaches a tensor the caller still holds, through the weak reference
    z = Tensor(rng.standard_normal(4), requires_grad=True)
    w = Double.apply(z).retain_grad()
    Double.apply(w).sum().backward()
    assert_close(w.grad, 2 * np.ones(4))


def test_conv_batchnorm_relu_graph_keeps_two_activations_per_block(rng):
    """After the forward of conv -> batch norm -> ReLU the graph keeps the normalised output (batch
    norm's) and the ReLU's output, not the convolution's output as well."""
    import gc
    import weakref

    import scratchseg.nn as nn

    block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    x = Tensor(rng.standard_normal((2, 2, 6, 6)).astype(np.float32), requires_grad=True)
    conv_out = block[0](x)
    conv_array = weakref.ref(conv_out.data)
    out = block[2](block[1](conv_out))
    del conv_out
    gc.collect()
    assert conv_array() is None, "the convolution's output outlived the forward"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_leaf_gradient_owns_its_memory(rng):
    """A broadcast gradient (from sum) must not land in .grad as a read-only view."""
    x = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    x.sum().backward()
    assert x.grad.flags.writeable and x.grad.base is None
    x.grad *= 0  # would raise on a broadcast view
    y = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    z = Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    (y + z).backward(np.ones((2, 3)))
    y.grad += 1  # must not change z.grad although both came from the same dout
    assert_close(z.grad, np.ones((2, 3)))


class _FreshGrad(Function):
    """out = 2 x; backward returns a new array and records where its memory is (no reference kept)."""

    addresses: list = []
    kept: list = []

    @staticmethod
    def forward(ctx, x, keep=False):
        ctx.keep = keep
        return 2 * x

    @staticmethod
    def backward(ctx, dout):
        dx = 2 * dout  # a new array nobody else sees...
        _FreshGrad.addresses.append(dx.ctypes.data)
        if ctx.keep:  # ...unless the function keeps it
            _FreshGrad.kept.append(dx)
        return (dx,)


def test_leaf_takes_a_fresh_gradient_without_copying_it(rng):
    """A gradient only the engine refers to becomes .grad itself, as torch steals such a buffer."""
    x = Tensor(rng.standard_normal((4, 5)), requires_grad=True)
    _FreshGrad.addresses.clear()
    _FreshGrad.apply(x).backward(np.ones((4, 5)))
    assert x.grad.ctypes.data == _FreshGrad.addresses[-1]
    assert_close(x.grad, 2 * np.ones((4, 5)))
    x.grad += 1  # it is writable and ours
    assert_close(x.grad, 3 * np.ones((4, 5)))


def test_leaf_copies_a_gradient_someone_else_still_sees(rng):
    x = Tensor(rng.standard_normal((4, 5)), requires_grad=True)
    _FreshGrad.kept.clear()
    _FreshGrad.apply(x, True).backward(np.ones((4, 5)))
    assert not np.shares_memory(x.grad, _FreshGrad.kept[-1])
    # the caller's own gradient array passes straight through x * 1 (Mul gives dout * 1,
    # a new array) or y.backward(g) on a leaf-like identity: never aliased
    g = np.ones((4, 5))
    x.grad = None
    x.backward(g)  # the seed reaches the leaf itself
    assert not np.shares_memory(x.grad, g)
    # a retained non-leaf grad and the leaf's grad must stay apart
    x.grad = None
    y = (x + 0).retain_grad()
    y.backward(np.ones((4, 5)))
    assert not np.shares_memory(x.grad, y.grad)
    # Add hands one fresh array (3 * dout, from Mul) to both of its inputs: one of them may
    # keep it, the other must copy
    x.grad = None
    z = Tensor(rng.standard_normal((4, 5)), requires_grad=True)
    ((x + z) * 3).backward(np.ones((4, 5)))
    assert not np.shares_memory(x.grad, z.grad)
    x.grad += 1
    assert_close(z.grad, 3 * np.ones((4, 5)))


def test_sole_reference_reads_only_the_flags_cupy_arrays_have():
    """CuPy's flags are c_contiguous, f_contiguous and owndata (no writeable)."""
    from scratchseg.autograd.engine import _sole_reference

    class Flags:
        def __init__(self, owndata):
            self.c_contiguous, self.f_contiguous, self.owndata = True, False, owndata

    class DeviceArray:
        def __init__(self, owndata):
            self.flags = Flags(owndata)

    fresh, view = DeviceArray(True), DeviceArray(False)
    assert _sole_reference(fresh)
    assert not _sole_reference(view)
    other = fresh  # noqa: F841  (a second reference)
    assert not _sole_reference(fresh)


def test_comparisons_give_boolean_tensors(rng):
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    m = x > 1.5
    assert m.dtype == np.bool_ and not m.requires_grad
    assert m.tolist() == [False, True, True]
    assert (x == 2.0).tolist() == [False, True, False]


# ------------------------------------------------------------ errors
def test_backward_twice_without_retain_graph():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_backward_on_non_scalar_without_grad():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2).backward()


def test_backward_with_wrong_grad_shape():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(2,\).*\(2, 2\)"):
        (x * 2).backward(np.ones(2))


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating point"):
        Tensor(np.array([1, 2]), requires_grad=True)


def test_function_returning_wrong_gradient_shape_is_caught():
    class Bad(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, dout):
            return (dout[:1],)

    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="gradient of shape"):
        Bad.apply(x).backward(np.ones(3))


# ------------------------------------------------------------ the Function contract
class ScaleShift(Function):
    """out = a * x + b with a constant ``a``; dx = a dout, db = dout."""

    @staticmethod
    def forward(ctx, x, b, a=1.0):
        ctx.a = a
        ctx.seen_needs = ctx.needs_input_grad
        return a * x + b

    @staticmethod
    def backward(ctx, dout):
        dx = ctx.a * dout if ctx.needs_input_grad[0] else None
        db = dout if ctx.needs_input_grad[1] else None
        return dx, db


def test_custom_function_contract(rng):
    a = rng.standard_normal(4)
    x = Tensor(a, requires_grad=True)
    plain = rng.standard_normal(4)  # a plain array: gets no gradient
    out = ScaleShift.apply(x, plain, a=3.0)
    assert isinstance(out, Tensor) and out.requires_grad and out.grad_fn is ScaleShift
    assert out._ctx.seen_needs == (True, False)
    g = rng.standard_normal(4)
    out.backward(g)
    assert_close(x.grad, 3 * g)
    # arrays only: no graph, a Tensor that needs no grad
    out = ScaleShift.apply(a, plain)
    assert isinstance(out, Tensor) and not out.requires_grad and out.is_leaf


def test_unbroadcast():
    g = np.arange(24.0).reshape(2, 3, 4)
    assert_close(unbroadcast(g, (4,)), g.sum(axis=(0, 1)))
    assert_close(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2)).reshape(3, 1))
    assert_close(unbroadcast(g, (1, 1, 1)), g.sum().reshape(1, 1, 1))
    assert_close(unbroadcast(g, ()), g.sum())
    assert unbroadcast(g, (2, 3, 4)) is g


# ------------------------------------------------------------ depth, dtypes
def test_deep_chain_does_not_hit_recursion_limit():
    depth = max(1000, sys.getrecursionlimit() + 500)
    x = Tensor(np.array([0.5]), requires_grad=True)
    y = x
    for i in range(depth):
        y = y * 1.001 if i % 2 else y + 0.001
    y.sum().backward()
    expected = 1.001 ** (depth // 2)
    assert abs(x.grad[0] - expected) < 1e-9 * expected


def test_float32_stays_float32(rng):
    a = rng.standard_normal((2, 3)).astype(np.float32)
    x = Tensor(a, requires_grad=True)
    y = ((x * 2.5 + 1) / 3 - x**2).exp().log().sum(dim=1).mean()
    assert y.dtype == np.float32
    y.backward()
    assert x.grad.dtype == np.float32
    z = F.pad(F.center_crop(scratchseg.cat([x[None], x[None]], 0), (1, 2)), (1, 1))
    assert z.dtype == np.float32
    z.backward(np.ones(z.shape, dtype=np.float64))  # the upstream gradient is cast to the tensor's dtype
    assert x.grad.dtype == np.float32


def test_tensor_from_list_uses_default_dtype():
    assert scratchseg.tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(1.5).dtype == np.float32
    assert scratchseg.tensor([1, 2]).dtype.kind == "i"
    assert scratchseg.tensor(np.array([1.0, 2.0])).dtype == np.float64  # an array keeps its dtype
    assert scratchseg.tensor([1.0], dtype=np.float64).dtype == np.float64
    previous = scratchseg.get_default_dtype()
    try:
        scratchseg.set_default_dtype(np.float64)
        assert scratchseg.tensor([1.0, 2.0]).dtype == np.float64
        assert scratchseg.zeros(2, 3).dtype == np.float64
    finally:
        scratchseg.set_default_dtype(previous)
    assert scratchseg.tensor([1.0]).dtype == np.float32
    with pytest.raises(ValueError, match="default dtype"):
        scratchseg.set_default_dtype(np.int32)


def test_tensor_copies_but_Tensor_shares():
    a = np.zeros(3)
    t = scratchseg.tensor(a)
    s = Tensor(a)
    a[0] = 5.0
    assert t.data[0] == 0.0 and s.data[0] == 5.0


def test_to_numpy_helper_round_trip(rng):
    a = rng.standard_normal((2, 2))
    assert np.array_equal(to_numpy(Tensor(a)), a)
    assert np.array_equal(np.asarray(Tensor(a)), a)


@pytest.mark.gpu
def test_cupy_graph_matches_numpy(rng):
    from helpers import cupy_or_skip

    cupy = cupy_or_skip()
    a, b = rng.uniform(0.5, 2.0, (2, 3, 4)), rng.standard_normal((3, 1))
    g = rng.standard_normal((2, 3, 6))

    def fn(x, y):
        z = scratchseg.cat([x * y - x / 2, (x**2).log()], dim=2)[:, :, ::2] + x.exp().sum(dim=2, keepdim=True)
        return F.pad(F.center_crop(z, (3, 2)), (2, 2)) * 0.5

    results = []
    for to in (np.asarray, cupy.asarray):
        x, y = Tensor(to(a), requires_grad=True), Tensor(to(b), requires_grad=True)
        out = fn(x, y)
        out.backward(to(g))
        results.append((out, x.grad, y.grad))
    (out_cpu, dx_cpu, dy_cpu), (out_gpu, dx_gpu, dy_gpu) = results
    assert out_gpu.device == "cuda" and type(dx_gpu).__module__.startswith("cupy")
    assert_close(out_gpu, out_cpu)
    assert_close(dx_gpu, dx_cpu)
    assert_close(dy_gpu, dy_cpu)


def test_tensor_inspection_methods_read_like_torch(rng):
    import torch

    x = rng.standard_normal((2, 3, 4))
    ours, theirs = scratchseg.Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    assert ours.size() == tuple(theirs.size()) and ours.size(1) == theirs.size(1)
    assert ours.dim() == theirs.dim() and ours.numel() == theirs.numel()
    np.testing.assert_array_equal(ours.argmax(2, keepdim=True).numpy(), theirs.argmax(2, keepdim=True).numpy())
    assert ours.max().item() == theirs.max().item() and ours.min().item() == theirs.min().item()
    dout = rng.standard_normal((4, 3, 2))
    (ours.T * dout).sum().backward()
    (theirs.permute(2, 1, 0) * torch.tensor(dout)).sum().backward()
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-12)
    y = np.abs(x) + 0.5
    ours, theirs = scratchseg.Tensor(y, requires_grad=True), torch.tensor(y, requires_grad=True)
    (ours.sqrt().clone() * 2).sum().backward()
    (theirs.sqrt().clone() * 2).sum().backward()
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-12)

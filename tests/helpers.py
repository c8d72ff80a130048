"""Small helpers for holding scratchseg side by side with PyTorch in tests.

    from helpers import check_against_torch, geometries, assert_close, to_torch, to_numpy, cupy_or_skip

* ``check_against_torch(ours_fn, torch_fn, inputs, ...)``: THE harness that runs
  an op of ours and torch's on the same inputs, forward and backward (with a
  random upstream gradient), and compares the output and every input gradient;
* ``geometries(...)``: THE hypothesis strategy for convolution / pooling /
  resizing geometries (shape, kernel, stride, padding, dilation, groups), a
  :class:`Geometry`;

* ``to_torch(a, requires_grad=False)``: a Tensor / NumPy / CuPy array as a CPU
  ``torch.Tensor`` of the same dtype (a fresh leaf, so it can require grad);
* ``to_numpy(a)``: a scratchseg Tensor, torch tensor, CuPy or NumPy array as a
  NumPy array;
* ``assert_close(actual, expected, rtol=None, atol=None)``: element-wise check
  with tolerances chosen from the dtype (float64: rtol 1e-7; float32: rtol 1e-4)
  and an error message that says where the largest difference is;
* ``cupy_or_skip()``: the ``cupy`` module, or ``pytest.skip`` when CuPy or a
  GPU is missing;
* ``TINY`` and ``tiny_run(tmp_path_factory, seed)``: the smallest training run
  of the command line (one epoch of a tiny U-Net on tiny shapes), for tests of
  the commands that read a run folder;
* ``Double``: a user-written ``Function`` (out = 2 x), which saves nothing for
  its backward and which no exporter knows;
* ``count_calls(monkeypatch, module, names)``: wrap functions of a module so
  that each call appends its name to the list returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import pytest

# default tolerances per dtype: (rtol, atol)
TOLERANCES = {
    np.dtype("float64"): (1e-7, 1e-10),
    np.dtype("float32"): (1e-4, 1e-5),
    np.dtype("float16"): (1e-2, 1e-3),
}


def to_numpy(a):
    """The values of ``a`` (scratchseg Tensor, torch tensor, CuPy or NumPy array) as NumPy."""
    if hasattr(a, "_ctx") and hasattr(a, "data"):  # scratchseg.Tensor
        a = a.data
    if type(a).__module__.split(".")[0] == "torch":
        return a.detach().cpu().numpy()
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def to_torch(a, requires_grad=False):
    """``a`` as a CPU torch tensor with the same dtype and values (a new leaf)."""
    import torch

    t = torch.from_numpy(np.array(to_numpy(a), copy=True))
    return t.requires_grad_(requires_grad) if requires_grad else t


def assert_close(actual, expected, rtol=None, atol=None, msg=""):
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` everywhere, same shape.

    Tolerances default to the looser dtype of the two (float64 -> rtol 1e-7).
    """
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{msg} shape mismatch: got {a.shape}, expected {e.shape}"
    dtype = a.dtype if a.dtype.kind == "f" else np.dtype("float64")
    if e.dtype.kind == "f" and e.dtype.itemsize < dtype.itemsize:
        dtype = e.dtype
    default_rtol, default_atol = TOLERANCES.get(dtype, (1e-7, 1e-10))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    if not np.allclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True):
        diff = np.abs(a64 - e64)
        excess = diff - (atol + rtol * np.abs(e64))
        where = np.unravel_index(np.nanargmax(excess), excess.shape) if excess.size else ()
        raise AssertionError(
            f"{msg} not close (rtol={rtol}, atol={atol}): max abs diff {np.nanmax(diff):.3e}; "
            f"at index {tuple(int(i) for i in where)}: got {a64[where]!r}, expected {e64[where]!r}"
        )


def cupy_or_skip():
    """The ``cupy`` module when CuPy imports and sees a GPU; otherwise skip the test."""
    try:
        import cupy
    except Exception as exc:  # ImportError or a broken CUDA install
        pytest.skip(f"CuPy is not available ({type(exc).__name__})")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy finds no GPU")
    except Exception as exc:
        pytest.skip(f"CuPy finds no usable GPU ({type(exc).__name__})")
    return cupy


# ------------------------------------------------------------------ the harness
class TorchComparison(NamedTuple):
    """What :func:`check_against_torch` ran, for extra checks: ours and torch's side by side."""

    out: object  # our output (a scratchseg.Tensor)
    out_t: object  # torch's output
    grads: list  # our gradient of each input (None where the input is not differentiable)
    grads_t: list  # torch's
    args: list  # the arguments ours_fn got (Tensors, plain arrays, values passed through)
    args_t: list  # the arguments torch_fn got
    dout: np.ndarray  # the upstream gradient both outputs were given


def check_against_torch(ours_fn, torch_fn, inputs, *, rtol=None, atol=None, grad_rtol=None, grad_atol=None,
                        seed=0, nondiff=(), dout=None):
    """Run ``ours_fn`` and ``torch_fn`` on the same ``inputs``; assert the output and every gradient agree.

    ``inputs`` is a list; each NumPy array becomes a ``scratchseg.Tensor`` that
    requires grad for ``ours_fn`` (the very array, so its layout is kept) and a
    CPU torch leaf with a copy of it for ``torch_fn``. Arrays at the positions in
    ``nondiff``, and integer or boolean arrays (targets, masks), are passed as
    they are to ours and as a torch tensor that needs no gradient to torch;
    anything else (None, numbers, tuples) goes to both unchanged.

    Both forwards run; the outputs are compared with ``rtol`` / ``atol`` (None:
    :func:`assert_close`'s defaults for the dtype). Then an upstream gradient of
    the output's shape and dtype, drawn at random from ``seed`` (an int or a
    ``numpy.random.Generator``; ``dout`` gives one explicitly), is sent back
    through both, and the gradient of every differentiable input is compared
    with ``grad_rtol`` / ``grad_atol`` (None: the output's tolerances). A
    differentiable input must get a gradient from us; torch leaves None for an
    input its output does not depend on, which counts as zeros. Inputs that are
    not differentiable get no gradient on either side.

    Returns a :class:`TorchComparison` with both outputs, gradients and arguments.
    """
    import torch

    import scratchseg

    diff = []
    args, args_t = [], []
    for i, a in enumerate(inputs):
        if isinstance(a, np.ndarray):
            differentiable = i not in nondiff and a.dtype.kind == "f"
            t = torch.from_numpy(np.array(a, copy=True))
            args_t.append(t.requires_grad_(True) if differentiable else t)
            args.append(scratchseg.Tensor(a, requires_grad=True) if differentiable else a)
            diff.append(differentiable)
        else:
            args.append(a)
            args_t.append(a)
            diff.append(False)

    out = ours_fn(*args)
    out_t = torch_fn(*args_t)
    assert_close(out, out_t, rtol=rtol, atol=atol, msg="output")

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if dout is None:
        dout = np.asarray(rng.standard_normal(tuple(out_t.shape)), dtype=to_numpy(out).dtype)
    out.backward(dout)
    out_t.backward(torch.from_numpy(np.array(dout, copy=True)).to(out_t.dtype))

    grad_rtol = rtol if grad_rtol is None else grad_rtol
    grad_atol = atol if grad_atol is None else grad_atol
    grads, grads_t = [], []
    for i, (a, a_t, differentiable) in enumerate(zip(args, args_t, diff)):
        if not differentiable:  # a plain array for ours, a tensor without grad for torch: no gradient
            grads.append(None)
            grads_t.append(None)
            continue
        g, g_t = a.grad, a_t.grad
        assert g is not None, f"input {i} requires grad but got no gradient"
        expected = g_t if g_t is not None else np.zeros(to_numpy(a).shape, dtype=to_numpy(g).dtype)
        assert_close(g, expected, rtol=grad_rtol, atol=grad_atol, msg=f"gradient of input {i}")
        grads.append(g)
        grads_t.append(g_t)
    return TorchComparison(out, out_t, grads, grads_t, args, args_t, dout)


def torch_nearest_by_gather(x, **kw):
    """torch's nearest ``interpolate`` forward as a gather, so torch's autograd gives the gradient
    *of that forward*: the oracle where torch's own nearest backward disagrees with its forward.

    torch's CPU nearest backward always uses ``nearest_idx`` (float32 ratio, copy when
    out == in, ``i >> 1`` when out == 2*in), but its forward does so only for 4-D inputs
    with ``H_out + W_out <= 128``; elsewhere the forward uses the input's precision and no
    shortcuts. E.g. length 2, scale 2.3 in 1-D: forward reads [0, 0, 0, 1], backward sends
    to [0, 0, 1, 1]. That gradient is not the gradient of the forward, so it cannot be the
    oracle there. The source indices are read off torch's forward on codes of ``x``'s dtype.
    """
    import torch
    import torch.nn.functional as TF

    numel = int(np.prod(x.shape[2:]))
    codes = torch.arange(numel, dtype=x.dtype).reshape((1, 1) + tuple(x.shape[2:]))
    src = TF.interpolate(codes, **kw).long()  # (1, 1, *out): flat source index of each output
    flat = x.reshape(x.shape[0], x.shape[1], numel)  # (N, C, prod(in))
    return flat[:, :, src.reshape(-1)].reshape(tuple(x.shape[:2]) + tuple(src.shape[2:]))


# --------------------------------------------------------------- the geometries
@dataclass(frozen=True)
class Geometry:
    """A drawn input shape and, for window ops, the window: what conv, pooling and resizing tests share.

    ``x_shape`` is (N, C, *spatial); the window fields are tuples with one entry
    per spatial axis (``padding`` may also be 'same' or 'valid'), or None when
    the strategy drew no window. ``out_channels`` is K (None: not drawn);
    ``output_padding`` is drawn for transposed convolutions only.
    """

    x_shape: tuple
    kernel: Optional[tuple] = None
    stride: Optional[tuple] = None
    padding: object = None
    dilation: Optional[tuple] = None
    groups: int = 1
    out_channels: Optional[int] = None
    transposed: bool = False
    output_padding: Optional[tuple] = None

    @property
    def spatial(self):
        return self.x_shape[2:]

    @property
    def weight_shape(self):
        """conv: (K, C/groups, *kernel); transposed: (C, K/groups, *kernel)."""
        C, K, G = self.x_shape[1], self.out_channels, self.groups
        return ((C, K // G) if self.transposed else (K, C // G)) + tuple(self.kernel)

    @property
    def conv_kwargs(self):
        """stride, padding, dilation, groups (and output_padding): the keywords of conv2d / conv_transpose2d."""
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        if self.transposed:
            kw["output_padding"] = self.output_padding
        return kw

    @property
    def im2col_args(self):
        """(kh, kw, stride, padding, dilation): the arguments of im2col / col2im after the array."""
        return (*self.kernel, self.stride, self.padding, self.dilation)


def geometries(*, dims=2, batch=(1, 2), channels=(1, 3), groups=1, out_channels=None, kernel=(1, 3),
               stride=(1, 3), padding=(0, 2), dilation=(1, 3), size=(1, 6), fit="offset",
               transposed=False, same_valid=False):
    """Hypothesis strategy of :class:`Geometry`: the one place conv / pooling / resizing tests draw shapes.

    Every range is an inclusive ``(low, high)`` pair or one int:

    * ``dims``: the number of spatial axes (``(1, 3)``: 1-D to 3-D);
    * ``batch``: N; ``groups``: G; ``channels``: C / G (C is a multiple of G);
      ``out_channels``: K / G (None: no K drawn);
    * ``kernel``, ``stride``, ``padding``, ``dilation``: each drawn per axis;
      ``kernel=None`` draws no window at all (just a shape, as resizing needs);
    * ``size`` and ``fit``, each spatial size n:

      - ``fit=None``: n in ``size``, whatever the window (the op may refuse it);
      - ``fit="offset"``: n in [lo, lo + size[1] - size[0]] with
        lo = max(size[0], span - 2 * pad), span = dilation * (k - 1) + 1, so at
        least one window fits (a convolution has an output pixel);
      - ``fit="bounded"``: n in [lo, max(span, size[1])], the same guarantee with
        a fixed upper bound.

    * ``transposed=True``: also ``output_padding`` per axis in [0, max(stride, dilation) - 1]
      (what torch accepts), and only geometries with a non-empty output of conv_transpose;
    * ``same_valid=True``: with stride 1, half the draws use padding 'same' or
      'valid' (the latter only where the window fits without padding).
    """
    from hypothesis import assume
    from hypothesis import strategies as st

    def _ints(bounds):
        low, high = (bounds, bounds) if isinstance(bounds, int) else bounds
        return st.integers(low, high)

    @st.composite
    def draw_geometry(draw):
        nd = draw(_ints(dims))
        G = draw(_ints(groups))
        C = G * draw(_ints(channels))
        K = None if out_channels is None else G * draw(_ints(out_channels))
        N = draw(_ints(batch))
        if kernel is None:
            spatial = tuple(draw(_ints(size)) for _ in range(nd))
            return Geometry((N, C) + spatial, groups=G, out_channels=K)
        k = tuple(draw(_ints(kernel)) for _ in range(nd))
        s = tuple(draw(_ints(stride)) for _ in range(nd))
        d = tuple(draw(_ints(dilation)) for _ in range(nd))
        p = tuple(draw(_ints(padding)) for _ in range(nd))
        op = None
        if transposed:
            op = tuple(draw(st.integers(0, max(si, di) - 1)) for si, di in zip(s, d))
        spans = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))
        spatial = []
        for span, pad in zip(spans, p):
            if fit is None:
                spatial.append(draw(_ints(size)))
                continue
            lo = max(size[0], span - 2 * pad)
            hi = lo + size[1] - size[0] if fit == "offset" else max(span, size[1])
            spatial.append(draw(st.integers(lo, hi)))
        spatial = tuple(spatial)
        if transposed:
            for n, ki, si, pi, di, opi in zip(spatial, k, s, p, d, op):
                assume((n - 1) * si - 2 * pi + di * (ki - 1) + opi + 1 >= 1)
        padding_value = p
        if same_valid and all(si == 1 for si in s) and draw(st.booleans()):
            padding_value = draw(st.sampled_from(["same", "valid"]))
            assume(padding_value == "same" or all(n >= span for n, span in zip(spatial, spans)))
        return Geometry((N, C) + spatial, k, s, padding_value, d, G, K, transposed, op)

    if fit not in (None, "offset", "bounded"):
        raise ValueError(f"fit must be None, 'offset' or 'bounded', got {fit!r}")
    return draw_geometry()


# ------------------------------------------------------------ a tiny run of the command line
TINY = ["--data", "shapes:n_train=8,n_val=4,n_test=4,size=16", "--model-option", "base=4,depth=2", "--epochs", "1",
        "--batch-size", "4", "--no-progress", "--num-predictions", "1"]


def tiny_run(tmp_path_factory, seed=3):
    """Train ``TINY`` into a fresh folder with ``seed``; the run folder's path."""
    from scratchseg.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, "--out", str(out), "--name", "r", "--seed", str(seed)]) == 0
    return str(out / "r")


def _double_class():
    import scratchseg

    class Double(scratchseg.Function):
        """out = 2 x; dx = 2 dout; nothing saved for backward."""

        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, dout):
            return 2 * dout

    return Double


Double = _double_class()


def count_calls(monkeypatch, module, names):
    """Replace ``module.<name>`` for each of ``names`` by a wrapper that records the call; the list of records."""
    calls = []
    for name in names:
        inner = getattr(module, name)

        def counted(*args, _inner=inner, _name=name):
            calls.append(_name)
            return _inner(*args)

        monkeypatch.setattr(module, name, counted)
    return calls

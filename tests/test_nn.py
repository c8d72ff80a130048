"""scratchseg.nn against torch.nn: names, shapes, state dicts, initialisation, layers' outputs."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

import scratchseg
from scratchseg import nn
from scratchseg.nn import init

from helpers import assert_close, cupy_or_skip, to_numpy, to_torch


@pytest.fixture(autouse=True)
def _seed():
    scratchseg.manual_seed(0)


def small_net(lib):
    """The same little network in scratchseg.nn or torch.nn (same names, shapes)."""
    return lib.Sequential(
        OrderedDict(
            stem=lib.Sequential(lib.Conv2d(3, 4, 3, padding=1, bias=False), lib.BatchNorm2d(4), lib.ReLU()),
            down=lib.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            up=lib.ConvTranspose2d(6, 2, 2, stride=2),
            norm=lib.BatchNorm2d(2, affine=False),
            heads=lib.ModuleList([lib.Conv2d(2, 5, 1), lib.Conv2d(2, 1, 1, bias=False)]),
        )
    )


def test_state_dict_names_and_shapes_match_torch():
    ours, theirs = small_net(nn).state_dict(), small_net(torch.nn).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert tuple(ours[key].shape) == tuple(theirs[key].shape), key
        assert ours[key].dtype == to_numpy(theirs[key]).dtype, key
    assert ours["stem.1.num_batches_tracked"].dtype == np.int64
    names = [n for n, _ in small_net(nn).named_parameters()]
    assert names == [n for n, _ in small_net(torch.nn).named_parameters()]
    assert [n for n, _ in small_net(nn).named_buffers()] == [n for n, _ in small_net(torch.nn).named_buffers()]
    assert [n for n, _ in small_net(nn).named_modules()] == [n for n, _ in small_net(torch.nn).named_modules()]


def test_repr_reads_like_torch():
    import re

    # BatchNorm's repr shows its bias flag from torch 2.5 on; compare without it on older torch
    drop_bn_bias = lambda s: re.sub(r", bias=(True|False)(?=, track_running_stats)", "", s)  # noqa: E731
    assert drop_bn_bias(repr(small_net(nn))) == drop_bn_bias(repr(small_net(torch.nn)))
    assert repr(nn.BatchNorm2d(3)) == "BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, " \
        "track_running_stats=True)"
    assert repr(nn.MaxPool2d(2)) == repr(torch.nn.MaxPool2d(2))
    assert repr(nn.Dropout(0.3)) == repr(torch.nn.Dropout(0.3))
    # every optional argument of a convolution shows once it differs from its default
    conv = dict(padding=1, dilation=2, groups=2, bias=False)
    assert repr(nn.Conv2d(4, 8, 3, **conv)) == repr(torch.nn.Conv2d(4, 8, 3, **conv))
    assert repr(nn.Conv2d(4, 8, 3, padding="same")) == repr(torch.nn.Conv2d(4, 8, 3, padding="same"))
    up = dict(stride=2, padding=1, output_padding=1, groups=2, dilation=2, bias=False)
    assert repr(nn.ConvTranspose2d(4, 8, 3, **up)) == repr(torch.nn.ConvTranspose2d(4, 8, 3, **up))
    assert repr(nn.ConvTranspose2d(4, 8, 2, stride=2)) == repr(torch.nn.ConvTranspose2d(4, 8, 2, stride=2))


def test_state_dict_round_trip_with_torch():
    torch.manual_seed(0)
    theirs = small_net(torch.nn).double()
    with torch.no_grad():  # non-trivial buffers, so they are checked too
        for name, b in theirs.named_buffers():
            if b.dtype.is_floating_point:
                b.copy_(torch.rand_like(b) + 0.5)
            else:
                b.fill_(7)
    ours = small_net(nn).double()
    result = ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    back = torch.nn.Module.load_state_dict(
        small_net(torch.nn).double(), {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}
    )
    assert not back.missing_keys
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(to_numpy(ours.state_dict()[key]), value.numpy(), err_msg=key)
    assert ours.state_dict()["stem.1.num_batches_tracked"].dtype == np.int64
    assert int(ours.state_dict()["stem.1.num_batches_tracked"]) == 7
    # the same weights give the same outputs
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6))
    ours.eval(), theirs.eval()
    out = ours.heads[0](ours.norm(ours.up(ours.down(ours.stem(scratchseg.Tensor(x))))))
    ref = theirs.heads[0](theirs.norm(theirs.up(theirs.down(theirs.stem(torch.from_numpy(x))))))
    assert_close(out, ref)


def test_load_casts_dtype_and_keeps_parameter_objects():
    net = small_net(nn)  # float32
    weight = net.stem[0].weight
    sd = {k: np.asarray(v, dtype=np.float64) + 1 for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    assert net.stem[0].weight is weight and weight.dtype == np.float32
    assert_close(weight.data, sd["stem.0.weight"].astype(np.float32))
    assert net.stem[1].num_batches_tracked.dtype == np.int64


def test_load_errors_list_missing_unexpected_and_mismatched():
    net = small_net(nn)
    sd = {k: np.array(v) for k, v in net.state_dict().items()}
    del sd["up.bias"], sd["stem.1.running_var"]
    sd["extra.weight"] = np.zeros(3)
    sd["down.weight"] = np.zeros((6, 4, 3, 3))
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict(sd)
    message = str(info.value)
    for text in ("'up.bias'", "'stem.1.running_var'", "'extra.weight'", "'down.weight'",
                 "(6, 2, 3, 3)", "(6, 4, 3, 3)"):
        assert text in message
    assert "missing" in message and "unexpected" in message and "size mismatch" in message
    # strict=False: still an error for the shape mismatch ...
    with pytest.raises(nn.StateDictError, match="down.weight"):
        net.load_state_dict(sd, strict=False)
    # ... and without it, the lists come back like torch's namedtuple
    sd["down.weight"] = np.full((6, 2, 3, 3), 0.5)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert missing == ["stem.1.running_var", "up.bias"] and unexpected == ["extra.weight"]
    assert np.all(to_numpy(net.down.weight) == 0.5)


def test_to_double_float_keep_integer_buffers():
    net = small_net(nn)
    params = list(net.parameters())
    assert all(p.dtype == np.float32 for p in params)
    assert net.double() is net
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert all(b.dtype == np.float64 for n, b in net.named_buffers() if "num_batches" not in n)
    assert net.stem[1].num_batches_tracked.dtype == np.int64
    net.to(np.float32)
    assert all(p.dtype == np.float32 for p in net.parameters())
    net.to(dtype=np.float64)
    assert net.up.weight.dtype == np.float64
    net.to("cpu").float()
    assert net.up.weight.dtype == np.float32
    with pytest.raises(TypeError):
        net.to(dtype=np.int32)


def test_default_dtype_is_used_for_new_parameters():
    try:
        scratchseg.set_default_dtype(np.float64)
        assert nn.Conv2d(1, 2, 3).weight.dtype == np.float64
        assert nn.BatchNorm2d(2).running_mean.dtype == np.float64
    finally:
        scratchseg.set_default_dtype(np.float32)
    assert nn.Conv2d(1, 2, 3).weight.dtype == np.float32


def test_registration_train_eval_zero_grad_apply():
    net = small_net(nn)
    assert net.training and all(m.training for m in net.modules())
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    assert [n for n, _ in net.named_children()] == ["stem", "down", "up", "norm", "heads"]
    expected = sum(p.numel() for p in small_net(torch.nn).parameters())
    assert net.num_parameters() == expected
    for p in net.parameters():
        p.grad = np.ones_like(p.data)
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    seen = []
    net.apply(lambda m: seen.append(type(m).__name__))
    assert seen[-1] == "Sequential" and seen.count("Conv2d") == 4
    # a shared parameter is listed once; plain attributes are not registered
    shared = nn.Sequential(net.down, net.down)
    assert len(list(shared.parameters())) == 2
    net.note = 3
    assert "note" not in net.state_dict() and net.note == 3
    # buffers: register, non-persistent ones are not saved
    net.register_buffer("scratch", np.zeros(2), persistent=False)
    assert "scratch" not in net.state_dict() and any(n == "scratch" for n, _ in net.named_buffers())
    with pytest.raises(TypeError):
        net.down.weight = np.zeros((6, 2, 3, 3))  # a parameter must stay a Parameter


def test_containers():
    layers = [nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 1, 1)]
    seq = nn.Sequential(*layers)
    assert len(seq) == 3 and seq[-1] is layers[2] and list(seq) == layers
    assert isinstance(seq[1:], nn.Sequential) and list(seq[1:]) == layers[1:]
    assert list(seq[1:].state_dict()) == ["2.weight", "2.bias"]  # slices keep the names, as torch's
    with pytest.raises(IndexError):
        seq[3]
    named = nn.Sequential(OrderedDict(a=nn.ReLU(), b=nn.Identity()))
    assert [n for n, _ in named.named_children()] == ["a", "b"]
    ml = nn.ModuleList([nn.Conv2d(1, 1, 1)])
    ml.append(nn.Conv2d(1, 2, 1)).extend([nn.ReLU()])
    ml.insert(0, nn.Identity())
    assert len(ml) == 4 and list(ml.state_dict()) == ["1.weight", "1.bias", "2.weight", "2.bias"]
    md = nn.ModuleDict({"x": nn.Conv2d(1, 1, 1)})
    md["y"] = nn.ReLU()
    assert "x" in md and list(md.keys()) == ["x", "y"] and list(md.state_dict()) == ["x.weight", "x.bias"]
    x = np.random.default_rng(0).standard_normal((1, 1, 5, 5)).astype(np.float32)
    assert seq(scratchseg.Tensor(x)).shape == (1, 1, 3, 3)
    assert nn.Identity(4, foo=1)(x) is x


def test_conv_block_orders_names_and_bias():
    block = nn.ConvBlock(3, 8)
    assert [n for n, _ in block.named_children()] == ["conv", "bn", "act"]
    assert block.conv.bias is None
    assert list(block.state_dict())[:2] == ["conv.weight", "bn.weight"]
    full = nn.ConvBlock(3, 8, order="conv-bn-act-dropout-pool", dropout=0.2, pool="max")
    assert [n for n, _ in full.named_children()] == ["conv", "bn", "act", "dropout", "pool"]
    pre = nn.ConvBlock(3, 8, order="bn-act-conv", activation="leaky_relu")
    assert pre.bn.num_features == 3 and pre.conv.bias is not None and isinstance(pre.act, nn.LeakyReLU)
    after = nn.ConvBlock(3, 8, order="conv-act-bn")
    assert after.conv.bias is not None and after.bn.num_features == 8
    assert [n for n, _ in nn.ConvBlock(3, 8, pool="avg", dropout=0.1).named_children()] == [
        "conv", "bn", "act", "dropout", "pool"]
    assert [n for n, _ in nn.ConvBlock(3, 8, activation=None).named_children()] == ["conv", "bn"]
    x = scratchseg.Tensor(np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32))
    assert full(x).shape == (2, 8, 3, 3)
    assert nn.ConvBlock(3, 4, kernel_size=3, padding=2, dilation=2)(x).shape == (2, 4, 6, 6)
    for bad in ("conv-bn-conv", "bn-act", "conv-norm"):
        with pytest.raises(ValueError):
            nn.ConvBlock(3, 8, order=bad)
    with pytest.raises(ValueError, match="activation"):
        nn.ConvBlock(3, 8, activation="swishy")


def test_conv_block_matches_torch_sequential():
    ours = nn.ConvBlock(3, 4, order="conv-bn-act").double()
    theirs = torch.nn.Sequential(OrderedDict(
        conv=torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), bn=torch.nn.BatchNorm2d(4), act=torch.nn.ReLU()
    )).double()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5))
    dout = np.random.default_rng(3).standard_normal((2, 4, 5, 5))
    xt = to_torch(x, requires_grad=True)
    xs = scratchseg.Tensor(x, requires_grad=True)
    out_s, out_t = ours(xs), theirs(xt)
    out_s.backward(dout)
    out_t.backward(torch.from_numpy(dout))
    assert_close(out_s, out_t)
    assert_close(xs.grad, xt.grad)
    assert_close(ours.conv.weight.grad, theirs.conv.weight.grad)
    assert_close(ours.bn.running_var, theirs.bn.running_var)


# ------------------------------------------------------------------ init
def test_conv_init_bounds_like_torch():
    for conv, fan_in in ((nn.Conv2d(6, 8, 3, groups=2), 3 * 9), (nn.ConvTranspose2d(6, 8, 3, groups=2), 4 * 9)):
        tconv = (torch.nn.Conv2d(6, 8, 3, groups=2) if isinstance(conv, nn.Conv2d)
                 else torch.nn.ConvTranspose2d(6, 8, 3, groups=2))
        assert init._calculate_fan_in_and_fan_out(conv.weight) == torch.nn.init._calculate_fan_in_and_fan_out(
            tconv.weight)
        bound = 1 / math.sqrt(fan_in)
        w, b = to_numpy(conv.weight), to_numpy(conv.bias)
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(w).max() > 0.8 * bound  # it does use the whole range
    big = nn.Conv2d(64, 64, 3)
    w = to_numpy(big.weight).astype(np.float64)
    bound = 1 / math.sqrt(64 * 9)
    assert abs(w.mean()) < 0.02 * bound
    assert abs(w.var() - bound**2 / 3) < 0.03 * bound**2 / 3  # variance of U(-b, b)


def test_init_functions_statistics():
    w = nn.Parameter(np.zeros((128, 64, 3, 3)))
    fan_in, fan_out = 64 * 9, 128 * 9
    init.kaiming_normal_(w, nonlinearity="relu")
    assert abs(w.data.std() - math.sqrt(2 / fan_in)) < 0.02 * math.sqrt(2 / fan_in)
    init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    assert abs(w.data.std() - math.sqrt(2 / fan_out)) < 0.02 * math.sqrt(2 / fan_out)
    init.kaiming_uniform_(w, nonlinearity="relu")
    assert np.abs(w.data).max() <= math.sqrt(6 / fan_in) and np.abs(w.data).max() > 0.99 * math.sqrt(6 / fan_in)
    init.xavier_uniform_(w, gain=2.0)
    a = 2.0 * math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(w.data).max() <= a and np.abs(w.data).max() > 0.99 * a
    init.normal_(w, 1.0, 0.5)
    assert abs(w.data.mean() - 1) < 0.01 and abs(w.data.std() - 0.5) < 0.01
    init.uniform_(w, -3, -2)
    assert w.data.min() >= -3 and w.data.max() <= -2
    init.constant_(w, 0.25)
    assert np.all(w.data == 0.25)
    init.zeros_(w), init.ones_(w)
    assert np.all(w.data == 1)
    for name, param in (("linear", None), ("tanh", None), ("relu", None), ("leaky_relu", 0.2), ("leaky_relu", None)):
        assert init.calculate_gain(name, param) == pytest.approx(torch.nn.init.calculate_gain(name, param))
    with pytest.raises(ValueError):
        init.kaiming_uniform_(nn.Parameter(np.zeros(3)))


def test_seed_makes_init_reproducible():
    scratchseg.manual_seed(5)
    a = to_numpy(nn.Conv2d(2, 3, 3).weight)
    scratchseg.manual_seed(5)
    b = to_numpy(nn.Conv2d(2, 3, 3).weight)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------- layers vs torch
def _copy_params(ours, theirs):
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})


@pytest.mark.parametrize(
    "make",
    [
        lambda L: L.Conv2d(3, 4, 4, padding="same", dilation=1),
        lambda L: L.Conv2d(3, 4, 3, padding="valid", stride=2),
        lambda L: L.MaxPool2d(3, stride=2, padding=1),
        lambda L: L.AvgPool2d(2),
        lambda L: L.AdaptiveAvgPool2d((2, 3)),
        lambda L: L.LeakyReLU(0.2),
        lambda L: L.Tanh(),
        lambda L: L.Sigmoid(),
        lambda L: L.Softmax(dim=1),
        lambda L: L.LogSoftmax(dim=1),
        lambda L: L.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        lambda L: L.Upsample(size=(5, 9), mode="nearest"),
        lambda L: L.Flatten(),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_layers_forward_backward_match_torch(make):
    ours, theirs = make(nn).double(), make(torch.nn).double()
    _copy_params(ours, theirs)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 6, 7))
    xs, xt = scratchseg.Tensor(x, requires_grad=True), to_torch(x, requires_grad=True)
    out_s, out_t = ours(xs), theirs(xt)
    assert out_s.shape == tuple(out_t.shape)
    dout = rng.standard_normal(out_s.shape)
    out_s.backward(dout)
    out_t.backward(torch.from_numpy(dout))
    assert_close(out_s, out_t)
    assert_close(xs.grad, xt.grad)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_close(p.grad, q.grad, msg=name)


def test_conv_transpose_output_size_argument():
    ours, theirs = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1).double(), torch.nn.ConvTranspose2d(
        3, 2, 3, stride=2, padding=1).double()
    _copy_params(ours, theirs)
    x = np.random.default_rng(5).standard_normal((1, 3, 4, 5))
    out = ours(scratchseg.Tensor(x), output_size=(8, 10))
    assert out.shape == (1, 2, 8, 10)
    assert_close(out, theirs(torch.from_numpy(x), output_size=[8, 10]))
    with pytest.raises(ValueError, match="output size"):
        ours(scratchseg.Tensor(x), output_size=(12, 10))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,shape", [("BatchNorm2d", (4, 3, 3, 2)), ("BatchNorm1d", (5, 3)),
                                       ("BatchNorm1d", (4, 3, 6)), ("BatchNorm3d", (2, 3, 2, 2, 3))])
def test_batchnorm_running_stats_and_eval_match_torch(cls, shape, momentum):
    ours = getattr(nn, cls)(3, momentum=momentum).double()
    theirs = getattr(torch.nn, cls)(3, momentum=momentum).double()
    rng = np.random.default_rng(6)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 3)))
        theirs.bias.copy_(torch.from_numpy(rng.standard_normal(3)))
    _copy_params(ours, theirs)
    for _ in range(3):
        x = rng.standard_normal(shape) * 2 + 1
        xs, xt = scratchseg.Tensor(x, requires_grad=True), to_torch(x, requires_grad=True)
        out_s, out_t = ours(xs), theirs(xt)
        dout = rng.standard_normal(shape)
        out_s.backward(dout)
        out_t.backward(torch.from_numpy(dout))
        assert_close(out_s, out_t)
        assert_close(xs.grad, xt.grad)
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, msg=key)
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    x = rng.standard_normal(shape)
    assert_close(ours(scratchseg.Tensor(x)), theirs(torch.from_numpy(x)))
    assert int(ours.num_batches_tracked) == 3  # evaluation does not count
    with pytest.raises(ValueError, match="channels"):
        ours(scratchseg.Tensor(np.zeros((2, 4) + tuple(shape[2:]))))


def test_batchnorm_without_running_stats():
    ours, theirs = nn.BatchNorm2d(2, track_running_stats=False).double().eval(), torch.nn.BatchNorm2d(
        2, track_running_stats=False).double().eval()
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    x = np.random.default_rng(7).standard_normal((3, 2, 2, 2))
    assert_close(ours(scratchseg.Tensor(x)), theirs(torch.from_numpy(x)))


def test_cross_entropy_loss_module():
    rng = np.random.default_rng(8)
    weight = rng.uniform(0.5, 2, 4)
    ours = nn.CrossEntropyLoss(weight=weight, ignore_index=255)
    theirs = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(weight), ignore_index=255)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    x = rng.standard_normal((2, 4, 3, 3))
    target = rng.integers(0, 4, (2, 3, 3))
    target[0, 1, 1] = 255
    xs, xt = scratchseg.Tensor(x, requires_grad=True), to_torch(x, requires_grad=True)
    ls, lt = ours(xs, target), theirs(xt, torch.from_numpy(target))
    ls.backward(), lt.backward()
    assert_close(ls, lt)
    assert_close(xs.grad, xt.grad)
    assert list(nn.CrossEntropyLoss().state_dict()) == []


def test_dropout_modules_train_and_eval():
    x = np.ones((4, 8, 3, 3))
    drop, drop2d = nn.Dropout(0.5), nn.Dropout2d(0.5)
    out = to_numpy(drop(scratchseg.Tensor(x)))
    assert set(np.unique(out)) <= {0.0, 2.0} and 0 < (out == 0).mean() < 1
    out2 = to_numpy(drop2d(scratchseg.Tensor(x)))
    per_channel = out2.reshape(4, 8, 9)
    assert np.all(per_channel.min(axis=2) == per_channel.max(axis=2))  # whole channels
    drop.eval(), drop2d.eval()
    assert np.array_equal(to_numpy(drop(scratchseg.Tensor(x))), x)
    assert np.array_equal(to_numpy(drop2d(scratchseg.Tensor(x))), x)
    with pytest.raises(ValueError):
        nn.Dropout(1.5)


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="kernel_size"):
        nn.Conv2d(3, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        nn.Conv2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="stride 1"):
        nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"Conv2d expects a 4-D input of shape \(N, 3, H, W\), got \(1, 2, 5, 5\)"):
        nn.Conv2d(3, 4, 3)(scratchseg.Tensor(np.zeros((1, 2, 5, 5), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"ConvTranspose2d expects a 4-D input .*got \(3, 5, 5\)"):
        nn.ConvTranspose2d(3, 4, 3)(scratchseg.Tensor(np.zeros((3, 5, 5), dtype=np.float32)))
    with pytest.raises(ValueError, match="exactly one"):
        nn.Upsample()
    # a float where an int is expected is both a TypeError (as torch says) and a ValueError
    for make in (lambda: nn.Conv2d(3, 4, 3, stride=1.5), lambda: nn.ConvTranspose2d(3, 4, 3, padding="same"),
                 lambda: nn.MaxPool2d(2.0), lambda: nn.AvgPool2d(2, padding=(1, 1, 1))):
        with pytest.raises(TypeError, match="must be an int or a pair of ints") as info:
            make()
        assert isinstance(info.value, ValueError)
    for make, match in ((lambda: nn.Conv2d(3, 4, 0), "kernel_size must be >= 1"),
                        (lambda: nn.Conv2d(3, 4, 3, padding=-1), "padding must be >= 0"),
                        (lambda: nn.ConvTranspose2d(3, 4, 3, output_padding=-1), "output_padding must be >= 0"),
                        (lambda: nn.MaxPool2d(2, stride=0), "stride must be >= 1"),
                        (lambda: nn.BatchNorm2d(0), "num_features must be a positive integer"),
                        (lambda: nn.Conv2d(3, True, 3), "out_channels must be a positive integer")):
        with pytest.raises(ValueError, match=match):
            make()


@pytest.mark.parametrize("padding", [1, (2, 0), "same", "valid"])
def test_conv_padding_attribute_is_torchs(padding):
    """A string padding stays a string (handed to F.conv2d), a number becomes a pair, as in torch."""
    ours = nn.Conv2d(2, 3, (3, 4), padding=padding, dilation=(1, 2))
    theirs = torch.nn.Conv2d(2, 3, (3, 4), padding=padding, dilation=(1, 2))
    assert ours.padding == theirs.padding
    assert ours.output_size(7, 9) == tuple(theirs(torch.zeros(1, 2, 7, 9)).shape[2:])


@pytest.mark.gpu
def test_module_cuda_round_trip_matches_cpu():
    cupy = cupy_or_skip()
    net = small_net(nn).double()
    x = np.random.default_rng(9).standard_normal((2, 3, 6, 6))
    net.eval()
    ref = to_numpy(net.heads[0](net.norm(net.up(net.down(net.stem(scratchseg.Tensor(x)))))))
    net.cuda()
    assert isinstance(net.stem[0].weight.data, cupy.ndarray)
    assert isinstance(net.stem[1].num_batches_tracked, cupy.ndarray)
    out = net.heads[0](net.norm(net.up(net.down(net.stem(scratchseg.Tensor(cupy.asarray(x)))))))
    assert_close(out, ref)
    sd = net.state_dict()
    assert all(isinstance(v, cupy.ndarray) for v in sd.values())
    net.cpu()
    assert isinstance(net.stem[0].weight.data, np.ndarray)
    net.cuda().load_state_dict({k: to_numpy(v) for k, v in sd.items()})  # numpy values onto the GPU
    assert isinstance(net.up.weight.data, cupy.ndarray)


def test_deepcopy_gives_independent_parameters_and_nn_functional_alias():
    import copy

    import scratchseg.nn.functional as NF

    assert NF.relu is scratchseg.functional.relu
    net = nn.Sequential(nn.ConvBlock(2, 3), nn.Conv2d(3, 1, 1))
    twin = copy.deepcopy(net)
    assert list(twin.state_dict()) == list(net.state_dict())
    twin[1].weight.data += 1
    assert not np.array_equal(to_numpy(twin[1].weight), to_numpy(net[1].weight))


from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(
    k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2),
    h=st.integers(6, 10), w=st.integers(6, 10), transposed=st.booleans(), op=st.integers(0, 2),
)
def test_output_size_formula_matches_torch_and_forward(k, s, p, d, h, w, transposed, op):
    x = np.random.default_rng(0).standard_normal((1, 2, h, w))
    if transposed:
        op = min(op, max(s, d) - 1)
        ours = nn.ConvTranspose2d(2, 3, k, stride=s, padding=p, output_padding=op, dilation=d)
        theirs = torch.nn.ConvTranspose2d(2, 3, k, stride=s, padding=p, output_padding=op, dilation=d)
    else:
        if d * (k - 1) + 1 > h + 2 * p or d * (k - 1) + 1 > w + 2 * p:
            return
        ours = nn.Conv2d(2, 3, k, stride=s, padding=p, dilation=d)
        theirs = torch.nn.Conv2d(2, 3, k, stride=s, padding=p, dilation=d)
    expected = tuple(theirs(torch.from_numpy(x).float()).shape[2:])
    if min(expected) <= 0:
        return
    assert ours.output_size(h, w) == expected
    assert ours(scratchseg.Tensor(x.astype(np.float32))).shape[2:] == expected

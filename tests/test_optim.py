"""scratchseg.optim against torch.optim: updates number for number, state dicts, schedules."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import scratchseg
from scratchseg import optim
from scratchseg.nn import Parameter

from helpers import assert_close, to_numpy

# the update rules are replaceable (sgd_update): every test on the numba kernels and on the reference
pytestmark = pytest.mark.usefixtures("kernel_set")

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in SHAPES]
    ours = [Parameter(a.copy()) for a in arrays]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in arrays]
    return ours, theirs


def _grads(step, seed=1):
    rng = np.random.default_rng(seed + 100 * step)
    return [rng.standard_normal(s) for s in SHAPES]


def _run(ours_opt, ours, theirs_opt, theirs, steps, skip_last_at=None):
    for step in range(steps):
        for i, (p, q, g) in enumerate(zip(ours, theirs, _grads(step))):
            if skip_last_at is not None and step == skip_last_at and i == len(ours) - 1:
                p.grad, q.grad = None, None  # a parameter without a gradient is left alone
                continue
            p.grad, q.grad = g.copy(), torch.from_numpy(g.copy())
        ours_opt.step()
        theirs_opt.step()
        for p, q in zip(ours, theirs):
            assert_close(p.data, q.detach(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "options",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.3),
        dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
        dict(lr=0.1, momentum=0.5, weight_decay=1e-3, maximize=True),
    ],
)
def test_sgd_matches_torch(options):
    ours, theirs = _params()
    _run(optim.SGD(ours, **options), ours, torch.optim.SGD(theirs, **options), theirs, steps=4, skip_last_at=2)


@pytest.mark.parametrize(
    "cls,options",
    [
        ("Adam", dict(lr=0.01)),
        ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
        ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=1e-2)),
        ("Adam", dict(lr=0.01, maximize=True)),
        ("AdamW", dict(lr=0.01)),
        ("AdamW", dict(lr=0.03, weight_decay=0.2, amsgrad=True)),
    ],
)
def test_adam_family_matches_torch(cls, options):
    ours, theirs = _params()
    _run(getattr(optim, cls)(ours, **options), ours, getattr(torch.optim, cls)(theirs, **options), theirs,
         steps=5, skip_last_at=1)


def test_param_groups_with_their_own_options():
    ours, theirs = _params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5, "momentum": 0.0}]  # noqa: E731
    ours_opt = optim.SGD(groups(ours), lr=0.1, momentum=0.9)
    theirs_opt = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9)
    assert ours_opt.param_groups[1]["lr"] == 0.5 and ours_opt.param_groups[0]["momentum"] == 0.9
    _run(ours_opt, ours, theirs_opt, theirs, steps=3)
    ours_opt.zero_grad()
    assert all(p.grad is None for p in ours)


def _npz_round_trip(state):
    buffer = io.BytesIO()
    np.savez(buffer, **optim.flatten_state(state))
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        return optim.unflatten_state({k: data[k] for k in data.files})


@pytest.mark.parametrize("cls,options", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                                         ("Adam", dict(lr=0.01, amsgrad=True, betas=(0.8, 0.9))),
                                         ("AdamW", dict(lr=0.01))])
def test_optimizer_state_survives_npz_and_resumes_exactly(cls, options):
    ours, theirs = _params()
    a_opt = getattr(optim, cls)(ours, **options)
    t_opt = getattr(torch.optim, cls)(theirs, **options)
    _run(a_opt, ours, t_opt, theirs, steps=2)
    saved = _npz_round_trip(a_opt.state_dict())
    # a fresh optimizer on copies of the parameters, restored from the file
    copies = [Parameter(p.data.copy()) for p in ours]
    b_opt = getattr(optim, cls)(copies, lr=123.0)
    b_opt.load_state_dict(saved)
    assert b_opt.param_groups[0]["lr"] == options["lr"]
    if "betas" in options:
        assert b_opt.param_groups[0]["betas"] == options["betas"]
    for step in range(2, 5):
        for p, c, q, g in zip(ours, copies, theirs, _grads(step)):
            p.grad, c.grad, q.grad = g.copy(), g.copy(), torch.from_numpy(g.copy())
        a_opt.step(), b_opt.step(), t_opt.step()
    for p, c, q in zip(ours, copies, theirs):
        np.testing.assert_array_equal(p.data, c.data)
        assert_close(c.data, q.detach(), rtol=1e-13, atol=1e-15)


def test_state_dict_layout_is_torchs():
    ours, theirs = _params()
    a_opt, t_opt = optim.SGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    _run(a_opt, ours, t_opt, theirs, steps=1)
    a_sd, t_sd = a_opt.state_dict(), t_opt.state_dict()
    assert sorted(a_sd["state"]) == sorted(t_sd["state"]) == [0, 1, 2]
    assert a_sd["param_groups"][0]["params"] == t_sd["param_groups"][0]["params"]
    for k in t_sd["state"]:
        assert_close(a_sd["state"][k]["momentum_buffer"], t_sd["state"][k]["momentum_buffer"])
    with pytest.raises(ValueError, match="parameter groups"):
        optim.SGD(ours, lr=0.1).load_state_dict({"state": {}, "param_groups": []})


def test_optimizer_argument_errors():
    p = [Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD(p, lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(p, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD([{"params": p}, {"params": p}], lr=0.1)


def test_step_leaves_no_graph_and_works_on_float32():
    w = Parameter(np.ones(3, dtype=np.float32))
    opt = optim.Adam([w], lr=0.1)
    loss = (w * w).sum()
    loss.backward()
    opt.step()
    assert w.dtype == np.float32 and w.is_leaf and np.all(w.data < 1)


# ---------------------------------------------------------------- schedules
def _lr_sequences(make_ours, make_theirs, steps=12, lr=0.1):
    p = [Parameter(np.zeros(1))]
    q = [torch.zeros(1, requires_grad=True)]
    o_opt, t_opt = optim.SGD(p, lr=lr), torch.optim.SGD(q, lr=lr)
    o_s, t_s = make_ours(o_opt), make_theirs(t_opt)
    ours, theirs = [o_s.get_last_lr()[0]], [t_s.get_last_lr()[0]]
    for _ in range(steps):
        o_opt.step(), t_opt.step()
        o_s.step(), t_s.step()
        ours.append(o_s.get_last_lr()[0])
        theirs.append(t_s.get_last_lr()[0])
        assert o_opt.param_groups[0]["lr"] == ours[-1]
    return ours, theirs, o_s, t_s


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("StepLR", dict(step_size=3, gamma=0.5)),
        ("StepLR", dict(step_size=1, gamma=0.9)),
        ("MultiStepLR", dict(milestones=[2, 5, 5, 9], gamma=0.3)),
        ("LambdaLR", dict(lr_lambda=lambda e: 1.0 / (1 + e) ** 0.5)),
    ],
)
def test_schedulers_match_torch_exactly(name, kwargs):
    ours, theirs, o_s, t_s = _lr_sequences(
        lambda o: getattr(optim.lr_scheduler, name)(o, **kwargs),
        lambda o: getattr(torch.optim.lr_scheduler, name)(o, **kwargs),
    )
    assert ours == theirs
    assert o_s.last_epoch == t_s.last_epoch and o_s.base_lrs == t_s.base_lrs
    sd, tsd = o_s.state_dict(), t_s.state_dict()
    for key in ("base_lrs", "last_epoch", "_step_count", "_last_lr"):
        assert sd[key] == tsd[key], key


@pytest.mark.parametrize("warmup", [0, 4])
def test_poly_lr_matches_lambda_lr_with_the_poly_formula(warmup):
    max_iters, power, factor = 10, 0.9, 0.1

    def poly(t):
        f = max(1.0 - t / max_iters, 0.0) ** power
        if t < warmup:
            f *= factor + (1 - factor) * t / warmup
        return f

    ours, theirs, _, _ = _lr_sequences(
        lambda o: optim.PolyLR(o, max_iters=max_iters, power=power, warmup_iters=warmup, warmup_factor=factor),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, poly),
        steps=12,
    )
    assert ours == pytest.approx(theirs, rel=1e-15, abs=0)
    assert ours[0] == pytest.approx(0.1 * (factor if warmup else 1.0)) and ours[-1] == 0.0
    if warmup:
        assert ours[1] > ours[0] and max(ours) > ours[warmup + 1]


def test_scheduler_state_dict_round_trip_resumes():
    def make():
        p = [Parameter(np.zeros(1))]
        opt = optim.SGD(p, lr=0.2)
        return opt, optim.MultiStepLR(opt, milestones=[3, 6], gamma=0.1)

    opt_a, sched_a = make()
    for _ in range(4):
        opt_a.step(), sched_a.step()
    flat = _npz_round_trip({"sched": sched_a.state_dict(), "opt": opt_a.state_dict()})
    opt_b, sched_b = make()
    opt_b.load_state_dict(flat["opt"])
    sched_b.load_state_dict(flat["sched"])
    assert sched_b.last_epoch == 4 and isinstance(sched_b.last_epoch, int)
    for _ in range(4):
        opt_a.step(), sched_a.step()
        opt_b.step(), sched_b.step()
        assert sched_a.get_last_lr() == sched_b.get_last_lr()
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


def test_scheduler_errors():
    opt = optim.SGD([Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="step_size"):
        optim.StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="max_iters"):
        optim.PolyLR(opt, max_iters=0)
    with pytest.raises(TypeError):
        optim.StepLR(object(), step_size=2)


def test_a_seeded_training_step_on_a_module():
    scratchseg.manual_seed(0)
    net = scratchseg.nn.Conv2d(1, 2, 3).double()
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = to_numpy(net.weight).copy()
    x = scratchseg.Tensor(np.random.default_rng(0).standard_normal((1, 1, 4, 4)))
    (net(x) * net(x)).mean().backward()
    grad = to_numpy(net.weight.grad).copy()
    opt.step()
    assert_close(net.weight, before - 0.1 * grad)


def test_step_with_closure_returns_the_loss():
    w = Parameter(np.array([3.0]))
    opt = optim.SGD([w], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 9.0 and w.data[0] == 3.0 - 0.25 * 6.0

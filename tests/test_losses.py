"""scratchseg.losses against torch: Dice, Jaccard, Tversky, Focal, Lovász written from the papers' formulas
with torch tensor operations here, torch's autograd of them the gradient oracle; ignore_index; errors; the
--loss spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import check_against_torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
from scratchseg import losses
from scratchseg.gradcheck import gradcheck

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference

TOL = dict(rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------- the oracles, in torch from the papers
def t_probs_onehot(x, t, mode, ignore_index):
    """(N, C, S) probabilities, (N, C, S) one-hot target (0 where ignored), (N, 1, S) valid mask."""
    N, C = x.shape[:2]
    x = x.reshape(N, C, -1)
    t = t.reshape(N, -1)
    valid = (t != ignore_index).unsqueeze(1)
    tt = torch.where(valid[:, 0], t, torch.zeros_like(t))
    if mode == "binary":
        return torch.sigmoid(x), ((tt == 1).unsqueeze(1) & valid).to(x.dtype), valid
    onehot = TF.one_hot(tt, C).permute(0, 2, 1).to(x.dtype)
    return torch.softmax(x, 1), onehot * valid, valid


def t_tversky(x, t, mode, num_w, alpha, beta, smooth, average, ignore_index):
    """1 - (num_w TP + s) / (num_w TP + alpha FP + beta FN + s); Dice: num_w=2, alpha=beta=1."""
    p, g, valid = t_probs_onehot(x, t, mode, ignore_index)
    p = p * valid
    tp = (p * g).sum((0, 2))
    fp = (p * (1 - g)).sum((0, 2))
    fn = ((1 - p) * g).sum((0, 2))  # (1 - p) on ignored pixels is multiplied by g = 0
    if average == "micro":
        tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
    den = num_w * tp + alpha * fp + beta * fn + smooth
    scored = den > 0
    score = (num_w * tp + smooth)[scored] / den[scored]
    return (1 - score).mean() if scored.any() else x.sum() * 0


def t_focal(x, t, mode, gamma, alpha, ignore_index, reduction="mean"):
    N, C = x.shape[:2]
    valid = t != ignore_index
    tt = torch.where(valid, t, torch.zeros_like(t))
    if mode == "binary":  # torchvision's sigmoid_focal_loss
        y = tt.unsqueeze(1).to(x.dtype)
        p = torch.sigmoid(x)
        ce = TF.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * (1 - p_t) ** gamma
        if alpha is not None:
            loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
        loss = loss[:, 0]
    else:  # Lin et al.: -alpha_t (1 - p_t)^gamma log p_t
        logp = torch.log_softmax(x, 1)
        lt = logp.gather(1, tt.unsqueeze(1))[:, 0]
        loss = -((1 - lt.exp()) ** gamma) * lt
        if alpha is not None:
            loss = torch.as_tensor(alpha, dtype=x.dtype)[tt] * loss
    loss = loss * valid
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def t_lovasz_grad(gt_sorted):  # Berman et al.'s reference code
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def t_lovasz_softmax(x, t, classes, per_image, ignore_index):
    probas = torch.softmax(x, 1)
    N, C = x.shape[:2]

    def flat(prob, lab):  # prob (C, M), lab (M,)
        keep = lab != ignore_index
        prob, lab = prob[:, keep], lab[keep]
        if lab.numel() == 0:
            return x.sum() * 0
        out = []
        for c in range(C):
            fg = (lab == c).to(x.dtype)
            if classes == "present" and fg.sum() == 0:
                continue
            errors = (fg - prob[c]).abs()
            errors_sorted, perm = torch.sort(errors, 0, descending=True)
            out.append(torch.dot(errors_sorted, t_lovasz_grad(fg[perm])))
        return torch.stack(out).mean() if out else x.sum() * 0

    if per_image:
        return torch.stack([flat(probas[n].reshape(C, -1), t[n].reshape(-1)) for n in range(N)]).mean()
    return flat(probas.transpose(0, 1).reshape(C, -1), t.reshape(-1))


def t_lovasz_hinge(x, t, per_image, ignore_index):
    def flat(logits, labels):
        keep = labels != ignore_index
        logits, labels = logits[keep], labels[keep].to(x.dtype)
        if labels.numel() == 0:
            return x.sum() * 0
        signs = 2.0 * labels - 1.0
        errors = 1.0 - logits * signs
        errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
        return torch.dot(TF.relu(errors_sorted), t_lovasz_grad(labels[perm]))

    N = x.shape[0]
    if per_image:
        return torch.stack([flat(x[n].reshape(-1), t[n].reshape(-1)) for n in range(N)]).mean()
    return flat(x.reshape(-1), t.reshape(-1))


# ------------------------------------------------------------------------ problems
@st.composite
def problems(draw, binary=False):
    N = draw(st.integers(1, 3))
    C = 1 if binary else draw(st.integers(2, 5))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 2))))
    seed = draw(st.integers(0, 2**31 - 1))
    ignore_index = draw(st.sampled_from([-100, 255, 0 if binary else C - 1]))
    ignore_fraction = draw(st.sampled_from([0.0, 0.0, 0.3, 0.7]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C) + spatial) * 2
    t = rng.integers(0, 2 if binary else C, size=(N,) + spatial)
    if ignore_index in (0, C - 1) and not binary:  # a class id used as ignore_index: relabel it away
        t = np.where(t == ignore_index, (ignore_index + 1) % C, t)
    if binary and ignore_index == 0:
        ignore_index = -1
    t[rng.random(t.shape) < ignore_fraction] = ignore_index
    return x, t, ignore_index, rng


MODES = ["multiclass", "binary"]


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=20)
@given(data=st.data())
def test_dice_jaccard_tversky_match_the_formula_in_torch(mode, data):
    x, t, ii, rng = data.draw(problems(binary=mode == "binary"))
    smooth = data.draw(st.sampled_from([0.0, 1.0, 0.37]))
    average = data.draw(st.sampled_from(["macro", "micro"]))
    alpha, beta = data.draw(st.floats(0.05, 1.0)), data.draw(st.floats(0.05, 1.0))
    kw = dict(mode=mode, smooth=smooth, average=average, ignore_index=ii)
    cases = [
        (lambda x, t: losses.dice_loss(x, t, **kw), lambda x, t: t_tversky(x, t, mode, 2, 1, 1, smooth, average, ii)),
        (lambda x, t: losses.jaccard_loss(x, t, **kw),
         lambda x, t: t_tversky(x, t, mode, 1, 1, 1, smooth, average, ii)),
        (lambda x, t: losses.tversky_loss(x, t, alpha=alpha, beta=beta, **kw),
         lambda x, t: t_tversky(x, t, mode, 1, alpha, beta, smooth, average, ii)),
    ]
    for ours, theirs in cases:
        check_against_torch(ours, theirs, [x, t], seed=rng, **TOL)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=20)
@given(data=st.data())
def test_focal_matches_the_formula_in_torch(mode, data):
    x, t, ii, rng = data.draw(problems(binary=mode == "binary"))
    gamma = data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    if mode == "binary":
        alpha = data.draw(st.sampled_from([None, 0.25, 0.8]))
    else:
        alpha = data.draw(st.sampled_from([None, "weights"]))
        alpha = None if alpha is None else rng.uniform(0.2, 2.0, x.shape[1])
    if reduction == "mean" and not (t != ii).any():
        # 'mean' of nothing is nan on both sides (checked separately below): one position labelled 0,
        # a class in both modes and never the ignore_index (C - 1 >= 1, or -100, 255, -1)
        t[(0,) * t.ndim] = 0
    check_against_torch(
        lambda x, t: losses.focal_loss(x, t, mode, gamma, alpha, reduction, ignore_index=ii),
        lambda x, t: t_focal(x, t, mode, gamma, alpha, ii, reduction), [x, t], seed=rng, **TOL)


def test_focal_with_gamma_0_is_cross_entropy(rng):
    x = rng.standard_normal((2, 4, 3, 5))
    t = rng.integers(0, 4, (2, 3, 5))
    t[0, 0] = 255
    a, b = scratchseg.Tensor(x, requires_grad=True), scratchseg.Tensor(x, requires_grad=True)
    fl = losses.focal_loss(a, t, gamma=0.0, ignore_index=255)
    ce = scratchseg.functional.cross_entropy(b, t, ignore_index=255)
    fl.backward()
    ce.backward()
    assert abs(fl.item() - ce.item()) < 1e-12
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-10, atol=1e-14)


@settings(max_examples=20)
@given(data=st.data())
def test_lovasz_softmax_matches_the_reference_in_torch(data):
    x, t, ii, rng = data.draw(problems())
    classes = data.draw(st.sampled_from(["present", "all"]))
    per_image = data.draw(st.booleans())
    check_against_torch(
        lambda x, t: losses.lovasz_softmax(x, t, classes, per_image, ignore_index=ii),
        lambda x, t: t_lovasz_softmax(x, t, classes, per_image, ii), [x, t], seed=rng, **TOL)


@settings(max_examples=20)
@given(data=st.data())
def test_lovasz_hinge_matches_the_reference_in_torch(data):
    x, t, ii, rng = data.draw(problems(binary=True))
    per_image = data.draw(st.booleans())
    check_against_torch(
        lambda x, t: losses.lovasz_hinge(x, t, per_image, ignore_index=ii),
        lambda x, t: t_lovasz_hinge(x, t, per_image, ii), [x, t], seed=rng, **TOL)


# ------------------------------------------------------------------- ignore_index
def _all_losses(mode, ii):
    if mode == "binary":
        return {
            "bce": losses.BinaryCrossEntropyLoss(ignore_index=ii),
            "dice": losses.DiceLoss("binary", ignore_index=ii),
            "jaccard": losses.JaccardLoss("binary", smooth=0.0, ignore_index=ii),
            "tversky": losses.TverskyLoss("binary", 0.3, 0.7, ignore_index=ii),
            "focal": losses.FocalLoss("binary", alpha=0.25, ignore_index=ii),
            "lovasz": losses.LovaszLoss("binary", ignore_index=ii),
            "sum": losses.make_criterion("bce+0.5*dice+focal", binary=True, ignore_index=ii),
        }
    return {
        "dice": losses.DiceLoss(ignore_index=ii),
        "dice micro": losses.DiceLoss(average="micro", smooth=0.0, ignore_index=ii),
        "jaccard": losses.JaccardLoss(ignore_index=ii),
        "tversky": losses.TverskyLoss(alpha=0.3, beta=0.7, ignore_index=ii),
        "focal": losses.FocalLoss(gamma=2.0, alpha=[0.5, 1.0, 2.0], ignore_index=ii),
        "lovasz": losses.LovaszLoss(ignore_index=ii),
        "lovasz per image": losses.LovaszLoss(per_image=True, classes="all", ignore_index=ii),
        "sum": losses.make_criterion("ce+0.5*dice+lovasz+tversky", ignore_index=ii),
    }


@pytest.mark.parametrize("mode", MODES)
def test_ignored_pixels_change_nothing_and_get_exactly_zero_gradient(mode, rng):
    C, ii = (1, 255) if mode == "binary" else (3, 255)
    x = rng.standard_normal((2, C, 6, 5))
    t = rng.integers(0, 2 if mode == "binary" else C, (2, 6, 5))
    ignored = rng.random(t.shape) < 0.4
    t[ignored] = ii
    other = x.copy()
    other[np.broadcast_to(ignored[:, None], x.shape)] = rng.standard_normal(int(ignored.sum()) * C) * 50
    for name, loss in _all_losses(mode, ii).items():
        values, grads = [], []
        for scores in (x, other):
            xt = scratchseg.Tensor(scores.copy(), requires_grad=True)
            out = loss(xt, t)
            out.backward()
            values.append(out.item())
            grads.append(xt.grad)
        assert values[0] == values[1], name
        mask = np.broadcast_to(ignored[:, None], x.shape)
        assert np.array_equal(grads[0][~mask], grads[1][~mask]), name
        assert (grads[0][mask] == 0).all() and (grads[1][mask] == 0).all(), name
        assert np.abs(grads[0][~mask]).max() > 0, name  # the counted pixels do learn


def test_losses_on_a_batch_with_every_pixel_ignored_are_defined(rng):
    x = scratchseg.Tensor(rng.standard_normal((1, 3, 2, 2)), requires_grad=True)
    t = np.full((1, 2, 2), 255)
    for loss in (losses.dice_loss, losses.jaccard_loss, losses.tversky_loss, losses.lovasz_softmax):
        assert loss(x, t, ignore_index=255).item() == 0
    assert np.isnan(losses.focal_loss(x, t, ignore_index=255).item())  # as cross_entropy: 0/0
    out = losses.dice_loss(x, t, ignore_index=255) + losses.lovasz_softmax(x, t, ignore_index=255)
    out.backward()
    assert (x.grad == 0).all()


# -------------------------------------------------------------------- gradcheck and values
@pytest.mark.parametrize("mode", MODES)
def test_finite_differences(mode, rng):
    C = 1 if mode == "binary" else 3
    x = scratchseg.Tensor(rng.standard_normal((2, C, 3, 3)), requires_grad=True)
    t = rng.integers(0, 2 if mode == "binary" else C, (2, 3, 3))
    t[0, 0, 0] = -100
    fns = [lambda x: losses.dice_loss(x, t, mode), lambda x: losses.tversky_loss(x, t, mode, 0.2, 0.9, smooth=0.1),
           lambda x: losses.focal_loss(x, t, mode, gamma=1.5)]
    fns.append((lambda x: losses.lovasz_hinge(x, t)) if mode == "binary" else (lambda x: losses.lovasz_softmax(x, t)))
    for fn in fns:
        assert gradcheck(fn, (x,))


def test_perfect_prediction_scores_zero_and_a_wrong_one_scores_high():
    t = np.array([[[0, 1], [2, 1]]])
    right = np.transpose(np.eye(3)[t] * 40 - 20, (0, 3, 1, 2))  # (1, 3, 2, 2)
    for loss in (losses.dice_loss, losses.jaccard_loss, losses.tversky_loss, losses.lovasz_softmax):
        assert loss(right, t).item() < 1e-6
        assert loss(-right, t).item() > 0.5


# ---------------------------------------------------------------------- bad input
def test_a_binary_loss_refuses_several_channels_and_a_multiclass_one_a_single_channel(rng):
    x3, x1 = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 1, 4, 4))
    t = rng.integers(0, 2, (2, 4, 4))
    for fn in (losses.dice_loss, losses.jaccard_loss, losses.tversky_loss, losses.focal_loss):
        with pytest.raises(ValueError, match=r"mode='binary'\) expects one channel.*got 3 channels"):
            fn(x3, t, mode="binary")
        with pytest.raises(ValueError, match=r"mode='multiclass'\) expects one score per class.*1 channel"):
            fn(x1, t)
    with pytest.raises(ValueError, match="expects one channel"):
        losses.lovasz_hinge(x3, t)
    with pytest.raises(ValueError, match="1 channel"):
        losses.lovasz_softmax(x1, t)
    with pytest.raises(ValueError, match="expects one channel"):
        losses.BinaryCrossEntropyLoss()(x3, t)


def test_binary_targets_outside_0_1_are_refused_unless_ignored(rng):
    x = rng.standard_normal((1, 1, 3, 3))
    t = np.zeros((1, 3, 3), dtype=np.int64)
    t[0, 1, 1] = 2
    for fn in (lambda x, t, **k: losses.dice_loss(x, t, "binary", **k), losses.lovasz_hinge,
               lambda x, t, **k: losses.focal_loss(x, t, "binary", **k),
               lambda x, t, **k: losses.BinaryCrossEntropyLoss(**k)(x, t)):
        with pytest.raises(ValueError, match=r"label 2, outside \{0, 1\}"):
            fn(x, t)
        assert np.isfinite(fn(x, t, ignore_index=2).item())
    t[0, 1, 1] = 255
    with pytest.raises(ValueError, match=r"label 255, outside \{0, 1\}.*ignore_index=-100"):
        losses.dice_loss(x, t, "binary")


def test_other_bad_arguments_are_named(rng):
    x, t = rng.standard_normal((1, 3, 2, 2)), rng.integers(0, 3, (1, 2, 2))
    with pytest.raises(ValueError, match="label 3, outside the class range"):
        losses.dice_loss(x, t + 1)
    with pytest.raises(ValueError, match="target has shape"):
        losses.dice_loss(x, t[:, :1])
    with pytest.raises(ValueError, match="mode='both'"):
        losses.dice_loss(x, t, mode="both")
    with pytest.raises(ValueError, match="average='mean'"):
        losses.dice_loss(x, t, average="mean")
    with pytest.raises(TypeError, match="integer class indices"):
        losses.dice_loss(x, t.astype(float))
    with pytest.raises(ValueError, match="alpha must be None or 3 class weights"):
        losses.focal_loss(x, t, alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="gamma"):
        losses.focal_loss(x, t, gamma=-1)


# -------------------------------------------------------------------- the --loss spec
def test_parse_loss_reads_sums_and_weights():
    assert losses.parse_loss("ce") == [(1.0, "ce")]
    assert losses.parse_loss("ce+dice") == [(1.0, "ce"), (1.0, "dice")]
    assert losses.parse_loss(" CE + 0.5*Dice+2*lovasz") == [(1.0, "ce"), (0.5, "dice"), (2.0, "lovasz")]


@pytest.mark.parametrize("spec, message", [
    ("cee", r"unknown loss 'cee' in 'cee'; known losses: ce, bce, dice, jaccard, tversky, focal, lovasz"),
    ("ce+dise", r"unknown loss 'dise' in 'ce\+dise'"),
    ("ce+", r"cannot read '' in loss 'ce\+'"),
    ("ce*0.5", r"cannot read 'ce\*0.5'"),
    ("0*dice", r"weight of 'dice' in loss '0\*dice' must be positive"),
])
def test_parse_loss_errors_name_the_value_and_the_known_losses(spec, message):
    with pytest.raises(ValueError, match=message):
        losses.parse_loss(spec)


def test_make_criterion_checks_the_mode_and_sums_exactly(rng):
    with pytest.raises(ValueError, match="'ce' does not fit a one-channel binary model: use 'bce'"):
        losses.make_criterion("ce+dice", binary=True)
    with pytest.raises(ValueError, match="'bce' does not fit a multi-class model.*--binary"):
        losses.make_criterion("bce")
    x = rng.standard_normal((2, 3, 4, 4))
    t = rng.integers(0, 3, (2, 4, 4))
    a, b = scratchseg.Tensor(x, requires_grad=True), scratchseg.Tensor(x, requires_grad=True)
    losses.make_criterion("ce+0.5*dice")(a, t).backward()
    (scratchseg.functional.cross_entropy(b, t) + losses.dice_loss(b, t) * 0.5).backward()
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-12)
    assert isinstance(losses.make_criterion("dice"), losses.DiceLoss)


@pytest.mark.parametrize("mode", MODES)
def test_float32_in_float32_out_and_close_to_float64(mode, rng):
    C = 1 if mode == "binary" else 3
    x = rng.standard_normal((2, C, 5, 6))
    t = rng.integers(0, 2 if mode == "binary" else C, (2, 5, 6))
    t[0, 0] = 255
    for name, loss in _all_losses(mode, 255).items():
        if mode == "binary" and name == "bce":
            loss = losses.BinaryCrossEntropyLoss(weight=[0.3, 2.0], ignore_index=255)
        a, b = scratchseg.Tensor(x.astype(np.float32), requires_grad=True), scratchseg.Tensor(x, requires_grad=True)
        out32, out64 = loss(a, t), loss(b, t)
        out32.backward()
        out64.backward()
        assert out32.dtype == np.float32 and a.grad.dtype == np.float32, name
        assert abs(out32.item() - out64.item()) < 1e-5, name
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_every_loss_on_cupy_matches_numpy(mode, rng):
    from helpers import cupy_or_skip

    from scratchseg import backend

    cupy = cupy_or_skip()
    C = 1 if mode == "binary" else 3
    x = rng.standard_normal((2, C, 5, 6))
    t = rng.integers(0, 2 if mode == "binary" else C, (2, 5, 6))
    t[0, 0] = 255
    for name in _all_losses(mode, 255):
        cpu = scratchseg.Tensor(x, requires_grad=True)
        out = _all_losses(mode, 255)[name](cpu, t)
        out.backward()
        with backend.use("cupy"):
            gpu = scratchseg.Tensor(cupy.asarray(x), requires_grad=True)
            out_gpu = _all_losses(mode, 255)[name](gpu, cupy.asarray(t))
            out_gpu.backward()
        assert abs(float(out_gpu.item()) - out.item()) < 1e-10, name
        np.testing.assert_allclose(cupy.asnumpy(gpu.grad), cpu.grad, rtol=1e-8, atol=1e-12, err_msg=name)

"""The dense CRF (scratchseg.crf) and its permutohedral lattice (kernels/cpu/lattice.py).

* the exact messages and the whole mean-field inference against torch, computed
  independently from the formulas;
* the lattice's own-pixel weight against the lattice filtering a single pixel;
* lattice vs exact on small photo-like images, to the accuracy that
  scratchseg/crf.py states;
* the CRF cleans a noisy prediction of a two-region image;
* shapes, batches, dtypes, and every kind of bad input.
"""

from __future__ import annotations

import numpy as np
import pytest

from scratchseg import crf
from scratchseg.crf import bilateral_features, dense_crf, gaussian_message, smoothness_features

lattice = pytest.importorskip("kernels.cpu.lattice")  # the lattice needs Numba

pytestmark = pytest.mark.usefixtures("kernel_set")  # the kernel set must not change a CRF's output


def scene(S, rng, noise=6.0):
    """A small photo-like image (colour gradient, a disc and a bar of other colours, camera noise) and its labels."""
    y, x = np.mgrid[0:S, 0:S] / (S - 1)
    img = np.stack([60 + 80 * x, 90 + 60 * y, 150 - 50 * x], axis=-1)
    cy, cx, rad = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    disc = (y - cy) ** 2 + (x - cx) ** 2 < rad**2
    bar = np.abs(x - rng.uniform(0.1, 0.9)) < 0.08
    img[disc] = rng.uniform(0, 255, 3)
    img[bar] = rng.uniform(0, 255, 3)
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), np.where(bar, 2, np.where(disc, 1, 0))


def softmax(x, axis=0):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def noisy_probs(label, K, rng, signal=2.0, noise=1.5):
    """softmax(signal * one-hot(truth) + Gaussian noise): a network that is right on most pixels only."""
    onehot = np.eye(K)[label].transpose(2, 0, 1)  # (K, H, W)
    return softmax(signal * onehot + rng.normal(0, noise, onehot.shape))


# ------------------------------------------------------- the exact reference vs torch
def test_exact_message_matches_torch(rng):
    torch = pytest.importorskip("torch")
    f = rng.normal(0, 1.5, (40, 5))
    v = rng.random((40, 3))
    ft, vt = torch.from_numpy(f), torch.from_numpy(v)
    k = torch.exp(-0.5 * torch.cdist(ft, ft) ** 2)  # (P, P), diagonal 1
    expected = ((k - torch.eye(40, dtype=k.dtype)) @ vt) / k.sum(dim=1, keepdim=True)
    np.testing.assert_allclose(gaussian_message(f, v, filter="exact"), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_exact_mean_field_matches_torch(rng):
    """The whole inference, written again from the formulas in torch: Q <- softmax(log p + w1 M_bil + w2 M_smooth)."""
    torch = pytest.importorskip("torch")
    K, H, W = 3, 6, 7
    image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    probs = softmax(rng.normal(0, 2, (K, H, W)))
    probs[0, 0, 0], probs[1, 0, 0], probs[2, 0, 0] = 0.0, 1e-9, 1.0 - 1e-9  # below the clip
    params = dict(bilateral_weight=4.0, theta_alpha=3.0, theta_beta=40.0, smoothness_weight=3.0, theta_gamma=1.5)
    ours = dense_crf(probs, image, iterations=5, filter="exact", **params)

    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    xy = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)  # (P, 2) row-major, x first
    rgb = torch.from_numpy(image.reshape(-1, 3).astype(np.float64))
    log_p = torch.log(torch.from_numpy(probs.reshape(K, -1).T).clamp_min(1e-5))  # (P, K)

    def message(feat):
        k = torch.exp(-0.5 * torch.cdist(feat, feat) ** 2)
        return lambda q: ((k - torch.eye(len(feat), dtype=k.dtype)) @ q) / k.sum(dim=1, keepdim=True)

    bil = message(torch.cat([xy / params["theta_alpha"], rgb / params["theta_beta"]], dim=1))
    smooth = message(xy / params["theta_gamma"])
    q = torch.softmax(log_p, dim=1)
    for _ in range(5):
        q = torch.softmax(log_p + params["bilateral_weight"] * bil(q) + params["smoothness_weight"] * smooth(q), dim=1)
    np.testing.assert_allclose(ours, q.T.reshape(K, H, W).numpy(), rtol=1e-10, atol=1e-12)


def test_features_are_position_and_colour_over_their_deviations():
    image = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    f = bilateral_features(image, 2.0, 4.0)
    # pixel (y=1, x=2) is row 1*3 + 2 of the row-major order
    np.testing.assert_array_equal(f[5], [2 / 2.0, 1 / 2.0, *(image[1, 2] / 4.0)])
    np.testing.assert_array_equal(smoothness_features(2, 3, 0.5)[5], [4.0, 2.0])


# ------------------------------------------------------------------ the lattice
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_lattice_self_weight_is_what_it_hands_a_pixel_back(d, rng):
    """s_i (computed from the blur paths) = the lattice filtering a one-hot value at i, read at i."""
    N = 40
    lat = lattice.PermutohedralLattice(rng.random((N, d)) * 3)
    handed_back = np.array([lat.filter(np.eye(N)[:, [i]])[i, 0] for i in range(N)])
    np.testing.assert_allclose(lat.self_weight, handed_back, rtol=1e-12)
    assert np.all(lat.self_weight > 0)
    assert np.all(lat.norm >= lat.self_weight * (1 - 1e-12))  # L(1) = s_i + what the others add (>= 0)


def test_lattice_filter_is_linear_with_the_norm_as_filter_of_ones(rng):
    lat = lattice.PermutohedralLattice(rng.random((60, 5)) * 4)
    a, b = rng.random((60, 3)), rng.random((60, 3))
    np.testing.assert_allclose(lat.filter(2 * a - b), 2 * lat.filter(a) - lat.filter(b), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lat.filter(np.ones((60, 1)))[:, 0], lat.norm, rtol=1e-12)
    # float32 runs in float32, to float32 accuracy
    out32 = lat.filter(a.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, lat.filter(a), rtol=1e-5)


def test_an_isolated_pixel_gets_no_message():
    """A point far from all others in feature space: exact and lattice both give M = 0 (not its own value)."""
    f = np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [40.0, 40.0]])
    v = np.array([[1.0], [0.0], [1.0], [1.0]])
    for filter in ("exact", "lattice"):
        assert gaussian_message(f, v, filter=filter)[3, 0] == pytest.approx(0.0, abs=1e-12)


def test_lattice_rejects_bad_features():
    with pytest.raises(ValueError, match=r"\(N, d\) array"):
        lattice.PermutohedralLattice(np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        lattice.PermutohedralLattice(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="N = 3 points"):
        lattice.PermutohedralLattice(np.zeros((3, 2))).filter(np.zeros((4, 1)))


# ------------------------------------------------------- lattice vs exact: the stated accuracy
KERNELS = {  # name: (features of an S x S image, (max mean |diff|, max |diff|)) as stated in scratchseg/crf.py
    "bilateral, DeepLab's deviations": (lambda im, S: bilateral_features(im, 121.0, 5.0), (0.03, 0.35)),
    "bilateral, theta_alpha=5, theta_beta=10": (lambda im, S: bilateral_features(im, 5.0, 10.0), (0.03, 0.35)),
    "smoothness, theta_gamma=3": (lambda im, S: smoothness_features(S, S, 3.0), (0.005, 0.06)),
    "smoothness, theta_gamma=1": (lambda im, S: smoothness_features(S, S, 1.0), (0.01, 0.06)),
}


@pytest.mark.parametrize("S", [16, 24])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_lattice_messages_match_the_exact_ones(kernel, S, rng):
    features, (mean_tol, max_tol) = KERNELS[kernel]
    for _ in range(3):
        image, _ = scene(S, rng)
        q = softmax(rng.normal(0, 1, (S * S, 4)), axis=1)  # a mean-field Q: rows sum to 1
        f = features(image, S)
        exact = gaussian_message(f, q, filter="exact")
        fast = gaussian_message(f, q, filter="lattice")
        diff = np.abs(fast - exact)
        assert diff.mean() <= mean_tol and diff.max() <= max_tol, (diff.mean(), diff.max())


@pytest.mark.parametrize("S", [16, 20, 24])
def test_lattice_crf_labels_agree_with_the_exact_crf(S, rng):
    for params in ({}, dict(theta_alpha=10.0, theta_beta=20.0)):
        image, label = scene(S, rng)
        probs = noisy_probs(label, 3, rng)
        exact = dense_crf(probs, image, filter="exact", **params)
        fast = dense_crf(probs, image, filter="lattice", **params)
        agree = np.mean(exact.argmax(0) == fast.argmax(0))
        assert agree >= 0.97, (params, agree)
        assert np.abs(fast - exact).mean() < 0.02


# ------------------------------------------------------------------ what it is for
@pytest.mark.parametrize("filter, S", [("exact", 24), ("lattice", 24), ("lattice", 64)])
def test_crf_cleans_a_noisy_two_region_prediction(filter, S, rng):
    """Left and right halves of different colours; probabilities = truth + strong noise. The CRF repairs most errors."""
    image = np.zeros((S, S, 3))
    image[:, : S // 2] = (40, 90, 160)
    image[:, S // 2 :] = (170, 120, 40)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((S, S), int)
    truth[:, S // 2 :] = 1
    probs = noisy_probs(truth, 2, rng, signal=1.0, noise=1.2)
    before = np.mean(probs.argmax(0) == truth)
    after = np.mean(dense_crf(probs, image, filter=filter).argmax(0) == truth)
    assert before < 0.85  # the noise is strong...
    assert after >= 0.98 and after >= before + 0.15, (before, after)  # ...and the CRF fixes it


def test_more_weight_on_the_smoothness_kernel_smooths_more(rng):
    image, label = scene(24, rng)
    probs = noisy_probs(label, 3, rng)

    def disagreements(q):  # horizontally adjacent pixels with different labels
        lab = q.argmax(0)
        return int(np.sum(lab[:, 1:] != lab[:, :-1]))

    weak = dense_crf(probs, image, bilateral_weight=0.0, smoothness_weight=1.0)
    strong = dense_crf(probs, image, bilateral_weight=0.0, smoothness_weight=6.0)
    assert disagreements(strong) < disagreements(weak) < disagreements(probs)


# ------------------------------------------------------------------ shapes and dtypes
def test_shapes_batches_and_dtypes(rng):
    images, probs = [], []
    for _ in range(2):
        image, label = scene(12, rng)
        images.append(image)
        probs.append(noisy_probs(label, 3, rng))
    images, probs = np.stack(images), np.stack(probs)  # (2, 12, 12, 3), (2, 3, 12, 12)
    batch = dense_crf(probs, images)
    assert batch.shape == (2, 3, 12, 12) and batch.dtype == np.float64
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, rtol=1e-12)
    for n in range(2):  # a batch is its images one by one
        np.testing.assert_array_equal(batch[n], dense_crf(probs[n], images[n]))
    single32 = dense_crf(probs[0].astype(np.float32), images[0])
    assert single32.shape == (3, 12, 12) and single32.dtype == np.float32
    np.testing.assert_allclose(single32, batch[0], atol=1e-4)
    # a float image in [0, 1] is the uint8 one over 255
    np.testing.assert_allclose(dense_crf(probs[0], images[0] / 255.0), batch[0], rtol=1e-10)


def test_zero_iterations_give_the_clipped_probabilities_back(rng):
    probs = softmax(rng.normal(0, 1, (4, 5, 6)))
    probs[:, 0, 0] = (1.0, 0.0, 0.0, 0.0)
    out = dense_crf(probs, np.zeros((5, 6, 3), np.uint8), iterations=0)
    expected = np.maximum(probs, 1e-5)
    np.testing.assert_allclose(out, expected / expected.sum(axis=0), rtol=1e-12)


def test_uniform_probabilities_stay_uniform(rng):
    """Every pixel's message is the same for every class: nothing to prefer."""
    image, _ = scene(16, rng)
    out = dense_crf(np.full((3, 16, 16), 1 / 3), image)
    np.testing.assert_allclose(out, 1 / 3, rtol=1e-6)


# ------------------------------------------------------------------ bad input
def test_scores_of_another_size_than_the_image_name_both_sizes():
    probs = np.full((2, 10, 12), 0.5)
    with pytest.raises(ValueError, match=r"probs are 10x12 \(H x W\), the image is 10x14"):
        dense_crf(probs, np.zeros((10, 14, 3), np.uint8))
    with pytest.raises(ValueError, match=r"probs are 2 images of 10x12 \(H x W\), the image is 3 images of 10x12"):
        dense_crf(np.stack([probs, probs]), np.zeros((3, 10, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image must be \(N, H, W, 3\) for probs of shape \(1, 2, 10, 12\)"):
        dense_crf(probs[None], np.zeros((10, 12, 3), np.uint8))


def test_bad_probabilities_are_refused():
    image = np.zeros((4, 4, 3), np.uint8)
    scores = np.random.default_rng(0).normal(0, 1, (3, 4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        dense_crf(scores, image)
    with pytest.raises(ValueError, match=r"sum to 1 over the class axis .* the sum at pixel \(0, 0\) is 1.2"):
        dense_crf(np.full((3, 4, 4), 0.4), image)
    with pytest.raises(ValueError, match="finite"):
        dense_crf(np.full((2, 4, 4), np.nan), image)
    with pytest.raises(ValueError, match=r"\(K, H, W\) or \(N, K, H, W\)"):
        dense_crf(np.full((4, 4), 1.0), image)
    with pytest.raises(TypeError, match="float array"):
        dense_crf(np.ones((1, 4, 4), np.int64), image)


def test_bad_images_are_refused():
    probs = np.full((2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels last.* got 4 channels"):
        dense_crf(probs, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="got 1 channels"):
        dense_crf(probs, np.zeros((4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"RGB in \[0, 1\].*found values in \[-2.1, 3\]"):
        dense_crf(probs, np.linspace(-2.1, 3, 48).reshape(4, 4, 3))
    with pytest.raises(TypeError, match="uint8 .* or float .* got dtype int64"):
        dense_crf(probs, np.zeros((4, 4, 3), np.int64))


def test_bad_settings_are_refused():
    probs, image = np.full((2, 4, 4), 0.5), np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="filter must be 'lattice' or 'exact', got 'fast'"):
        dense_crf(probs, image, filter="fast")
    with pytest.raises(ValueError, match="theta_beta must be a finite number > 0"):
        dense_crf(probs, image, theta_beta=0)
    with pytest.raises(ValueError, match="bilateral_weight must be a finite number >= 0"):
        dense_crf(probs, image, bilateral_weight=-1)
    with pytest.raises(ValueError, match="iterations must be a non-negative int, got 2.5"):
        dense_crf(probs, image, iterations=2.5)
    with pytest.raises(ValueError, match=r"clip must lie in \(0, 1\)"):
        dense_crf(probs, image, clip=0)
    big = crf.EXACT_MAX_PIXELS + 1
    with pytest.raises(ValueError, match=f"at most {crf.EXACT_MAX_PIXELS} pixels .* got {big}: use filter='lattice'"):
        gaussian_message(np.zeros((big, 2)), np.zeros((big, 1)), filter="exact")

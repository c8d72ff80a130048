"""The fully connected CRF of Kraehenbuehl & Koltun (2011), DeepLab's post-processing.

A network's per-pixel class probabilities ignore their neighbours; object
boundaries come out blurred by its down-sampling. The dense CRF links every
pair of pixels i, j of an image and asks that pixels close in position and
colour take the same label. Its energy over a labelling x is

    E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) sum_m w_m k_m(f_i, f_j)

* unary  ``U_i(l) = -log p_i(l)``, the network's probabilities (clipped below
  at ``clip``, 1e-5 by default as in pydensecrf's ``unary_from_softmax``, so
  that one pixel's 0 does not make its label impossible: U <= 11.5);
* Potts compatibility ``mu(l, l') = [l != l']``;
* two Gaussian kernels ``k_m(f_i, f_j) = exp(-|f_i - f_j|^2 / 2)`` on scaled features:
  appearance (bilateral) ``f = (x/theta_alpha, y/theta_alpha, r/theta_beta, g/theta_beta, b/theta_beta)``
  with weight w1, smoothness ``f = (x/theta_gamma, y/theta_gamma)`` with weight w2
  (x, y in pixels, r, g, b in 0..255).

Mean-field inference approximates the CRF's distribution by a product of
per-pixel distributions Q_i and updates them all at once, ``iterations`` times:

    Q_i(l)  <-  softmax_l( -U_i(l) + sum_m w_m M_m,i(l) ),
    M_m,i(l) = sum_{j != i} k_m(f_i, f_j) Q_j(l) / sum_j k_m(f_i, f_j)

(the Potts term sum_{l' != l} M(l') = sum_l' M(l') - M(l) loses its first part,
the same for every l, in the softmax). The message M is *normalised* by the
kernel's total weight at pixel i (its own weight 1 included, so that a pixel
with no neighbour in feature space gets M = 0 rather than 0/0): a weighted
mean of the neighbours' Q, in [0, 1]. The reference implementation DeepLab
used (densecrf, Kraehenbuehl's 2011 code) normalises per pixel too; without
it the weights below would be meaningless (a bilateral kernel with
theta_alpha = 121 sums to ~1e5 over a uniform region). It differs from this
one in that its lattice hands each pixel its own Q back (j = i included);
here the sum runs over j != i as in the paper, for both filters.

The defaults are DeepLab's (Chen et al., DeepLab v2, the released VOC 2012
settings): w1 = 4, theta_alpha = 121, theta_beta = 5, w2 = 3, theta_gamma = 3,
10 iterations. (DeepLab fixes w2 = theta_gamma = 3 and chooses w1,
theta_alpha and theta_beta by cross-validation on held-out images; the
built-in defaults of its ``dense_inference`` tool are w1 = 5,
theta_alpha = 70, theta_beta = 5.)

Two ways to compute the messages, chosen by ``filter=``:

* ``'exact'``   -- the sums above, directly: O(P^2) for P pixels, in NumPy;
  the readable reference, for small images (at most 128x128);
* ``'lattice'`` -- the permutohedral lattice (``kernels/cpu/lattice.py``,
  Numba): O(P) per message. It approximates the Gaussian; its unknown scale
  cancels in the normalisation (``L(Q) / L(1)``), and its own-pixel weight is
  subtracted exactly, so it estimates the same M. Its accuracy, measured
  against 'exact' on 16x16 to 24x24 photo-like images (a colour gradient, a
  disc, a bar, camera noise of 6 grey levels; ``tests/test_crf.py`` asserts
  these bounds), for messages in [0, 1]:

  ======================================  ===============  ===============
  kernel                                  mean abs error   worst pixel
  ======================================  ===============  ===============
  smoothness, theta_gamma = 3             <= 0.003         <= 0.015
  smoothness, theta_gamma = 1             <= 0.007         <= 0.06
  bilateral, DeepLab's 121 / 5            <= 0.02          <= 0.25
  bilateral, 5 / 10                       <= 0.01          <= 0.26
  ======================================  ===============  ===============

  (tests: mean <= 0.03 bilateral, <= 0.01 smoothness; worst <= 0.35 / 0.06).
  The worst pixels are those with few neighbours in feature space, whose
  message is a mean of few values, where the lattice's not-quite-Gaussian
  kernel shows; on images of pure colour noise the mean error reaches 0.05.
  After 10 iterations of the CRF with DeepLab's settings, 98% to 100% of the
  pixels take the same label as with 'exact' (tests: >= 97%) and the
  probabilities differ by < 0.02 on average.

Why an explicit argument and not ``backend.replaceable``: a replaceable twin
must give the reference's numbers, and the lattice gives other numbers (close
ones). So the choice is named at the call (grep ``filter=``), and
``SCRATCHSEG_KERNELS=numpy`` does not change a CRF's output. The lattice is
imported when first used; without Numba, 'lattice' raises an error that says
so and 'exact' still works.

    >>> import numpy as np
    >>> image = np.zeros((8, 8, 3), np.uint8); image[:, 4:] = 200        # two colours
    >>> probs = np.full((2, 8, 8), 0.5); probs[0, :, :4] = 0.6; probs[1, :, :4] = 0.4
    >>> out = dense_crf(probs, image, filter="exact")                     # (K, H, W) -> (K, H, W)
    >>> out.shape, bool(np.allclose(out.sum(axis=0), 1))
    ((2, 8, 8), True)
"""

from __future__ import annotations

import numpy as np  # the CRF runs on the host: the lattice is a Numba kernel, images come from files

from . import backend

__all__ = ["dense_crf", "gaussian_message", "bilateral_features", "smoothness_features"]

#: The largest image (in pixels) filter='exact' takes: its P x P kernel costs P^2 time.
EXACT_MAX_PIXELS = 128 * 128


# ------------------------------------------------------------------ features
def bilateral_features(image, theta_alpha, theta_beta):
    """The appearance kernel's features, one row per pixel in row-major order.

    Shape:
        image (H, W, 3) in 0..255 -> (H*W, 5): (x/theta_alpha, y/theta_alpha, r/theta_beta, g/theta_beta, b/theta_beta)

        >>> bilateral_features(np.zeros((2, 3, 3)), 1.0, 1.0).shape
        (6, 5)
    """
    H, W = image.shape[:2]
    y, x = np.mgrid[0:H, 0:W]
    position = np.stack([x, y], axis=-1).reshape(H * W, 2) / theta_alpha  # (H*W, 2)
    colour = np.asarray(image, np.float64).reshape(H * W, 3) / theta_beta  # (H*W, 3)
    return np.concatenate([position, colour], axis=1)


def smoothness_features(H, W, theta_gamma):
    """The smoothness kernel's features: (x/theta_gamma, y/theta_gamma), shape (H*W, 2), row-major.

        >>> smoothness_features(2, 3, 2.0)[:3]
        array([[0. , 0. ],
               [0.5, 0. ],
               [1. , 0. ]])
    """
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x, y], axis=-1).reshape(H * W, 2) / float(theta_gamma)


# ------------------------------------------------------------------ messages
class _ExactGaussian:
    """M_i = sum_{j != i} k(f_i, f_j) v_j / sum_j k(f_i, f_j), summed directly (float64), rows in blocks."""

    def __init__(self, features):
        P = features.shape[0]
        if P > EXACT_MAX_PIXELS:
            raise ValueError(f"filter='exact' sums over all pixel pairs and takes at most {EXACT_MAX_PIXELS} "
                             f"pixels (128x128); got {P}: use filter='lattice'")
        self.features = np.asarray(features, np.float64)
        self.blocks = []  # (rows, k) with k (rows, P): the kernel, diagonal zeroed; built once, reused per iteration
        self.norm = np.empty(P)
        block = max(1, min(P, 2**22 // P))  # a block of rows holds at most 4M kernel values (32 MiB)
        for r0 in range(0, P, block):
            rows = slice(r0, min(P, r0 + block))
            d2 = np.zeros((rows.stop - r0, P))  # squared distances, one feature axis at a time
            for t in range(self.features.shape[1]):
                d2 += (self.features[rows, t, None] - self.features[None, :, t]) ** 2
            k = np.exp(-0.5 * d2)
            self.norm[rows] = k.sum(axis=1)  # sum_j k_ij, the pixel's own weight 1 included
            k[np.arange(rows.stop - r0), np.arange(r0, rows.stop)] = 0.0  # the message leaves j = i out
            self.blocks.append((rows, k))

    def add_message(self, values, weight, out):
        """out += weight * M(values)."""
        for rows, k in self.blocks:
            out[rows] += (weight / self.norm[rows, None]) * (k @ values)  # (rows, P) @ (P, C)
        return out


class _LatticeGaussian:
    """M_i = (L(v)_i - s_i v_i) / L(1)_i with the permutohedral lattice L (kernels/cpu/lattice.py)."""

    def __init__(self, features):
        try:
            from kernels.cpu.lattice import PermutohedralLattice
        except ImportError as exc:  # Numba (or the kernels package) is missing
            raise RuntimeError(
                f"filter='lattice' needs the Numba kernels (kernels.cpu.lattice), which cannot be imported "
                f"({type(exc).__name__}: {exc}); install numba, or use filter='exact' (images up to 128x128)"
            ) from exc
        self.lattice = PermutohedralLattice(features)

    def add_message(self, values, weight, out):
        """out += weight * M(values), M = (L(v) - s v) / L(1): the lattice's filter of v (its own value
        included), less that own value, over the filter of ones. The lattice does it in one pass
        (``PermutohedralLattice.message``; ``.filter``, ``.self_weight`` and ``.norm`` are the parts)."""
        return self.lattice.message(values, weight, out)


_FILTERS = {"exact": _ExactGaussian, "lattice": _LatticeGaussian}


def _message_filter(features, filter):
    if filter not in _FILTERS:
        raise ValueError(f"filter must be 'lattice' or 'exact', got {filter!r}")
    return _FILTERS[filter](features)


def gaussian_message(features, values, filter="lattice"):
    """The normalised mean-field message of one Gaussian kernel.

    M_i = sum_{j != i} k(f_i, f_j) v_j / sum_j k(f_i, f_j),  k(f_i, f_j) = exp(-|f_i - f_j|^2 / 2)

    Shape:
        features (P, d) (already divided by the kernel's standard deviations),
        values (P, C) -> (P, C), float64 for 'exact', values' dtype for 'lattice'.

        >>> f = np.array([[0.0], [1.0], [10.0]]); v = np.array([[1.0], [0.0], [5.0]])
        >>> np.round(gaussian_message(f, v, filter="exact")[:, 0], 4)    # 1st: 0*e^-0.5 / (1 + e^-0.5)
        array([0.    , 0.3775, 0.    ])
    """
    features = np.asarray(features)
    values = np.asarray(values)
    if features.ndim != 2 or values.ndim != 2 or features.shape[0] != values.shape[0]:
        raise ValueError(f"features must be (P, d) and values (P, C) with the same P, got {features.shape} "
                         f"and {values.shape}")
    kernel = _message_filter(features, filter)
    dtype = np.float64 if filter == "exact" or values.dtype != np.float32 else np.float32
    return kernel.add_message(values.astype(dtype, copy=False), 1.0, np.zeros(values.shape, dtype))


# ------------------------------------------------------------------ the CRF
def _check_probs(probs):
    if probs.ndim not in (3, 4):
        raise ValueError(f"probs must be (K, H, W) or (N, K, H, W) class probabilities, got shape {probs.shape}")
    if probs.dtype.kind != "f":
        raise TypeError(f"probs must be a float array of probabilities, got dtype {probs.dtype}")
    if probs.shape[-3] < 1 or probs.shape[-1] < 1 or probs.shape[-2] < 1:
        raise ValueError(f"probs must have at least one class and one pixel, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs must be finite (found NaN or inf)")
    low = float(probs.min())
    if low < 0:
        raise ValueError(f"probs must be non-negative (probabilities, not scores), found {low:.4g}")
    sums = probs.sum(axis=-3, dtype=np.float64)  # float16 probabilities would round the sum itself
    worst = float(np.abs(sums - 1).max())
    if worst > 1e-3:
        where = np.unravel_index(int(np.abs(sums - 1).argmax()), sums.shape)
        raise ValueError(f"probs must sum to 1 over the class axis (axis {probs.ndim - 3}); the sum at pixel "
                         f"{tuple(int(i) for i in where)} is {float(sums[where]):.6g} "
                         "(apply a softmax to scores first)")


def _check_image(image, probs):
    """image in 0..255 as float64, shape (N, H, W, 3); probs already checked."""
    batched = probs.ndim == 4
    expected = "(N, H, W, 3)" if batched else "(H, W, 3)"
    if image.ndim != probs.ndim:
        raise ValueError(f"image must be {expected} for probs of shape {probs.shape}, got shape {image.shape}")
    if image.shape[-1] != 3:
        raise ValueError(f"image must have 3 (RGB) channels last, shape {expected}; got {image.shape[-1]} "
                         f"channels (shape {image.shape})")
    if image.shape[-3:-1] != probs.shape[-2:] or (batched and image.shape[0] != probs.shape[0]):
        size = f"{image.shape[0]} images of " if batched else ""
        psize = f"{probs.shape[0]} images of " if batched else ""
        raise ValueError(f"probs and image differ in size: probs are {psize}{probs.shape[-2]}x{probs.shape[-1]} "
                         f"(H x W), the image is {size}{image.shape[-3]}x{image.shape[-2]}")
    if image.dtype == np.uint8:
        rgb = image.astype(np.float64)
    elif image.dtype.kind == "f":
        if not np.all(np.isfinite(image)):
            raise ValueError("image must be finite (found NaN or inf)")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"a float image must hold RGB in [0, 1] (it is scaled by 255), found values in "
                             f"[{lo:.4g}, {hi:.4g}]: pass the uint8 image, or divide by 255")
        rgb = image.astype(np.float64) * 255.0
    else:
        raise TypeError(f"image must be uint8 (0..255) or float (0..1), got dtype {image.dtype}")
    return rgb if batched else rgb[None]


def _softmax(logits):
    """softmax over the last axis (classes) of (P, K), in place."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _mean_field(probs, rgb, iterations, w1, theta_alpha, theta_beta, w2, theta_gamma, filter, clip):
    """One image: probs (K, H, W), rgb (H, W, 3) in 0..255 -> Q (K, H, W)."""
    K, H, W = probs.shape
    dtype = np.float64 if probs.dtype == np.float64 or filter == "exact" else np.float32
    # (P, K): a pixel's K values side by side, the layout the lattice filters
    log_p = np.log(np.maximum(probs.reshape(K, H * W).T.astype(dtype), dtype(clip)))  # -U, (P, K)
    kernels = []  # (weight, message filter), built once: they depend on the image only
    if w1 > 0:
        kernels.append((w1, _message_filter(bilateral_features(rgb, theta_alpha, theta_beta), filter)))
    if w2 > 0:
        kernels.append((w2, _message_filter(smoothness_features(H, W, theta_gamma), filter)))
    Q = _softmax(log_p.copy())
    for _ in range(iterations):
        energy = log_p.copy()  # -U_i(l) + sum_m w_m M_m,i(l)
        for w, kernel in kernels:
            kernel.add_message(Q, w, energy)
        Q = _softmax(energy)
    return Q.T.reshape(K, H, W)


def dense_crf(probs, image, iterations=10, *, bilateral_weight=4.0, theta_alpha=121.0, theta_beta=5.0,
              smoothness_weight=3.0, theta_gamma=3.0, filter="lattice", clip=1e-5):
    """Refine class probabilities with a fully connected CRF (mean-field inference).

    Args:
        probs: (K, H, W) or (N, K, H, W) class probabilities (non-negative, summing
            to 1 over K within 1e-3): a softmax of the network's scores, at the
            image's resolution.
        image: the RGB image the probabilities belong to, (H, W, 3) or
            (N, H, W, 3): uint8 in 0..255, or float in [0, 1] (scaled by 255),
            *not* mean/std-normalised: theta_beta is measured in 0..255 units.
        iterations: mean-field updates (DeepLab: 10; 0 returns the clipped, renormalised probs).
        bilateral_weight: w1, the appearance kernel's weight (DeepLab: 4).
        theta_alpha: its spatial standard deviation in pixels (DeepLab: 121).
        theta_beta: its colour standard deviation in 0..255 units (DeepLab: 5).
        smoothness_weight: w2, the smoothness kernel's weight (DeepLab: 3).
        theta_gamma: its spatial standard deviation in pixels (DeepLab: 3).
        filter: 'lattice' (permutohedral lattice, fast, approximate) or
            'exact' (direct O(P^2) sums, at most 128x128 pixels); see the module docstring.
        clip: probabilities below this count as this in the unary -log p.

    Returns:
        Q, the refined probabilities, the shape of ``probs``; its dtype
        (float32 unless probs are float64), on probs' device (the work runs on the CPU).

    The update (module docstring): Q_i(l) <- softmax_l(log p_i(l) + w1 M_bilateral,i(l) + w2 M_smooth,i(l)).

    Shape:
        probs (K, H, W), image (H, W, 3) -> (K, H, W);
        probs (N, K, H, W), image (N, H, W, 3) -> (N, K, H, W).

        >>> probs = np.full((3, 4, 5), 1 / 3); image = np.zeros((4, 5, 3), np.uint8)
        >>> dense_crf(probs, image, iterations=2, filter="exact").shape
        (3, 4, 5)
    """
    device = backend.device_of(probs)
    probs = backend.asnumpy(probs)
    image = backend.asnumpy(image)
    _check_probs(probs)
    rgb = _check_image(image, probs)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    for name, value in (("bilateral_weight", bilateral_weight), ("smoothness_weight", smoothness_weight)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (a standard deviation), got {value!r}")
    if not 0 < clip < 1:
        raise ValueError(f"clip must lie in (0, 1), got {clip!r}")
    if filter not in _FILTERS:
        raise ValueError(f"filter must be 'lattice' or 'exact', got {filter!r}")
    batch = probs if probs.ndim == 4 else probs[None]
    out_dtype = np.float64 if probs.dtype == np.float64 else np.float32
    out = np.stack([
        _mean_field(p, im, int(iterations), float(bilateral_weight), float(theta_alpha), float(theta_beta),
                    float(smoothness_weight), float(theta_gamma), filter, float(clip)).astype(out_dtype, copy=False)
        for p, im in zip(batch, rgb)
    ])
    out = out if probs.ndim == 4 else out[0]
    return backend.to_device(out, device)

"""The U-Net paper's pixel weight map, and objects (instances) from a class mask.

Ronneberger et al. (2015) train on cells that touch each other, separated by
thin borders of background. To make the network learn those borders, the loss
of every pixel x is multiplied by (their equation 2)

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

where w_c balances the class frequencies (``class_weights[0]`` on background,
``class_weights[1]`` on objects) and d1 <= d2 are the Euclidean distances from
x to the nearest pixel of the nearest object and of the second-nearest object.
The second term is the *border term*: large (up to w0) on a thin gap between
two objects, negligible far from them. It is 0 on object pixels and when the
image holds fewer than two objects (d2 does not exist).

Objects are an (H, W) integer array of instances: 0 is background, 1..M label
separate objects. A dataset with class masks only gets them from
:func:`instances_from_mask`, the connected components of the object class
(for the ISBI 2012 membrane masks mapped ``0:0,255:1`` the cells are class 1,
the membranes between them class 0: the border term lies on the membranes).

Cost: one Euclidean distance transform per object, each on the object's
bounding box grown by a margin R = ceil(sigma * sqrt(2 ln 1e12)) + 1 (about
7.4 sigma) on every side, and the two smallest distances kept per pixel as the
objects go by: memory O(H * W), time O(sum over objects of their window),
which for many small cells is far less than M full transforms. Outside an
object's window its distance is more than R, so a pixel whose two nearest
objects are not both within R has a border term below w0 * 1e-12; such terms
may come out as 0 (an absolute error under w0 * 1e-12). Every other value is
the formula's, to rounding.

    >>> import numpy as np
    >>> objects = np.zeros((5, 7), np.int64); objects[:, :3] = 1; objects[:, 4:] = 2
    >>> w = unet_weight_map(objects, w0=10.0, sigma=5.0)
    >>> round(float(w[0, 3]), 6), round(1 + 10 * float(np.exp(-(1 + 1) ** 2 / 50)), 6), float(w[0, 0])
    (10.231163, 10.231163, 1.0)
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy

__all__ = ["unet_weight_map", "instances_from_mask", "weight_map_from_mask"]

# The border term below which a value may be dropped: relative to w0 (see the module docstring).
_NEGLIGIBLE = 1e-12


def _check_parameters(w0, sigma, class_weights):
    if isinstance(w0, bool) or not isinstance(w0, Real) or not (math.isfinite(w0) and w0 >= 0):
        raise ValueError(f"w0 must be a finite number >= 0 (the border weight), got {w0!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0 (the border width in pixels), got {sigma!r}")
    if class_weights is None:
        return 1.0, 1.0
    values = [float(v) for v in class_weights]
    if len(values) != 2 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"class_weights must be 2 non-negative numbers (background, objects), got {class_weights!r}")
    return values[0], values[1]


def _two_nearest(instances, margin):
    """d1 <= d2 (float64, shape of ``instances``): distances to the nearest and second-nearest object.

    inf where there is no such object within ``margin`` (and inside objects d1 = 0 to their own).
    """
    from scipy import ndimage

    d1 = numpy.full(instances.shape, numpy.inf)
    d2 = numpy.full(instances.shape, numpy.inf)
    for label, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:  # a label number that is not used
            continue
        # the object's bounding box grown by the margin, clipped to the image
        window = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                       for s, n in zip(box, instances.shape))
        # distance from each window pixel to the nearest pixel of this object (exact: the whole object is inside)
        d = ndimage.distance_transform_edt(instances[window] != label)
        near, second = d1[window], d2[window]  # views: updated in place
        numpy.minimum(second, numpy.maximum(near, d), out=second)  # the new second-smallest of (d1, d2, d)
        numpy.minimum(near, d, out=near)
    return d1, d2


def unet_weight_map(instances, w0=10.0, sigma=5.0, class_weights=None):
    """The U-Net weight map ``w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` of an instance image.

    Args:
        instances: integer array (H, W) (or (D, H, W)): 0 background, 1..M separate objects.
        w0: the border weight (the paper's 10).
        sigma: the border width in pixels (the paper's about 5).
        class_weights: ``(w_background, w_object)``, the w_c of background and object pixels (1, 1 by default).

    Shape:
        instances (H, W) -> w (H, W) float64. On object pixels w = class_weights[1]; on background pixels
        class_weights[0] plus the border term, which needs two objects (fewer: it is 0).

    Raises ValueError for a float or negative instance image, and for w0 < 0, sigma <= 0 or bad class weights.
    """
    w_background, w_object = _check_parameters(w0, sigma, class_weights)
    instances = numpy.asarray(instances)
    if instances.dtype.kind not in "iub" or instances.ndim < 1:
        raise ValueError(f"instances must be an integer array (H, W) with 0 = background and 1..M the objects, got "
                         f"dtype {instances.dtype} and shape {instances.shape}")
    if instances.size and int(instances.min()) < 0:
        raise ValueError(f"instances holds label {int(instances.min())}; expected 0 (background) or 1..M (objects)")
    instances = instances.astype(numpy.int64, copy=False)
    objects = instances > 0
    w = numpy.where(objects, w_object, w_background).astype(numpy.float64)  # w_c
    if w0 == 0 or len(numpy.unique(instances[objects])) < 2:
        return w  # no border term: it needs two objects
    # beyond this distance exp(-d^2 / (2 sigma^2)) < 1e-12, and d1 + d2 >= d2
    margin = int(math.ceil(sigma * math.sqrt(2 * math.log(1 / _NEGLIGIBLE)))) + 1
    d1, d2 = _two_nearest(instances, margin)
    background = ~objects & numpy.isfinite(d2)  # both nearest objects within the margin
    total = d1[background] + d2[background]
    w[background] += w0 * numpy.exp(-total ** 2 / (2.0 * sigma ** 2))
    return w


def instances_from_mask(mask, foreground=1, connectivity=1):
    """Objects of a class mask: the connected components of the pixels whose class is in ``foreground``.

    Args:
        mask: integer class map (H, W) (or (D, H, W)).
        foreground: a class or a list of classes that make objects (1: the second class of a two-class task,
            e.g. the cells of the membrane masks mapped ``0:0,255:1``).
        connectivity: 1 joins pixels that share an edge (4-neighbours in 2-D; a one-pixel membrane
            separates two cells even where it runs diagonally), ``mask.ndim`` also joins diagonal neighbours.

    Shape:
        mask (H, W) -> instances (H, W) int64: 0 where the class is not in ``foreground``, 1..M the
        components, numbered in raster order.

        >>> import numpy as np
        >>> instances_from_mask(np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1]])).tolist()
        [[1, 0, 2], [1, 0, 0], [0, 3, 3]]
    """
    from scipy import ndimage

    mask = numpy.asarray(mask)
    if mask.dtype.kind not in "iub":
        raise ValueError(f"instances_from_mask expects an integer class mask, got dtype {mask.dtype}")
    classes = [foreground] if isinstance(foreground, Integral) else list(foreground)
    if not classes or not all(isinstance(c, Integral) and not isinstance(c, bool) for c in classes):
        raise ValueError(f"foreground must be a class number or a list of them, got {foreground!r}")
    if isinstance(connectivity, bool) or not isinstance(connectivity, Integral) or not \
            1 <= connectivity <= max(mask.ndim, 1):
        raise ValueError(f"connectivity must be 1..{mask.ndim} for a {mask.ndim}-D mask, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    instances, _ = ndimage.label(numpy.isin(mask, classes), structure=structure)
    return instances.astype(numpy.int64, copy=False)


def weight_map_from_mask(mask, num_classes=2, ignore_index=None, w0=10.0, sigma=5.0, class_weights=None):
    """The U-Net weight map of a two-class mask: objects = connected components of class 1.

    Background is class 0 (for membranes: the membrane). Pixels marked ``ignore_index`` are not objects,
    so they are weighted as background (the loss ignores them anyway).

    Shape:
        mask (H, W) (or a volume (D, H, W)) -> w of the same shape, float64.

    Raises ValueError when the task is not a two-class one, or naming a mask label outside 0, 1 and
    ``ignore_index``.
    """
    if int(num_classes) != 2:
        raise ValueError(f"a weight map from class masks needs a two-class task (0 background, 1 objects whose "
                         f"connected components are the instances); this one has {num_classes} classes and no "
                         "instance labels")
    mask = numpy.asarray(mask)
    allowed = {0, 1} | ({int(ignore_index)} if ignore_index is not None else set())
    bad = sorted(set(numpy.unique(mask).tolist()) - allowed)
    if bad:
        ignore = f" or the ignore index {ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"mask holds label {bad[0]} outside the classes 0 (background) and 1 (objects){ignore}; "
                         "the weight map cannot place it")
    return unet_weight_map(instances_from_mask(mask, foreground=1), w0=w0, sigma=sigma, class_weights=class_weights)

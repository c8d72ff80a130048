"""The dense CRF on one image: DeepLab's setting, 512x512 pixels, 21 classes, 10 mean-field iterations.

    python benchmarks/crf.py                       # astronaut photo (scikit-image), else a synthetic scene
    python benchmarks/crf.py --image noise         # the worst case: every pixel its own colour
    python benchmarks/crf.py --size 256 --rounds 5

Prints the CPU, the load average (other work on the machine slows the wall
clock, not the CPU time), the number of lattice vertices of each kernel, and
the median and minimum over the rounds of: the whole ``dense_crf`` call (wall
and CPU seconds) and the lattice building alone (``iterations=0``). A small
CRF runs first, untimed, so that Numba's compiled kernels are loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (imports scratchseg before NumPy)

import numpy  # noqa: E402

from scratchseg.crf import bilateral_features, dense_crf, smoothness_features  # noqa: E402


def make_image(kind, size, rng):
    """(size, size, 3) uint8: the astronaut photo, a synthetic scene, or colour noise."""
    if kind == "astronaut":
        try:
            from skimage import data

            photo = data.astronaut()  # 512x512 RGB, shipped with scikit-image
        except Exception as exc:  # noqa: BLE001  (scikit-image missing or without its data)
            print(f"astronaut photo unavailable ({type(exc).__name__}: {exc}); using the synthetic scene")
            return make_image("scene", size, rng)
        rows = numpy.linspace(0, photo.shape[0] - 1, size).round().astype(int)
        cols = numpy.linspace(0, photo.shape[1] - 1, size).round().astype(int)
        return photo[rows][:, cols]
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3)).astype(numpy.uint8)
    y, x = numpy.mgrid[0:size, 0:size] / (size - 1)
    img = numpy.stack([60 + 80 * x, 90 + 60 * y, 150 - 50 * x], axis=-1)
    for _ in range(12):  # discs of other colours
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return numpy.clip(numpy.rint(img + rng.normal(0, 6, img.shape)), 0, 255).astype(numpy.uint8)


def make_probs(classes, size, rng):
    """(K, size, size) float32: a softmax of random scores at 1/8 resolution, repeated 8x8 (a stride-8 network)."""
    low = rng.normal(0, 2, (classes, -(-size // 8), -(-size // 8)))
    scores = low.repeat(8, axis=1).repeat(8, axis=2)[:, :size, :size]
    e = numpy.exp(scores - scores.max(axis=0))
    return (e / e.sum(axis=0)).astype(numpy.float32)


def timed(fn, rounds):
    walls, cpus = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return walls, cpus


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--classes", type=int, default=21, help="number of classes (default 21, PASCAL VOC)")
    parser.add_argument("--iterations", type=int, default=10, help="mean-field iterations (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--image", choices=("astronaut", "scene", "noise"), default="astronaut")
    args = parser.parse_args(argv)
    if args.size < 2 or args.classes < 1 or args.iterations < 0 or args.rounds < 1:
        parser.error(f"--size >= 2, --classes >= 1, --iterations >= 0 and --rounds >= 1, got {args.size}, "
                     f"{args.classes}, {args.iterations} and {args.rounds}")

    import numba

    rng = numpy.random.default_rng(0)
    image = make_image(args.image, args.size, rng)
    probs = make_probs(args.classes, args.size, rng)
    print(f"CPU: {_common.cpu_model()}, {os.cpu_count()} cores, numba {numba.__version__} "
          f"with {numba.get_num_threads()} threads")
    print("load average (1, 5, 15 min) at start: %.2f %.2f %.2f" % os.getloadavg())
    dense_crf(probs[:, :32, :32], image[:32, :32], iterations=1)  # untimed: loads the compiled kernels

    from kernels.cpu.lattice import PermutohedralLattice

    bil = PermutohedralLattice(bilateral_features(image, 121.0, 5.0)).num_vertices
    smooth = PermutohedralLattice(smoothness_features(args.size, args.size, 3.0)).num_vertices
    print(f"image {args.image} {args.size}x{args.size}, {args.classes} classes, {args.iterations} iterations, "
          f"DeepLab's kernels (w1 4, theta_alpha 121, theta_beta 5; w2 3, theta_gamma 3), float32")
    print(f"lattice vertices: bilateral {bil}, smoothness {smooth} (for {args.size * args.size} pixels)\n")

    rows = []
    for what, iterations in (("lattices only (iterations=0)", 0), (f"dense_crf, {args.iterations} iterations",
                                                                   args.iterations)):
        walls, cpus = timed(lambda: dense_crf(probs, image, iterations=iterations), args.rounds)
        rows.append({"measure": what, "wall med (s)": float(numpy.median(walls)), "wall min (s)": min(walls),
                     "CPU med (s)": float(numpy.median(cpus))})
    _common.print_table(rows, ["measure", "wall med (s)", "wall min (s)", "CPU med (s)"])
    print("load average (1, 5, 15 min) at end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()

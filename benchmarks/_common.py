"""Shared plumbing of the benchmarks: timing, interleaving, peak memory, SGEMM peak, tables.

Both frameworks run on the same data in the same process, interleaved round
by round (the order alternates), after warm-up rounds that are not counted;
we report the median and the minimum of each and the ratio of the medians
(scratchseg / PyTorch: below 1 means scratchseg is faster).

Peak memory is measured the same way for both frameworks, each in a fresh
child process of its own: the child builds its model and data, runs a tiny
warm-up step, notes its current resident size (``/proc/self/statm``) and
resets the kernel's high-water mark (``/proc/self/clear_refs``), runs the
steps, and reports that high-water mark (``VmHWM``) minus the baseline. tracemalloc cannot be used: it sees neither NumPy's nor PyTorch's
large buffers. On the GPU the child reports the caching allocator's high-water
mark instead (``torch.cuda.max_memory_reserved``; CuPy's pool ``total_bytes``,
which only grows until freed blocks are released).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import scratchseg  # noqa: E402  (first: sets the BLAS/Numba thread defaults before NumPy loads)
import numpy  # noqa: E402

__all__ = [
    "ROOT",
    "add_common_args",
    "setup_backend",
    "synchronize",
    "interleaved",
    "stats",
    "print_table",
    "sgemm_peak",
    "environment_report",
    "where_report",
    "child_peak_memory",
    "rss_bytes",
    "maxrss_bytes",
    "reset_maxrss",
]


def add_common_args(parser):
    parser.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                        help="numpy: scratchseg on the CPU vs PyTorch CPU; cupy: CuPy vs PyTorch CUDA")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per framework (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds per framework (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (default: leave torch's default, one per core)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--no-tf32", action="store_true",
                           help="GPU: turn off PyTorch's TF32 convolutions (on by default in cuDNN), so both sides "
                                "multiply in full float32, scratchseg's default")
    precision.add_argument("--tf32", action="store_true",
                           help="GPU: let scratchseg's convolutions multiply in TF32 too "
                                "(scratchseg.backend.set_allow_tf32(True)), so both sides do PyTorch's default")
    return parser


def apply_precision(args, device):
    """Set both libraries' TF32 switches from --no-tf32 / --tf32; returns a line that says what they are."""
    import torch

    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.tf32:
        scratchseg.backend.set_allow_tf32(True)
    if device != "cuda":
        return "precision: float32 on both sides (TF32 is a GPU matter)"
    return (f"TF32 convolutions: scratchseg {scratchseg.backend.allow_tf32()}, torch cuDNN "
            f"{torch.backends.cudnn.allow_tf32} (torch matmul {torch.backends.cuda.matmul.allow_tf32})")


def setup_backend(name):
    """Select scratchseg's backend; returns (xp, torch_device)."""
    scratchseg.set_backend(name)
    if name == "cupy":
        import cupy

        return cupy, "cuda"
    return numpy, "cpu"


def synchronize(device):
    """Wait for queued GPU work (both frameworks) so wall-clock times are honest."""
    if device == "cuda":
        import cupy
        import torch

        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()


# Idle time before every timed call (seconds): the BLAS and OpenMP workers
# one library leaves spinning (OpenBLAS after a GEMM, PyTorch's OpenMP pool
# after a parallel region: 0.01-0.05 s of CPU) must not be charged to the
# other library's call that follows on the same cores.
IDLE_BEFORE_CALL = 0.3


def interleaved(cases, rounds, warmup, device="cpu", idle=IDLE_BEFORE_CALL):
    """Run each ``cases[name]()`` ``warmup + rounds`` times, interleaved; return {name: [seconds]}.

    Round r runs the cases in order, round r+1 in reverse order, so neither
    framework always follows the other (caches, thread pools, turbo states).
    Every call starts after ``idle`` seconds of sleep (``IDLE_BEFORE_CALL``).
    """
    names = list(cases)
    times = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            if idle:
                time.sleep(idle)
            t0 = time.perf_counter()
            cases[name]()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def stats(seconds):
    a = numpy.asarray(seconds)
    return {"median": float(numpy.median(a)), "min": float(a.min()), "n": int(a.size)}


def print_table(rows, columns):
    """Print ``rows`` (dicts) as an aligned text table with the given ``columns``."""
    cells = [[str(c) for c in columns]] + [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for k, r in enumerate(cells):
        print("  ".join(v.rjust(w) if k else v.ljust(w) for v, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def sgemm_peak(device="cpu", n=2048, repeats=5):
    """Best float32 GEMM rate (GFLOP/s) of NumPy/CuPy and of PyTorch on an n x n x n product."""
    import torch

    xp = numpy
    if device == "cuda":
        import cupy as xp  # noqa: F811
    rng = numpy.random.default_rng(0)
    a_host = rng.standard_normal((n, n), dtype=numpy.float32)
    b_host = rng.standard_normal((n, n), dtype=numpy.float32)
    a, b = xp.asarray(a_host), xp.asarray(b_host)
    ta, tb = torch.from_numpy(a_host).to(device), torch.from_numpy(b_host).to(device)
    flops = 2.0 * n**3
    best = {"scratchseg": float("inf"), "torch": float("inf")}
    for _ in range(repeats + 1):
        synchronize(device)
        time.sleep(IDLE_BEFORE_CALL)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        t_ours = time.perf_counter() - t0
        time.sleep(IDLE_BEFORE_CALL)
        t1 = time.perf_counter()
        ta @ tb
        synchronize(device)
        t2 = time.perf_counter()
        best["scratchseg"] = min(best["scratchseg"], t_ours)
        best["torch"] = min(best["torch"], t2 - t1)
    return {k: flops / v / 1e9 for k, v in best.items()}


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (or the platform's answer elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


# The vector extensions that decide which kernels the BLAS libraries and
# oneDNN pick, in /proc/cpuinfo's spelling.
_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                 "avx512_fp16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def cpu_flags():
    """The CPU's vector extensions among ``_VECTOR_FLAGS``, from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    return [flag for flag in _VECTOR_FLAGS if flag in flags]


def numpy_blas():
    """NumPy's BLAS in words: the library and version from numpy's build config, and for an OpenBLAS
    the configuration and the kernel it chose for this CPU at run time (``openblas_get_corename``)."""
    import ctypes

    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        words = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # numpy < 1.25 has no mode="dicts"
        words = "unknown BLAS"
    numpy.ones((2, 2)) @ numpy.ones((2, 2))  # loaded
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        paths = []
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "64_"), ("openblas_", "")):
            config = getattr(lib, f"{prefix}get_config{suffix}", None)
            core = getattr(lib, f"{prefix}get_corename{suffix}", None)
            if config is not None and core is not None:
                config.restype = core.restype = ctypes.c_char_p
                return f"{words}; OpenBLAS kernel {core().decode()} ({config().decode().strip()})"
    return words


def torch_cpu_report():
    """PyTorch's BLAS and vector kernels in words: MKL or OpenBLAS, oneDNN, its CPU capability level."""
    import torch

    shown = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for part in shown.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                "?")
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    return f"torch BLAS {blas}, oneDNN {torch.backends.mkldnn.is_available()}, CPU capability {capability}"


def where_report(device="cpu"):
    """environment_report's lines and the SGEMM peak of both libraries, measured now: what ran where.

    Figures from different machines are only comparable beside these lines.
    """
    lines = environment_report(device)
    peak = sgemm_peak(device)
    lines.append(f"SGEMM peak (2048^3, best of 5): numpy/cupy {peak['scratchseg']:.0f} GFLOP/s, "
                 f"torch {peak['torch']:.0f} GFLOP/s")
    return lines, peak


def environment_report(device="cpu"):
    """A few lines saying what ran where: CPU, vector extensions, BLAS, versions, threads, load, kernels, tuning."""
    import kernels
    import torch

    lines = [
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, vector extensions: {' '.join(cpu_flags()) or 'unknown'}",
        f"numpy BLAS: {numpy_blas()}",
        torch_cpu_report(),
        f"python {sys.version.split()[0]}, numpy {numpy.__version__}, torch {torch.__version__}, "
        f"scratchseg {scratchseg.__version__}",
        f"backend {scratchseg.backend.current()}, kernels {scratchseg.backend.kernels()}, "
        f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}",
        f"process tuning: {kernels.tuning}",
    ]
    try:
        from kernels.cpu import gemm

        lines.append(f"convolution GEMM: {gemm.describe()}")
    except ImportError:  # no Numba: the reference kernels
        pass
    try:
        import numba

        lines.append(f"numba {numba.__version__}, {numba.get_num_threads()} threads, layer {numba.config.THREADING_LAYER}")
    except ImportError:
        lines.append("numba: not installed (reference kernels)")
    if hasattr(os, "getloadavg"):
        lines.append("load average (1, 5, 15 min) at start: %.2f %.2f %.2f" % os.getloadavg())
    if device == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        lines.append(f"GPU {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}, "
                     f"cupy {cupy.__version__}, torch cuda {torch.version.cuda}")
    return lines


# ------------------------------------------- one training step against torch's
def compare_steps(ours, theirs, rounds, warmup, device="cpu", what="networks"):
    """Check that the two steps start from the same loss, then time them interleaved: the time row.

    ``ours.step()`` / ``theirs.step()`` each run one training step and return its loss.
    """
    loss_ours = float(scratchseg.backend.asnumpy(ours.step().data))
    loss_theirs = float(theirs.step().item())
    print(f"first-step loss: scratchseg {loss_ours:.6f}, torch {loss_theirs:.6f}")
    if not abs(loss_ours - loss_theirs) <= 1e-3 * abs(loss_theirs):
        raise AssertionError(f"the two {what} disagree on the first loss: not the same computation")
    print(f"rounds {rounds} after {warmup} warm-up, interleaved, each call after {IDLE_BEFORE_CALL} s idle; "
          "times in ms\n")
    times = interleaved({"scratchseg": ours.step, "torch": theirs.step}, rounds, warmup, device)
    s, t = stats(times["scratchseg"]), stats(times["torch"])
    rows = [{"measure": "train step time (ms)", "scratchseg med": 1e3 * s["median"], "scratchseg min": 1e3 * s["min"],
             "torch med": 1e3 * t["median"], "torch min": 1e3 * t["min"], "ratio": s["median"] / t["median"]}]
    # a training loop: steps back to back, each library's run after the same idle
    s, t = stats(back_to_back(ours.step, rounds, warmup, device)), stats(back_to_back(theirs.step, rounds, warmup, device))
    rows.append({"measure": "step, back to back (ms)", "scratchseg med": 1e3 * s["median"],
                 "scratchseg min": 1e3 * s["min"], "torch med": 1e3 * t["median"], "torch min": 1e3 * t["min"],
                 "ratio": s["median"] / t["median"]})
    return rows


def back_to_back(step, rounds, warmup, device="cpu", idle=IDLE_BEFORE_CALL):
    """Seconds of each of ``rounds`` consecutive calls of ``step`` (a training loop's steady state),
    after ``idle`` seconds of sleep and ``warmup`` untimed calls.

    The interleaved rounds idle before every call, so that neither library is
    charged for the other's leftover threads; a virtual machine's CPUs then
    wake from their idle state for every call, which costs a library whose
    threads sleep between kernels more than one whose threads spin
    (benchmarks/NOTES.md). This is the other regime: what a training loop sees.
    """
    synchronize(device)
    time.sleep(idle)
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def memory_rows(script, extra_args, device="cpu", check=None):
    """Peak memory of one step of each library, each measured by ``script`` in a fresh child process.

    ``check(report)`` may refuse a child's report (say, one that measured another batch).
    """
    m_ours = child_peak_memory(script, "scratchseg", extra_args)
    m_theirs = child_peak_memory(script, "torch", extra_args)
    if check is not None:
        check(m_ours), check(m_theirs)
    mib = 2.0**20
    rows = [{"measure": "peak memory of a step (MiB)", "scratchseg med": m_ours["peak"] / mib,
             "torch med": m_theirs["peak"] / mib, "ratio": m_ours["peak"] / max(m_theirs["peak"], 1)}]
    if device == "cpu":
        rows.append({"measure": "process max RSS (MiB)", "scratchseg med": m_ours["maxrss"] / mib,
                     "torch med": m_theirs["maxrss"] / mib, "ratio": m_ours["maxrss"] / m_theirs["maxrss"]})
    return rows


def print_step_table(rows):
    """The comparison table, then the load average (other work on the machine moves the figures)."""
    print_table(rows, ["measure", "scratchseg med", "scratchseg min", "torch med", "torch min", "ratio"])
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min) at end: %.2f %.2f %.2f" % os.getloadavg())


# ------------------------------------------------------------- peak memory
def rss_bytes():
    """Current resident set size of this process (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes():
    """The kernel's high-water mark of this process's resident size (bytes): VmHWM.

    Not ``getrusage().ru_maxrss``: Linux carries that over from the parent
    across fork and exec, so a child started by a large benchmark process would
    report the parent's size.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_maxrss():
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_peak_memory(script, framework, extra_args=()):
    """Run ``script --memory-child FRAMEWORK`` in a fresh process and return its JSON report."""
    cmd = [sys.executable, script, "--memory-child", framework, *extra_args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {framework} failed:\n{out.stderr[-3000:]}")
    reports = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(reports[-1])

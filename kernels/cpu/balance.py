"""How many vector multiply-adds the core starts per cycle, measured when the kernels load.

Some choices of the convolutions depend on the balance between the core's
arithmetic and its memory: a block of unfolded columns that the GEMM reads
once per row tile is worth more cache when the GEMM is faster, and which
GEMM runs a product best (ours or the BLAS's) changes with it. On an AMD
EPYC (Zen 4) a 512-bit fused multiply-add takes both of the core's 256-bit
pipes, one per cycle; an Intel Xeon (Sapphire Rapids and most AVX-512 Xeons)
has two 512-bit units, two per cycle: the same products run twice as fast
there, while the passes over memory around them do not, and the crossovers
move (measurements of both: ``benchmarks/NOTES.md``).

The count is measured, not looked up by CPU model: a chain of dependent
vector multiply-adds (one per latency, about 4 cycles everywhere) is timed
against 16 independent ones, in the same process at the same clock, and
the ratio of their rates is the number of multiply-adds started per
latency: about 4 with one unit, 8 with two. Best of several runs (a
neighbour on the machine can only make a run slower), 2-3 ms in all, and
the threshold halfway between the two kinds leaves a margin of a third
each way, so the same machine always reads the same count and the kernels'
results stay the same from run to run. ``SCRATCHSEG_FMA_UNITS=1`` or ``2``
sets it instead (for tests and for comparing the two kinds of choices on
one machine).
"""

from __future__ import annotations

import os
import time

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["FMA_UNITS", "fma_units", "measure_ratio"]

_W = 16  # floats per vector: a 512-bit one where the CPU has it (LLVM splits it in two elsewhere)
_CHAINS = 16  # independent accumulators: more than latency x units, so the units are the limit


def _make_chains(chains):
    """An intrinsic ``loop(n, seed)``: n rounds of ``chains`` independent vector FMAs; returns a float."""

    @intrinsic
    def loop(typingctx, n, seed):
        sig = types.float32(types.intp, types.float32)

        def codegen(context, builder, signature, args):
            n, seed = args
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vec = ir.VectorType(f32, _W)
            fn = builder.function
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{_W}f32")
            one = builder.insert_element(ir.Constant(vec, ir.Undefined), seed, ir.Constant(i32, 0))
            a = builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(i32, _W),
                                                                                        [0] * _W))
            b = ir.Constant(vec, [0.999] * _W)
            entry = builder.block
            body = fn.append_basic_block("chains.body")
            done = fn.append_basic_block("chains.done")
            builder.branch(body)
            builder.position_at_end(body)
            i = builder.phi(i64)
            i.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for c in range(chains):
                phi = builder.phi(vec)
                phi.add_incoming(ir.Constant(vec, [float(c)] * _W), entry)
                accs.append(phi)
            new = [builder.call(fma, [acc, b, a]) for acc in accs]
            nxt = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(nxt, body)
            for phi, v in zip(accs, new):
                phi.add_incoming(v, body)
            builder.cbranch(builder.icmp_signed("<", nxt, n), body, done)
            builder.position_at_end(done)
            total = new[0]
            for v in new[1:]:
                total = builder.fadd(total, v)
            return builder.extract_element(total, ir.Constant(i32, 0))

        return sig, codegen

    return loop


_one_chain = _make_chains(1)
_many_chains = _make_chains(_CHAINS)


@njit(cache=True, nogil=True)
def _dependent(n, seed):
    return _one_chain(n, seed)


@njit(cache=True, nogil=True)
def _independent(n, seed):
    return _many_chains(n, seed)


def _best(fn, n, repeats=5):
    fn(16, 0.5)  # compiled (or loaded from the cache) before timing
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(n, 0.5)
        best = min(best, time.perf_counter() - t)
    return best


def measure_ratio(rounds=100_000):
    """Independent vector FMAs per dependent one in the same time (about 4: one unit; 8: two units)."""
    t_dependent = _best(_dependent, rounds)  # rounds FMAs, one after another
    t_independent = _best(_independent, rounds)  # _CHAINS x rounds FMAs, side by side
    return (_CHAINS * rounds / t_independent) / (rounds / t_dependent)


def fma_units():
    """Vector FMA units per core: ``SCRATCHSEG_FMA_UNITS`` if set, else 2 if the measured ratio is 6 or more, else 1."""
    text = os.environ.get("SCRATCHSEG_FMA_UNITS", "").strip()
    if text:
        if text not in ("1", "2"):
            raise ValueError(f"SCRATCHSEG_FMA_UNITS={text!r}: expected 1 or 2")
        return int(text)
    try:
        ratio = measure_ratio()
    except Exception:  # an LLVM that cannot build the loops: the narrower kind's choices
        return 1
    return 2 if ratio >= 6 else 1


#: Vector FMA units per core of this machine (1 or 2), measured once when the kernels load.
FMA_UNITS = fma_units()

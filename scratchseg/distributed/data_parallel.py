"""Data parallelism: the same model on every process, each on its slice of the batch, gradients averaged.

    broadcast_parameters(model)    rank 0's parameters and buffers on every process (once, at the start)
    all_reduce_gradients(model)    after backward: every gradient replaced by its mean over the processes
    distributed_optimizer(opt)     the optimizer whose step() does all_reduce_gradients first (Horovod's way)
    shard(data)                    this process's part of a dataset, or of each batch of a Loader

The gradients travel in ONE flat buffer, one allreduce per step. A step's
backward is one Python walk in this thread, so there is nothing for buckets
to overlap with (an MPI exchange makes no progress while NumPy computes);
one message pays the latency once and moves the bytes at full bandwidth.
The buffer carries one more number, this process's Ctrl-C flag, so that all
processes agree on the step after which they stop.
"""

from __future__ import annotations

import numpy

from ..autograd import Tensor, enable_grad
from ..backend import get_array_module
from .comm import all_reduce_sum, broadcast, rank, world_size

__all__ = ["broadcast_parameters", "all_reduce_gradients", "distributed_optimizer", "shard", "Shard",
           "request_stop", "stop_agreed", "all_reduce_evaluation"]

_stop = {"local": False, "agreed": False}


def broadcast_parameters(model):
    """Overwrite every parameter and buffer of ``model`` with rank 0's (in place); returns the model."""
    for _, p in model.named_parameters():
        p.data = _broadcast_array(p.data)
    for module in model.modules():
        for name, value in module._buffers.items():
            if value is not None:
                module._buffers[name] = _broadcast_array(value)
    return model


def _broadcast_array(a):
    if a.flags.c_contiguous:
        return broadcast(a)
    return broadcast(get_array_module(a).ascontiguousarray(a))


def all_reduce_gradients(model_or_params):
    """Average the gradients over the processes: one allreduce of one flat buffer.

    Takes a model or an iterable of parameters. A parameter without a gradient
    (frozen, or unused by the forward) is left alone; every process has the same
    graph, so they agree on which those are.
    """
    params = model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params
    params = [p for p in params if isinstance(p, Tensor) and p.grad is not None]
    R = world_size()
    if R == 1:
        return
    xp = get_array_module(params[0].grad) if params else numpy
    dtype = numpy.result_type(*[p.grad.dtype for p in params]) if params else numpy.float64
    sizes = [p.grad.size for p in params]
    flat = xp.empty(sum(sizes) + 1, dtype=dtype)  # (all gradients + the stop flag,)
    offset = 0
    for p, n in zip(params, sizes):
        flat[offset:offset + n] = p.grad.ravel()
        offset += n
    flat[offset] = 1.0 if _stop["local"] else 0.0
    all_reduce_sum(flat)  # the step's one exchange
    _stop["agreed"] = bool(flat[offset] > 0)
    flat /= R  # sum -> mean
    offset = 0
    for p, n in zip(params, sizes):
        p.grad = flat[offset:offset + n].reshape(p.grad.shape).astype(p.grad.dtype, copy=False)
        offset += n


def request_stop():
    """This process wants to stop (Ctrl-C); every process learns it at the next gradient exchange."""
    _stop["local"] = True


def stop_agreed():
    """True once any process asked to stop, as of the last gradient exchange (the same on every process)."""
    return _stop["agreed"]


class _AllReduceBeforeStep:
    """Mixed into an optimizer's own class: ``step()`` averages the gradients first."""

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        all_reduce_gradients([p for group in self.param_groups for p in group["params"]])
        super().step()
        return loss


def distributed_optimizer(optimizer):
    """``optimizer`` (kept, with its state) turned into one whose ``step()`` averages gradients first.

    Its class becomes a subclass of its own (``DistributedSGD`` for SGD), so
    it is still an ``Optimizer`` to the schedules and checkpoints.
    """
    cls = type(optimizer)
    if not issubclass(cls, _AllReduceBeforeStep):
        optimizer.__class__ = type("Distributed" + cls.__name__, (_AllReduceBeforeStep, cls), {})
    return optimizer


# ------------------------------------------------------------------ data
class Shard:
    """Samples ``indices`` of ``dataset``, as a dataset (``len``, ``[i]``, ``names``, ``has_masks``)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        names = getattr(dataset, "names", None)
        self.names = [names[i] for i in self.indices] if names is not None else [str(i) for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    @property
    def has_masks(self):
        return getattr(self.dataset, "has_masks", True)


def shard(data, rank_=None, world_size_=None):
    """This process's part of ``data``.

    A Loader: the same loader, each of its batches cut into ``world_size``
    slices of which this process gets slice ``rank`` (so the loader's batch
    size is the global one). A dataset: a contiguous block of about
    ``len / world_size`` samples (the blocks of all processes cover it once).
    Alone, ``data`` itself.
    """
    r = rank() if rank_ is None else int(rank_)
    R = world_size() if world_size_ is None else int(world_size_)
    if R == 1:
        return data
    from ..data import Loader

    if isinstance(data, Loader):
        return data.sharded(r, R)
    blocks = numpy.array_split(numpy.arange(len(data)), R)
    return Shard(data, blocks[r])


def all_reduce_evaluation(matrix, loss_sum, loss_pixels):
    """The confusion matrix, loss sum and pixel count summed over the processes (one allreduce)."""
    if world_size() == 1:
        return matrix, loss_sum, loss_pixels
    K = int(matrix.shape[0])
    flat = numpy.concatenate([numpy.asarray(matrix, dtype=numpy.float64).ravel(), [loss_sum, loss_pixels]])
    all_reduce_sum(flat)  # counts are exact in float64 up to 2**53 pixels
    return flat[:K * K].reshape(K, K).astype(numpy.int64), float(flat[-2]), int(flat[-1])

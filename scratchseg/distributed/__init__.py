"""Data-parallel training on MPI (mpi4py), NCCL between GPUs, synchronised batch norm.

Launch one process per worker with ``mpirun -n R`` (or ``srun``); each holds
the whole model, computes on its slice of the global batch, and the gradients
are averaged before every step. In your own training loop::

    import scratchseg.distributed as dist

    dist.init()                                   # join the job (mpirun -n R python train.py)
    model = dist.convert_sync_batchnorm(model)    # optional: batch norm over the global batch
    dist.broadcast_parameters(model)              # rank 0's weights everywhere
    optimizer = dist.distributed_optimizer(optim.SGD(model.parameters(), lr=0.01))
    loader = dist.shard(Loader(train_set, batch_size=R * b, shuffle=True))   # batch b per process
    for images, masks, _ in loader.batches(epoch):
        loss = F.cross_entropy(model(Tensor(images)), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()                          # = dist.all_reduce_gradients(model); then the update
    if dist.is_main(): save(...)                  # rank 0 alone writes

Files: ``comm.py`` (the processes and the exchanges, MPI or NCCL),
``data_parallel.py`` (parameters, gradients, optimizer, data shards),
``sync_batchnorm.py`` (``SyncBatchNorm``). See docs/distributed.md.
"""

from .comm import (DistributedError, abort, abort_on_error, all_gather_scalar, all_reduce_sum, broadcast,
                   broadcast_object, init, is_initialized, is_main, launcher_world_size, rank, world_size)
from .data_parallel import (Shard, all_reduce_evaluation, all_reduce_gradients, broadcast_parameters,
                            distributed_optimizer, request_stop, shard, stop_agreed)
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["init", "is_initialized", "rank", "world_size", "is_main", "broadcast_parameters",
           "all_reduce_gradients", "distributed_optimizer", "SyncBatchNorm", "convert_sync_batchnorm", "shard",
           "Shard", "all_reduce_sum", "broadcast", "broadcast_object", "all_gather_scalar", "abort",
           "abort_on_error", "DistributedError", "launcher_world_size", "request_stop", "stop_agreed",
           "all_reduce_evaluation"]

"""Data parallelism (scratchseg.distributed): the pieces in one process, then whole jobs under ``mpirun -n 2``.

The ``mpi`` tests start ``mpirun -n 2`` themselves (a subprocess with a
timeout, so a hang fails the test instead of blocking CI) and compare with a
one-process run made here. They need the ``mpi`` extra (mpi4py and MPICH's
wheel, whose ``mpirun`` sits beside this Python); without it they skip,
except under CI (``CI=true``), where they fail. ``.ci/run`` also runs this file
under ``mpirun -n 2 python -m pytest``: then the in-process collective tests at the
end run on both ranks and everything else skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import scratchseg
import scratchseg.distributed as dist
from scratchseg import nn
from scratchseg.autograd import Tensor
from scratchseg.checkpoint import CheckpointError, load_checkpoint
from scratchseg.training import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNDER_MPIRUN = dist.launcher_world_size() > 1  # this pytest was itself started by mpirun


def _mpirun():
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.path.exists(beside) else shutil.which("mpirun")


def _have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return _mpirun() is not None


single = pytest.mark.skipif(UNDER_MPIRUN, reason="one-process test (this pytest runs under mpirun)")
mpi = [pytest.mark.mpi, pytest.mark.skipif(UNDER_MPIRUN, reason="starts mpirun itself"),
       pytest.mark.skipif(not _have_mpi() and os.environ.get("CI") != "true",
                          reason='needs the mpi extra: pip install ".[mpi]"')]


def mpi_job(test):
    """Marks a test that starts ``mpirun -n 2``."""
    for mark in mpi:
        test = mark(test)
    return test


collective = pytest.mark.skipif(not UNDER_MPIRUN, reason="runs on every rank under mpirun -n 2 (.ci/run)")


@pytest.fixture(autouse=True)
def _default_dtype_restored():
    """A --dtype float64 run sets the process's default dtype; the next test file expects float32."""
    yield
    scratchseg.set_default_dtype("float32")


def _env():
    """This environment without a launcher's variables (the child is a job of its own), one thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "MPI_"))}
    env.update(PYTHONUNBUFFERED="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return env


def _mpirun_cmd(n=2):
    cmd = [_mpirun(), "-n", str(n)]
    version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:  # a system Open MPI: root and 2 ranks on few cores
        cmd += ["--oversubscribe", "--allow-run-as-root"]
    return cmd


def _run_mpi(args, timeout=180, n=2):
    proc = subprocess.run(_mpirun_cmd(n) + args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc


TINY = ["--data", "shapes:n_train=8,n_val=5,n_test=0,size=16", "--epochs", "3", "--optimizer", "sgd",
        "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "0.001", "--schedule", "step", "--step-size", "1",
        "--gamma", "0.5", "--dtype", "float64", "--checkpoint-every", "0", "--num-predictions", "0",
        "--no-progress"]


def _one_process(tmp_path, name, batch, options):
    from scratchseg.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", *TINY, "--model-option", options, "--batch-size", str(batch),
                                      "--out", str(tmp_path), "--name", name])
    return train(_train_config(args), log=lambda *_: None)


def _two_processes(tmp_path, name, batch, options, *extra):
    proc = _run_mpi([sys.executable, "-m", "scratchseg", "train", "--distributed", *extra, *TINY, "--model-option",
                     options, "--batch-size", str(batch), "--out", str(tmp_path), "--name", name])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _records(run):
    return json.load(open(os.path.join(run, "metrics.json")))


def _compare(a, b, tol=1e-10):
    """Loss curves, validation scores and final weights of two run folders, to ``tol``."""
    ra, rb = _records(a), _records(b)
    assert len(ra) == len(rb) == 3
    for key in ("train_loss", "val_loss", "miou", "pixel_acc"):
        np.testing.assert_allclose([r[key] for r in rb], [r[key] for r in ra], rtol=tol, atol=tol, err_msg=key)
    wa, wb = load_checkpoint(os.path.join(a, "last.npz"))["model"], load_checkpoint(os.path.join(b, "last.npz"))["model"]
    assert list(wa) == list(wb)
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], rtol=tol, atol=tol, err_msg=key)
    return max(float(np.max(np.abs(np.asarray(wb[k], float) - np.asarray(wa[k], float)))) for k in wa)


# ------------------------------------------------------------------ whole jobs under mpirun -n 2
@mpi_job
def test_two_processes_with_sync_bn_train_as_one_with_the_double_batch(tmp_path):
    """float64, SGD with momentum and weight decay, a step schedule, flips: 3 epochs agree to 1e-10."""
    options = "base=4,depth=2"  # a U-Net with batch norm
    one = _one_process(tmp_path, "one", 4, options)["run_dir"]
    two = _two_processes(tmp_path, "two", 2, options, "--sync-bn")
    assert "batch 2 per process x 2 processes" in two.stdout and two.stdout.count("run folder") == 1
    _compare(one, os.path.join(tmp_path, "two"))
    saved = load_checkpoint(os.path.join(tmp_path, "two", "last.npz"))
    assert saved["meta"]["world_size"] == 2 and saved["meta"]["config"]["dtype"] == "float64"
    assert all(a.dtype == np.float64 for a in saved["model"].values() if a.dtype.kind == "f")
    # without --sync-bn each half-batch is normalised with its own statistics: another run
    _two_processes(tmp_path, "local-bn", 2, options)
    with pytest.raises(AssertionError):
        _compare(one, os.path.join(tmp_path, "local-bn"), tol=1e-6)


@mpi_job
def test_two_processes_train_a_model_without_batch_norm_as_one_with_the_double_batch(tmp_path):
    options = "base=4,depth=2,batchnorm=false"
    one = _one_process(tmp_path, "one", 4, options)["run_dir"]
    _two_processes(tmp_path, "two", 2, options)
    _compare(one, os.path.join(tmp_path, "two"))


def _gpus():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


@pytest.mark.gpu
@mpi_job
def test_nccl_two_gpus_with_sync_bn_train_as_one_gpu_with_the_double_batch(tmp_path):
    """--backend cupy: gradients and batch-norm sums through NCCL, one GPU per rank (needs two GPUs)."""
    if _gpus() < 2:
        pytest.skip("needs two GPUs: NCCL does not put two ranks on one device")
    options = "base=4,depth=2"
    proc = subprocess.run([sys.executable, "-m", "scratchseg", "train", "--backend", "cupy", *TINY, "--model-option",
                           options, "--batch-size", "4", "--out", str(tmp_path), "--name", "one"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _two_processes(tmp_path, "two", 2, options, "--sync-bn", "--backend", "cupy")
    _compare(os.path.join(tmp_path, "one"), os.path.join(tmp_path, "two"))


@mpi_job
def test_a_killed_distributed_run_resumed_equals_an_uninterrupted_one(tmp_path):
    options = "base=4,depth=2"
    extra = ["--sync-bn", "--checkpoint-every", "1"]
    _two_processes(tmp_path, "whole", 2, options, *extra)
    cmd = _mpirun_cmd() + [sys.executable, "-m", "scratchseg", "train", "--distributed", *TINY, "--model-option",
                           options, "--batch-size", "2", "--out", str(tmp_path), "--name", "killed", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    last, deadline, meta, ranks = tmp_path / "killed" / "last.npz", time.time() + 120, None, None
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                meta = load_checkpoint(last)["meta"] if last.exists() else None
            except CheckpointError:
                meta = None
            if meta and ranks is None:
                ranks = _descendants(proc.pid)  # found once, so that the kill below is quick
            if meta and meta["iteration"] >= 3 and meta["epoch"] < 3:  # in epoch 2 of 3 (2 iterations each)
                break
            time.sleep(0.002)
    finally:
        _kill_job(proc, ranks)
    stopped = load_checkpoint(last)["meta"]
    assert stopped["epoch"] < 3 and stopped["iteration"] >= 3, "the run ended before it could be killed"
    # another number of processes is refused, saying what was saved
    refused = _run_mpi([sys.executable, "-m", "scratchseg", "train", "--distributed", "--resume",
                        str(tmp_path / "killed")], n=1)
    assert refused.returncode == 2 and "saved by a run on 2 process(es)" in refused.stderr, refused.stderr
    resumed = _run_mpi([sys.executable, "-m", "scratchseg", "train", "--distributed", "--resume",
                        str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    assert _compare(os.path.join(tmp_path, "whole"), os.path.join(tmp_path, "killed"), tol=1e-13) == 0.0


def _kill_job(proc, pids=None):
    """SIGKILL mpirun and the ranks it started (they run in sessions of their own: found by parent)."""
    pids = (pids or []) + _descendants(proc.pid)
    for pid in pids + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@mpi_job
def test_ctrl_c_under_mpirun_saves_once_and_every_rank_exits_130(tmp_path):
    cmd = _mpirun_cmd() + [sys.executable, "-m", "scratchseg", "train", "--distributed", *TINY, "--epochs", "30",
                           "--model-option", "base=4,depth=2", "--batch-size", "2", "--out", str(tmp_path),
                           "--name", "cc", "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last, deadline = tmp_path / "cc" / "last.npz", time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # as the terminal does: mpirun forwards it to every rank
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        pytest.fail("the job did not stop after Ctrl-C")
    assert proc.returncode == 130, err
    assert err.count("interrupted ") == 1 and "mpirun -n 2 scratchseg train --distributed --resume" in err
    meta = load_checkpoint(last)["meta"]
    assert meta["epoch"] < 30 and meta["world_size"] == 2


FAILING_RANK = """
import sys
import scratchseg.training.loop as loop
import scratchseg.distributed as dist
from scratchseg.cli import main

real = loop.check_loss
def check_loss(value, state, last):
    if dist.rank() == 1 and state.iteration == 2:
        {what}
    return real(value, state, last)
loop.check_loss = check_loss
sys.exit(main(["train", "--distributed", "--data", "shapes:n_train=16,n_val=2,n_test=0,size=16", "--epochs", "50",
               "--model-option", "base=4,depth=2", "--batch-size", "2", "--no-progress", "--num-predictions", "0",
               "--out", sys.argv[1]]))
"""


@mpi_job
def test_a_rank_that_raises_ends_the_job_within_seconds_with_its_error(tmp_path):
    script = FAILING_RANK.format(what='raise RuntimeError("injected failure")')
    started = time.time()
    proc = _run_mpi([sys.executable, "-c", script, str(tmp_path)], timeout=60)
    assert proc.returncode != 0
    assert time.time() - started < 30  # 50 epochs would take minutes: the other rank did not wait on
    assert "error on rank 1 of 2: RuntimeError: injected failure" in proc.stderr, proc.stderr


@mpi_job
def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    script = FAILING_RANK.format(what='value = float("nan")')
    proc = _run_mpi([sys.executable, "-c", script, str(tmp_path)], timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("the loss became nan on rank 1 at epoch 1, batch 3 (iteration 3)") == 1, proc.stderr


SHARDED_EVAL = """
import json, sys
import scratchseg, scratchseg.distributed as dist
from scratchseg.data import make_task
from scratchseg.training import evaluate
from scratchseg.training.build import build_model

dist.init()
scratchseg.set_default_dtype("float64")
scratchseg.manual_seed(3)
task = make_task("shapes:n_train=1,n_val=7,n_test=0,size=16")
model = build_model("unet", {"base": 4, "depth": 2}, task.num_classes, task.in_channels)
scores = evaluate(model, task, "val", batch_size=2)
if dist.rank() == 0:
    print(json.dumps(scores))
"""


@mpi_job
def test_sharded_evaluation_equals_one_process_evaluation():
    proc = _run_mpi([sys.executable, "-c", SHARDED_EVAL])
    assert proc.returncode == 0, proc.stderr
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    env = {k: v for k, v in _env().items()}
    alone = subprocess.run([sys.executable, "-c", SHARDED_EVAL], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert alone.returncode == 0, alone.stderr
    whole = json.loads(alone.stdout.strip().splitlines()[-1])
    assert sharded["per_class_iou"] == whole["per_class_iou"] and sharded["pixel_acc"] == whole["pixel_acc"]
    assert sharded["loss"] == pytest.approx(whole["loss"], rel=1e-12)


# ------------------------------------------------------------------ the pieces, in one process
@single
def test_sync_batch_norm_alone_is_batch_norm_forward_backward_and_running_stats(rng):
    x = rng.standard_normal((3, 4, 5, 6)) * 2 + 1.5
    dout = rng.standard_normal(x.shape)
    results = []
    for cls in (nn.BatchNorm2d, dist.SyncBatchNorm):
        with scratchseg.backend.use_kernels("numpy"):
            scratchseg.set_default_dtype("float64")
            try:
                bn = cls(4, momentum=0.3)
            finally:
                scratchseg.set_default_dtype("float32")
            bn.weight.data[:] = rng.standard_normal(4) if not results else results[0][4]
            bn.bias.data[:] = 0.5
            for _ in range(2):  # the running mean is the shift of the second call's sums
                t = Tensor(x.copy(), requires_grad=True)
                out = bn(t)
                out.backward(dout)
            results.append((out.data, t.grad, bn.weight.grad, bn.running_mean.copy(), bn.weight.data.copy(),
                            bn.running_var.copy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


@single
def test_convert_sync_batchnorm_keeps_parameters_buffers_and_names():
    model = scratchseg.models.create("unet", num_classes=3, in_channels=3, base=4, depth=2)
    before = model.state_dict()
    params = [id(p) for p in model.parameters()]
    model = dist.convert_sync_batchnorm(model)
    assert any(isinstance(m, dist.SyncBatchNorm) for m in model.modules())
    assert not any(type(m).__name__.startswith("BatchNorm") for m in model.modules())
    assert list(model.state_dict()) == list(before) and [id(p) for p in model.parameters()] == params
    assert isinstance(dist.convert_sync_batchnorm(nn.BatchNorm1d(3)), dist.SyncBatchNorm)


@single
def test_sharded_loader_slices_the_global_batches_and_shards_cover_a_dataset():
    from scratchseg.data import Loader
    from scratchseg.data.task import ArrayDataset

    images = [np.full((4, 4, 3), i, np.uint8) for i in range(10)]
    ds = ArrayDataset(images, [np.zeros((4, 4), np.int64)] * 10)
    whole = Loader(ds, batch_size=4, shuffle=True, seed=5, drop_last=True)
    parts = [dist.shard(whole, r, 2) for r in range(2)]
    assert len(parts[0]) == len(whole) == 2
    for b, (_, _, idx) in enumerate(whole.batches(epoch=1)):
        sliced = [list(p.batches(epoch=1, start=b))[0][2] for p in parts]
        assert sliced == [idx[:2], idx[2:]]
    blocks = [dist.shard(ds, r, 3) for r in range(3)]
    assert [len(b) for b in blocks] == [4, 3, 3]
    assert [b.names for b in blocks] == [ds.names[:4], ds.names[4:7], ds.names[7:]]
    assert dist.shard(ds) is ds  # alone: everything


@single
def test_without_a_job_the_api_is_one_process_and_changes_nothing():
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    p = nn.Parameter(np.ones(3))
    p.grad = np.arange(3.0)
    dist.all_reduce_gradients([p])
    np.testing.assert_array_equal(p.grad, np.arange(3.0))
    assert dist.all_gather_scalar(2.5) == [2.5]


@single
def test_without_mpi4py_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    monkeypatch.setitem(dist.comm._state, "comm", None)
    with pytest.raises(dist.DistributedError, match=r'pip install "scratchseg\[mpi\]"'):
        dist.init()


@single
def test_sync_bn_without_distributed_is_refused_and_float64_runs_in_float64(tmp_path):
    with pytest.raises(ValueError, match="--distributed"):
        TrainConfig(sync_bn=True).validate()
    cfg = TrainConfig(data="shapes:n_train=4,n_val=2,n_test=0,size=16", model_options={"base": 4, "depth": 2},
                      epochs=1, batch_size=2, out=str(tmp_path), name="f64", progress=False, num_predictions=0,
                      dtype="float64")
    try:
        run = train(cfg, log=lambda *_: None)["run_dir"]
    finally:
        scratchseg.set_default_dtype("float32")
    weights = load_checkpoint(os.path.join(run, "last.npz"))["model"]
    assert {a.dtype for a in weights.values() if a.dtype.kind == "f"} == {np.dtype(np.float64)}


# ------------------------------------------------------------------ collective, on every rank of mpirun -n 2
@collective
def test_collective_gradients_are_averaged_and_parameters_broadcast():
    dist.init()
    r = dist.rank()
    p = nn.Parameter(np.full(5, float(r)))
    p.grad = np.full(5, 2.0 * r + 1)
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    model[0].weight.data[...] = r + 7
    dist.broadcast_parameters(model)
    assert float(model[0].weight.data.ravel()[0]) == 7.0
    dist.all_reduce_gradients([p])
    np.testing.assert_array_equal(p.grad, np.full(5, 2.0))  # (1 + 3) / 2
    assert dist.all_gather_scalar(r) == [0.0, 1.0]


@collective
def test_collective_sync_batch_norm_on_halves_is_batch_norm_on_the_whole_batch():
    dist.init()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 5, 5)) * 3 + 2  # the global batch, drawn alike on both ranks
    dout = rng.standard_normal(x.shape)
    half = slice(2 * dist.rank(), 2 * dist.rank() + 2)
    outs = []
    for cls, xs, ds in ((nn.BatchNorm2d, x, dout), (dist.SyncBatchNorm, x[half], dout[half])):
        scratchseg.set_default_dtype("float64")
        try:
            bn = cls(3)
        finally:
            scratchseg.set_default_dtype("float32")
        t = Tensor(xs.copy(), requires_grad=True)
        out = bn(t)
        out.backward(ds)
        outs.append((out.data, t.grad, bn.running_mean.copy(), bn.running_var.copy(), bn.weight.grad, bn.bias.grad))
    whole, sync = outs
    np.testing.assert_allclose(sync[0], whole[0][half], atol=1e-12)
    np.testing.assert_allclose(sync[1], whole[1][half], atol=1e-12)  # dx needs the other half's sums
    np.testing.assert_allclose(sync[2], whole[2], atol=1e-12)
    np.testing.assert_allclose(sync[3], whole[3], atol=1e-12)
    # dgamma, dbeta: this rank's part; the gradient exchange adds the halves (and divides by 2)
    total = np.concatenate([sync[4], sync[5]])
    dist.all_reduce_sum(total)
    np.testing.assert_allclose(total, np.concatenate([whole[4], whole[5]]), atol=1e-12)

"""The backend switch: set_backend / use / SCRATCHSEG_BACKEND, devices, kernels, default dtype."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import cupy_or_skip

import scratchseg
from scratchseg import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter with ``env`` added; (returncode, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SCRATCHSEG_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout.strip(), proc.stderr


# ------------------------------------------------------------ backend choice
def test_numpy_is_the_default_and_xp_follows():
    code = "import scratchseg; print(scratchseg.backend.current(), scratchseg.backend.xp().__name__)"
    rc, out, err = run_python(code)
    assert rc == 0, err
    assert out == "numpy numpy"


def test_environment_variable_selects_numpy():
    rc, out, err = run_python("import scratchseg; print(scratchseg.backend.current())", SCRATCHSEG_BACKEND=" NumPy ")
    assert rc == 0, err
    assert out == "numpy"


def test_environment_variable_rejects_unknown_names():
    rc, out, err = run_python("import scratchseg; scratchseg.backend.current()", SCRATCHSEG_BACKEND="jax")
    assert rc != 0
    assert "SCRATCHSEG_BACKEND" in err and "'jax'" in err and "'numpy'" in err


def test_environment_variable_cupy_without_gpu_is_a_clear_error():
    if gpu_present():
        pytest.skip("a GPU is present: SCRATCHSEG_BACKEND=cupy works here (see the gpu test)")
    rc, out, err = run_python("import scratchseg; scratchseg.backend.current()", SCRATCHSEG_BACKEND="cupy")
    assert rc != 0
    assert "BackendError" in err and "cupy" in err.lower()


@pytest.mark.gpu
def test_environment_variable_cupy_with_gpu():
    cupy_or_skip()
    code = (
        "import scratchseg, numpy as np; print(scratchseg.backend.current());"
        "t = scratchseg.tensor([1.0, 2.0]); print(t.device, type(t.data).__module__.split('.')[0])"
    )
    rc, out, err = run_python(code, SCRATCHSEG_BACKEND="cupy")
    assert rc == 0, err
    assert out.splitlines() == ["cupy", "cuda cupy"]


def test_set_backend_and_use_reject_unknown_names():
    before = backend.current()
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        backend.set_backend("torch")
    with pytest.raises(ValueError, match="expected one of 'numpy', 'cupy'"):
        with backend.use("CUDA"):
            pass
    assert backend.current() == before


def test_cupy_requested_without_gpu_is_a_clear_error():
    if gpu_present():
        pytest.skip("a GPU is present")
    before = backend.current()
    with pytest.raises(backend.BackendError, match="cupy"):
        backend.set_backend("cupy")
    with pytest.raises(backend.BackendError, match="cupy"):
        with backend.use("cupy"):
            pass
    with pytest.raises(backend.BackendError):
        backend.to_device(np.zeros(2), "cuda")
    with pytest.raises(backend.BackendError):
        scratchseg.Tensor(np.zeros(2)).to("cuda")
    assert backend.current() == before  # a failed switch changes nothing


def test_set_backend_and_use_restore():
    backend.set_backend("numpy")
    assert backend.current() == "numpy"
    with backend.use("numpy"):
        assert backend.xp() is np
        with backend.use("numpy"):
            assert backend.current() == "numpy"
    assert backend.current() == "numpy"


@pytest.mark.gpu
def test_use_cupy_block_and_restore():
    cupy = cupy_or_skip()
    with backend.use("cupy"):
        assert backend.current() == "cupy" and backend.xp() is cupy
        assert scratchseg.zeros(2, 3).device == "cuda"
    assert backend.current() == "numpy"
    assert scratchseg.zeros(2, 3).device == "cpu"


# ------------------------------------------------------------ arrays and devices
def test_get_array_module_and_device_of():
    a = np.zeros(3)
    assert backend.get_array_module(a) is np
    assert backend.get_array_module(scratchseg.Tensor(a)) is np
    assert backend.get_array_module(1.0, [1, 2]) is np
    assert backend.device_of(a) == "cpu"
    assert not backend.is_cupy_array(a)


def test_to_device_cpu_round_trip():
    a = np.arange(6.0).reshape(2, 3)
    b = backend.to_device(a, "cpu")
    assert isinstance(b, np.ndarray) and np.array_equal(b, a)
    assert np.array_equal(backend.asnumpy(b), a)
    assert isinstance(backend.asnumpy([1, 2]), np.ndarray)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.to_device(a, "tpu")


@pytest.mark.gpu
def test_to_device_gpu_round_trip():
    cupy = cupy_or_skip()
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    g = backend.to_device(a, "cuda:0")
    assert isinstance(g, cupy.ndarray) and backend.device_of(g) == "cuda"
    assert backend.get_array_module(g) is cupy
    assert backend.get_array_module(a, g) is cupy
    assert backend.to_device(g, "cuda") is g  # already there
    back = backend.to_device(g, "cpu")
    assert isinstance(back, np.ndarray) and back.dtype == np.float32 and np.array_equal(back, a)
    t = scratchseg.Tensor(a, requires_grad=True).cuda()
    assert t.device == "cuda" and t.requires_grad
    assert np.array_equal(t.cpu().numpy(), a)


# ------------------------------------------------------------ kernels switch
def test_kernels_environment_variable():
    code = (
        "import numpy as np, scratchseg; from scratchseg import backend;"
        "print(backend.kernels(), backend.kernel('im2col', np.zeros((1, 1, 3, 3))))"
    )
    rc, out, err = run_python(code, SCRATCHSEG_KERNELS="numpy")
    assert rc == 0, err
    assert out == "numpy None"
    rc, out, err = run_python("import scratchseg", SCRATCHSEG_KERNELS="fortran")
    assert rc != 0 and "SCRATCHSEG_KERNELS" in err and "'fortran'" in err


def test_kernels_switch_selects_implementation():
    x = np.zeros((1, 1, 3, 3))
    with backend.use_kernels("numpy"):
        assert backend.kernels() == "numpy"
        assert backend.kernel("im2col", x) is None
    with backend.use_kernels("numba"):
        assert backend.kernels() == "numba"
        assert backend.kernel("no_such_kernel", x) is None  # an op without a fast twin uses the reference
        found = backend.kernel("im2col", x)
        if found is not None:  # present when the kernels package and Numba import
            import kernels.cpu

            assert found is kernels.cpu.KERNELS["im2col"]
    with pytest.raises(ValueError, match="unknown kernels"):
        backend.set_kernels("fast")
    with pytest.raises(ValueError, match="unknown kernels"):
        with backend.use_kernels("fast"):
            pass


def test_set_kernels_is_global_and_use_kernels_is_per_thread():
    previous = backend.kernels()
    try:
        backend.set_kernels("numpy")
        assert backend.kernels() == "numpy"
        seen = []
        with backend.use_kernels("numba"):
            worker = threading.Thread(target=lambda: seen.append(backend.kernels()))
            worker.start()
            worker.join()
            assert backend.kernels() == "numba"
        assert seen == ["numpy"]  # the other thread sees the process-wide choice
        assert backend.kernels() == "numpy"
    finally:
        backend.set_kernels(previous)


# ------------------------------------------------------------ default dtype
def test_default_dtype():
    previous = backend.get_default_dtype()
    try:
        backend.set_default_dtype("float64")
        assert backend.get_default_dtype() == np.float64
        assert scratchseg.ones(2).dtype == np.float64
        assert scratchseg.randn(2, 2).dtype == np.float64
        with pytest.raises(ValueError, match="float16, float32 or float64"):
            backend.set_default_dtype("int64")
    finally:
        backend.set_default_dtype(previous)
    assert scratchseg.ones(2).dtype == previous


# ------------------------------------------------------------------ the seam
def _replaceable_functions():
    """Every ``@replaceable`` reference function in scratchseg, by name."""
    import importlib
    import pkgutil

    import scratchseg

    found = {}
    for info in pkgutil.walk_packages(scratchseg.__path__, "scratchseg."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if callable(value) and hasattr(value, "reference") and getattr(value, "__module__", None) == info.name:
                found[name] = value
    return found


def _tables():
    import importlib

    tables = {}
    for device in ("cpu", "cuda"):
        try:
            tables[device] = importlib.import_module(f"kernels.{device}").KERNELS
        except ImportError:  # pragma: no cover - the kernels package is optional
            pass
    return tables


def test_every_registered_kernel_has_a_reference_with_its_signature():
    """A kernel in a table stands in for the reference of the same name, with the same arguments."""
    import inspect

    references = _replaceable_functions()
    assert {"conv2d_forward", "batch_norm_backward", "max_pool2d_forward", "sgd_update"} <= set(references)
    tables = _tables()
    assert tables, "no kernel table could be imported"
    for device, table in tables.items():
        for name, twin in table.items():
            assert name in references, f"kernels.{device}.KERNELS[{name!r}] replaces no @replaceable function"
            ours = list(inspect.signature(references[name].reference).parameters)
            theirs = list(inspect.signature(twin).parameters)
            assert theirs[: len(ours)] == ours, f"kernels.{device}.{name}{theirs} does not take {ours}"


def test_replaceable_uses_the_twin_unless_it_declines_or_the_reference_is_forced(monkeypatch):
    import kernels.cpu

    calls = []

    def reference(x, scale):
        calls.append("reference")
        return x * scale

    reference.__name__ = "test_only_scale"
    scale = backend.replaceable(reference)
    assert scale.reference is reference
    x = np.arange(3.0)

    def twin(x, scale):
        calls.append("twin")
        return NotImplemented if scale < 0 else x * scale + 0.5

    monkeypatch.setitem(kernels.cpu.KERNELS, "test_only_scale", twin)
    with backend.use_kernels("numba"):
        np.testing.assert_array_equal(scale(x, 2.0), x * 2.0 + 0.5)
        assert calls == ["twin"]
        np.testing.assert_array_equal(scale(x, -1.0), -x)  # the twin declined: the reference ran
        assert calls == ["twin", "twin", "reference"]
    calls.clear()
    with backend.use_kernels("numpy"):
        np.testing.assert_array_equal(scale(x, 2.0), x * 2.0)
        assert calls == ["reference"]

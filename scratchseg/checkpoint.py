"""Checkpoints: one ``.npz`` file, written atomically, read without pickle.

A checkpoint holds the model's state dict, the optimizer's and the learning
-rate schedule's state, and a JSON header (``meta``: model name and options,
the task, epoch and iteration, the position in the data order, the RNG state,
the metrics so far...). Inside the ``.npz``:

* ``model/<name>``: one array per state-dict entry (torch's names);
* ``optimizer/<n>``, ``scheduler/<n>``: the arrays found in those states;
* ``__scratchseg__``: the JSON header as uint8 bytes; it describes the nested
  optimizer / scheduler structures with ``{"__array__": "optimizer/3"}`` where
  an array was, so any structure of dicts, lists, numbers and arrays survives.

Writing goes to a temporary file in the same folder that is flushed, synced and
then renamed over the target (``os.replace``), so a crash never leaves a half
-written checkpoint under the real name. Reading uses
``numpy.load(allow_pickle=False)``: a checkpoint cannot run code.

``load_weights`` reads initial weights for ``--init`` from a scratchseg
checkpoint, a plain ``.npz`` of named arrays, or a PyTorch ``torch.save``
file (``.pt``/``.pth``), which is read *without torch*: the zip archive's
tensor storages are read as raw bytes and its pickle is interpreted by a
restricted unpickler that only knows the handful of names a state dict uses
(so a foreign pickle cannot run code either).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict

import numpy

from .backend import asnumpy, is_cupy_array

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_weights", "load_torch_file",
           "match_weights", "run_checkpoint", "FORMAT"]

FORMAT = "scratchseg-checkpoint"
VERSION = 1
_HEADER = "__scratchseg__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file."""


# ------------------------------------------------------------- encoding
def _is_array(value):
    return isinstance(value, numpy.ndarray) or is_cupy_array(value) or hasattr(value, "_ctx")


def _encode(value, prefix, arrays):
    """JSON-able description of ``value``; arrays are moved into ``arrays`` under ``prefix/<n>``."""
    if _is_array(value):
        if hasattr(value, "_ctx"):  # a Tensor
            value = value.data
        key = f"{prefix}/{len(arrays)}"
        arrays[key] = numpy.array(asnumpy(value))
        return {"__array__": key}
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, prefix, arrays), _encode(v, prefix, arrays)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, prefix, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, prefix, arrays) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (only arrays, numbers, strings, "
                    "None and dicts/lists/tuples of them)")


def _decode(value, arrays):
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if isinstance(value, dict):
        if "__array__" in value:
            return arrays[value["__array__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, arrays) for v in value["__tuple__"])
        if "__dict__" in value:
            out = {}
            for k, v in value["__dict__"]:
                k = _decode(k, arrays)
                out[tuple(k) if isinstance(k, list) else k] = _decode(v, arrays)
            return out
        return {k: _decode(v, arrays) for k, v in value.items()}
    return value


# -------------------------------------------------------------- writing
def save_checkpoint(path, model_state, optimizer_state=None, scheduler_state=None, meta=None):
    """Write a checkpoint to ``path`` atomically (temporary file + ``os.replace``).

    ``model_state``: mapping name -> array (``model.state_dict()``); the others
    are nested structures of arrays, numbers and strings; ``meta`` is a JSON
    -able dict (arrays allowed inside, they are stored next to the header).
    """
    path = os.fspath(path)
    arrays = OrderedDict()
    for name, value in model_state.items():
        arrays[f"model/{name}"] = numpy.array(asnumpy(value.data if hasattr(value, "_ctx") else value))
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model_keys": list(model_state.keys()),
        "optimizer": _encode(optimizer_state, "optimizer", arrays),
        "scheduler": _encode(scheduler_state, "scheduler", arrays),
        "meta": _encode(meta or {}, "meta", arrays),
    }
    arrays[_HEADER] = numpy.frombuffer(json.dumps(header).encode("utf-8"), dtype=numpy.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            numpy.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# -------------------------------------------------------------- reading
def _read_npz(path):
    """All arrays of an ``.npz`` (read eagerly, so truncation shows here), with clear errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; expected a checkpoint file such as {path}/last.npz")
    try:
        with numpy.load(path, allow_pickle=False) as data:
            return OrderedDict((k, data[k]) for k in data.files)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error) as exc:
        raise CheckpointError(f"cannot read {path}: it is not a complete .npz archive, so it is truncated or not a "
                              f"scratchseg checkpoint ({type(exc).__name__}: {exc})") from None


def load_checkpoint(path):
    """Read a checkpoint written by ``save_checkpoint``.

    Returns a dict with ``model`` (OrderedDict name -> NumPy array),
    ``optimizer``, ``scheduler`` (the nested states as saved) and ``meta``.
    Raises CheckpointError naming the file when it is missing, truncated or
    foreign.
    """
    arrays = _read_npz(path)
    if _HEADER not in arrays:
        raise CheckpointError(f"{path} is an .npz archive but not a scratchseg checkpoint (it has no {_HEADER} entry; "
                              "a plain .npz of weights can be given to --init instead)")
    try:
        header = json.loads(bytes(arrays.pop(_HEADER)).decode("utf-8"))
        if header.get("format") != FORMAT:
            raise ValueError(f"format is {header.get('format')!r}")
        if int(header.get("version", 0)) > VERSION:
            raise CheckpointError(f"{path} was written by a newer scratchseg (checkpoint version "
                                  f"{header['version']}, this one reads up to {VERSION})")
        model = OrderedDict((k, arrays[f"model/{k}"]) for k in header["model_keys"])
        return {
            "model": model,
            "optimizer": _decode(header["optimizer"], arrays),
            "scheduler": _decode(header["scheduler"], arrays),
            "meta": _decode(header["meta"], arrays),
        }
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} has a damaged scratchseg header ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------- PyTorch files, no torch
_TORCH_DTYPES = {
    "FloatStorage": numpy.float32, "DoubleStorage": numpy.float64, "HalfStorage": numpy.float16,
    "LongStorage": numpy.int64, "IntStorage": numpy.int32, "ShortStorage": numpy.int16,
    "CharStorage": numpy.int8, "ByteStorage": numpy.uint8, "BoolStorage": numpy.bool_,
}


class _StorageType:
    def __init__(self, name):
        if name not in _TORCH_DTYPES:
            raise pickle.UnpicklingError(f"tensor storage type torch.{name} is not supported")
        self.dtype = numpy.dtype(_TORCH_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    """(storage, offset, size, stride) -> an ndarray copy, as ``torch._utils._rebuild_tensor_v2``."""
    item = storage.dtype.itemsize
    if not size:
        return numpy.array(storage[offset])  # a 0-d array (num_batches_tracked)
    view = numpy.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                              strides=tuple(s * item for s in stride))
    return numpy.array(view)


def _rebuild_parameter(data, *_rest):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Knows only what a state dict needs: OrderedDict, tensors, storages. Anything else is refused."""

    _allowed = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, fh, zf, prefix):
        super().__init__(fh)
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name == "device":
            return str
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only state dicts of tensors can be read")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("unsupported storage type (a dtype scratchseg does not read)")
        raw = self.zf.read(f"{self.prefix}/data/{key}")
        return numpy.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))


def load_torch_file(path):
    """The state dict in a ``torch.save`` zip file, as name -> NumPy array, without importing torch."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                raise CheckpointError(f"{path} is a zip file without data.pkl: not a PyTorch file")
            prefix = pkl[0][: -len("/data.pkl")] if "/" in pkl[0] else ""
            if f"{prefix}/byteorder" in zf.namelist() and zf.read(f"{prefix}/byteorder").strip() != b"little":
                raise CheckpointError(f"{path} stores big-endian tensors, which scratchseg does not read")
            obj = _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path} is not a zip archive: only PyTorch files saved with torch.save's default (zip) format can be "
            "read; re-save it with torch.save(state_dict, path) in a recent PyTorch") from None
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read the PyTorch file {path}: {exc}") from None
    # a state dict itself, or a training checkpoint that holds one
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = OrderedDict((k, v) for k, v in obj.items() if isinstance(v, numpy.ndarray))
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return state


def load_weights(path):
    """Named arrays for ``--init``: from a scratchseg checkpoint, a plain ``.npz`` or a PyTorch file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"weights file {path} does not exist")
    if path.lower().endswith((".pt", ".pth", ".bin", ".ckpt")) or (zipfile.is_zipfile(path) and not
                                                                     path.lower().endswith(".npz")):
        return load_torch_file(path)
    arrays = _read_npz(path)
    if _HEADER in arrays:
        return load_checkpoint(path)["model"]
    return arrays


def run_checkpoint(folder):
    """The checkpoint a run folder's weights are read from: ``best.npz``, else ``last.npz``."""
    folder = os.fspath(folder)
    for name in ("best.npz", "last.npz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError(f"{folder} holds no checkpoint (expected {folder}/best.npz or {folder}/last.npz)")


def match_weights(model_state, weights):
    """Split ``weights`` against ``model_state``: what loads, what is skipped and why, what is missing.

    Returns ``(matched, skipped, missing)``: ``matched`` name -> array, ``skipped``
    a list of ``(name, reason)``, ``missing`` the model entries no weight fills.
    A model entry ``module.x`` also matches a weight named ``module.x`` with
    DataParallel's ``module.`` prefix removed.
    """
    matched, skipped = OrderedDict(), []
    for name, value in weights.items():
        key = name[len("module."):] if name.startswith("module.") and name not in model_state else name
        if key not in model_state:
            skipped.append((name, "no entry of that name in the model"))
            continue
        target = model_state[key]
        if tuple(value.shape) != tuple(target.shape):
            skipped.append((name, f"shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model"))
            continue
        matched[key] = value
    missing = [k for k in model_state if k not in matched]
    return matched, skipped, missing

"""ONNX export: a scratchseg model as a graph that ONNX Runtime (or any ONNX runtime) runs.

    >>> import scratchseg.onnx                                  # doctest: +SKIP
    >>> scratchseg.onnx.export(model, images, "unet.onnx")     # doctest: +SKIP

How the graph is found: a **trace**, not an ``export`` method per module.
``export`` runs the model once with hooks (``trace.py``) on the public
functions of ``scratchseg.functional`` and on ``Function.apply``, and each
call the model makes (``conv2d``, ``interpolate``, ``x + y``, ``x[..., a:b]``)
becomes ONNX nodes (``ops.py``). Why a trace:

* the models hold their glue in ``forward`` (FCN's crops, the U-Net's pad to
  a multiple of 16 and crop back, DeepLab's resize to the input size):
  export methods would write every forward a second time, in ONNX, and the
  two copies would drift; the trace exports what ``forward`` does;
* hooking the *functional* calls (not the Functions under them) records each
  op with the arguments a user wrote (``mode='bilinear', align_corners=False``,
  ``ceil_mode=True``), where the Function sees only precomputed index tables;
* a layer added later that calls an existing functional op exports with no
  change here, and one that calls a new op fails with that op's name and the
  module path where it is used (``ExportError``);
* sizes stay symbolic: a traced tensor's ``.shape`` gives ``SymInt``s, so the
  size arithmetic in ``forward`` becomes ``Shape``/``Mod``/``Sub`` nodes and
  the graph takes other heights and widths. A trace cannot see branches on
  sizes, so ``export`` traces a second time at another size and claims dynamic
  H/W only when both graphs are identical.

The files: ``trace.py`` (hooks, SymInt), ``graph.py`` (the builder),
``ops.py`` (the op mappings), ``exporter.py`` (``export``), ``runtime.py``
(loading and predicting with ONNX Runtime, needing only onnxruntime, NumPy
and Pillow; importable without scratchseg's other modules). ``onnx`` is
needed to export (``pip install "scratchseg[onnx]"``).
"""

from __future__ import annotations

__all__ = ["export", "ExportError", "SUPPORTED_OPSETS", "load", "predict_images"]


def __getattr__(name):  # onnx and onnxruntime are optional: imported on first use
    if name in ("export", "SUPPORTED_OPSETS", "METADATA_KEY"):
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ImportError("ONNX export needs the onnx package: pip install onnx (or scratchseg[onnx])") from None
        from . import exporter

        return getattr(exporter, name)
    if name == "ExportError":
        from .graph import ExportError

        return ExportError
    if name in ("load", "predict_images"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'scratchseg.onnx' has no attribute {name!r}")

"""ONNX export with an onnxruntime parity check.

:func:`export_onnx` writes ONE self-contained ``.onnx`` file (weights embedded, no ``.onnx.data`` side
file) with input ``"input"`` and output ``"logits"`` and a dynamic batch axis, then checks it with
``onnx.checker`` and compares onnxruntime (CPU) logits with PyTorch's at several batch sizes.

Export path: the dynamo exporter (``torch.onnx.export(..., dynamo=True, external_data=False)``, the
default exporter in torch >= 2.9) is tried first; if it raises, the TorchScript exporter
(``dynamo=False`` with ``dynamic_axes``) is used. The report says which one produced the file.

The file is written atomically: exported to a temp file in the target directory, checked, then
``os.replace``-d onto ``path``. ``metadata`` (string pairs, e.g. :func:`gkd_core.modelfile.onnx_metadata`) is
written into the file's ``metadata_props`` before the checks, so the checked file is the file written. ``onnx`` / ``onnxruntime`` are imported lazily so that importing this module
needs only torch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .io import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportReport", "export_onnx", "load_onnx_session", "onnx_predict"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(RuntimeError):
    """The model could not be exported, the ONNX file is invalid, or (``strict=True``) parity failed."""


@dataclass
class ExportReport:
    """Outcome of :func:`export_onnx`; ``passed`` is ``max_abs_diff <= tolerance``."""

    path: str
    opset: int
    max_abs_diff: float
    passed: bool
    tolerance: float
    input_shape: list[int]
    exporter: str = "dynamo"
    batch_sizes: list[int] = field(default_factory=list)
    diffs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of all fields."""
        return asdict(self)


def _plain_copy(model: nn.Module) -> nn.Module:
    """A CPU float32 eval-mode copy of ``model`` without hooks (the caller's model is left untouched)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # e.g. tensors captured by foreign hooks
        raise ExportError(f"could not copy {type(model).__name__} for export: {exc}") from exc
    for m in clone.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
        m._backward_hooks.clear()
    clone = clone.to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _rows(example: Tensor, batch: int) -> Tensor:
    """A batch of ``batch`` rows taken cyclically from ``example``."""
    idx = torch.arange(batch) % example.shape[0]
    return example[idx].contiguous()


@contextlib.contextmanager
def _quiet(names: Sequence[str] = ("onnx_ir", "onnxscript")) -> Iterator[None]:
    """Raise the exporter libraries' loggers to WARNING for the duration (their INFO is per-pass noise)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_dynamo(model: nn.Module, example: Tensor, dst: Path, opset: int) -> None:
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(dst),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            # a tuple matches forward()'s positional arguments, whatever the parameter is called
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=True,
            verbose=False,
        )


def _export_torchscript(model: nn.Module, example: Tensor, dst: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(
            model,
            (example,),
            str(dst),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def _make_self_contained(dst: Path) -> None:
    """Inline any external-data initializers into ``dst`` and delete their side files."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(dst), load_external_data=False)
    external = [t for t in proto.graph.initializer if uses_external_data(t)]
    if not external:
        return
    side_files = {
        dst.parent / entry.value for t in external for entry in t.external_data if entry.key == "location"
    }
    logger.info("inlining %d external-data tensors into %s", len(external), dst.name)
    proto = onnx.load(str(dst), load_external_data=True)
    onnx.save_model(proto, str(dst), save_as_external_data=False)
    for side in side_files:
        side.unlink(missing_ok=True)


def _set_metadata(dst: Path, metadata: Mapping[str, str]) -> None:
    """Write ``metadata`` into ``dst``'s ``metadata_props`` (replacing entries of the same keys)."""
    import onnx

    proto = onnx.load(str(dst))
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.save_model(proto, str(dst), save_as_external_data=False)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor,
    opset: int = 18,
    tolerance: float = 1e-4,
    check_batch_sizes: Sequence[int] = (1, 3),
    strict: bool = False,
    metadata: Optional[Mapping[str, str]] = None,
) -> ExportReport:
    """Export ``model`` to a single ``.onnx`` file at ``path`` and check it against PyTorch.

    The model is copied to CPU/float32/eval (the caller's model is not modified). ``example_input`` is one
    batch ``(B, C, H, W)``; parity is measured at its own batch size and at each of ``check_batch_sizes``
    (rows reused cyclically), proving the batch axis is dynamic. ``max_abs_diff`` is the largest absolute
    logit difference over all checks. With ``strict=True`` a failed check raises :class:`ExportError` and
    nothing is written; otherwise the report says ``passed=False``. ``metadata`` goes into the file's
    ``metadata_props`` (read back with ``onnxruntime``'s ``get_modelmeta().custom_metadata_map``).
    """
    path = Path(path)
    if not isinstance(example_input, Tensor) or example_input.dim() < 2 or example_input.shape[0] < 1:
        raise ExportError("example_input must be a batched tensor with at least one row")
    batch_sizes = [int(b) for b in check_batch_sizes]
    if any(b < 1 for b in batch_sizes):
        raise ExportError(f"check_batch_sizes must be positive, got {batch_sizes}")
    net = _plain_copy(model)
    example = example_input.detach().to(device="cpu", dtype=torch.float32).contiguous()
    # torch.export specialises sizes 0 and 1, so trace with at least two rows.
    trace_input = _rows(example, max(2, example.shape[0]))

    with atomic_path(path) as tmp:
        try:
            report = _export_and_check(
                net, example, trace_input, tmp, path, opset, tolerance, batch_sizes, strict, metadata or {}
            )
        finally:
            Path(str(tmp) + ".data").unlink(missing_ok=True)  # never leave an exporter side file behind
    stale = path.with_name(path.name + ".data")
    if stale.exists():
        logger.warning("removing stale external-data file %s (the new %s is self-contained)", stale, path.name)
        stale.unlink()
    logger.info("ONNX export %s: max abs diff %.3g (tolerance %.3g)", path, report.max_abs_diff, tolerance)
    return report


def _export_and_check(
    net: nn.Module,
    example: Tensor,
    trace_input: Tensor,
    tmp: Path,
    path: Path,
    opset: int,
    tolerance: float,
    batch_sizes: list[int],
    strict: bool,
    metadata: Mapping[str, str],
) -> ExportReport:
    """Export ``net`` to ``tmp``, inline external data, run the checker and the parity checks."""
    import onnx

    try:
        _export_dynamo(net, trace_input, tmp, opset)
        exporter = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back to TorchScript
        logger.warning("dynamo ONNX export failed (%s: %s); falling back to dynamo=False",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        try:
            _export_torchscript(net, trace_input, tmp, opset)
        except Exception as exc2:
            raise ExportError(f"ONNX export of {type(net).__name__} failed: {exc2}") from exc2
        exporter = "torchscript"
    logger.info("exported %s to ONNX with the %s exporter (opset %d)", type(net).__name__, exporter, opset)
    _make_self_contained(tmp)
    if metadata:
        _set_metadata(tmp, metadata)
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as exc:
        raise ExportError(f"exported ONNX model fails onnx.checker: {exc}") from exc

    session = load_onnx_session(tmp)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        for b in dict.fromkeys([example.shape[0], *batch_sizes]):
            x = _rows(example, b)
            expected = net(x).numpy()
            got = onnx_predict(session, x.numpy())
            if got.shape != expected.shape:
                raise ExportError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} at batch {b}")
            diffs[str(b)] = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    del session
    max_diff = max(diffs.values())
    passed = bool(np.isfinite(max_diff) and max_diff <= tolerance)
    report = ExportReport(
        path=str(path),
        opset=opset,
        max_abs_diff=max_diff,
        passed=passed,
        tolerance=float(tolerance),
        input_shape=list(example.shape),
        exporter=exporter,
        batch_sizes=[int(b) for b in diffs],
        diffs=diffs,
    )
    if not passed:
        msg = f"ONNX parity failed: max |logit diff| {max_diff:.3g} > tolerance {tolerance:.3g} ({diffs})"
        if strict:
            raise ExportError(msg)
        logger.warning(msg)
    return report


def load_onnx_session(path: str | os.PathLike) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider; :class:`ExportError` if the file is
    missing or not a loadable ONNX model."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"could not load ONNX model {path}: {type(exc).__name__}: {exc}") from exc


def onnx_predict(path_or_session: str | os.PathLike | Any, x: np.ndarray) -> np.ndarray:
    """Run the model on ``x`` (float32 ``(B, C, H, W)``) and return its logits as a numpy array."""
    session = (
        load_onnx_session(path_or_session) if isinstance(path_or_session, (str, os.PathLike)) else path_or_session
    )
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
    return session.run([session.get_outputs()[0].name], feed)[0]

"""Stage export_onnx: export the student to one self-contained ONNX file and check parity with onnxruntime.

    python -m tasks.export_onnx --params params.yaml
    # -> models/student.onnx, reports/export.json, reports/info/export.json

reports/export.json records ``passed`` (max |logit diff| onnxruntime vs PyTorch <= export.tolerance),
``max_abs_diff`` and, readable where ``dvc metrics show`` rounds to 5 decimals, ``max_abs_diff_e6`` (the same
difference in millionths); reports/info/export.json the exporter, opset, file path, sha256 and size. A failed
parity check is recorded, not fatal (``--strict`` makes it fatal): registration carries it as the model
version's ``onnx_parity`` tag, and promotion refuses such a model. The ONNX file carries the model's metadata
(classes, input channels and size, normalisation mean and std, model name) in its ``metadata_props``
(:func:`gkd_core.modelfile.onnx_metadata`), so ``gkd predict --model models/student.onnx`` needs nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from gkd_core import export
from gkd_core.cli_support import UserError, load_params_checked
from gkd_core.data import PreparedData
from gkd_core.modelfile import onnx_metadata
from gkd_core.runner import normalise_images
from tasks import tracking
from tasks.cli import option, stage_app
from tasks.inputs import load_model_checked, load_prepared_checked
from tasks.paths import EXPORT_REPORT, ONNX, PARAMS_FILE, PREPARED, STUDENT, StagePaths
from tasks.reports import file_sha256, write_report
from tasks.stages import STAGES

logger = logging.getLogger(__name__)
STAGE = "export_onnx"
EXAMPLE_ROWS = 8


def example_batch(data: PreparedData, rows: int = EXAMPLE_ROWS) -> torch.Tensor:
    """The first ``rows`` test images, normalised exactly as in training (float32 NCHW)."""
    return normalise_images(data.test_x[:rows], data.mean.tolist(), data.std.tolist())


def export_onnx(
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Export and parity-check the student; returns the report dict (``passed``, ``max_abs_diff``, ...)."""
    params = load_params_checked(paths.root / params_path, overrides, check_dataset=False)
    data = load_prepared_checked(paths.input(PREPARED))
    model_sha256 = file_sha256(paths.input(STUDENT))  # what this report describes
    student, meta = load_model_checked(paths.input(STUDENT), "student", "distill_student", data,
                                       params.student.model, "student.model")
    onnx_path = paths.output(ONNX)
    with tracking.stage_run(STAGE, paths.root, parent_run_id, params=params) as run:
        try:
            rep = export.export_onnx(student, onnx_path, example_batch(data), opset=params.export.opset,
                                     tolerance=params.export.tolerance, strict=strict,
                                     metadata=onnx_metadata(meta))
        except export.ExportError as err:
            raise UserError(f"ONNX export failed: {err}") from None
        result = {**rep.to_dict(), "path": ONNX, "sha256": file_sha256(onnx_path), "bytes": onnx_path.stat().st_size,
                  "model_sha256": model_sha256,
                  "max_abs_diff_e6": round(rep.max_abs_diff * 1e6, 3)}
        write_report(paths.output(EXPORT_REPORT), result)
        run.set_tags({"onnx_parity": "passed" if rep.passed else "failed"})
        tracking.log_stage_files(run, STAGES[STAGE], paths)
    log = logger.info if rep.passed else logger.warning
    log("ONNX %s: parity %s (max |diff| %.3g, tolerance %.3g, %s exporter)", onnx_path,
        "passed" if rep.passed else "FAILED", rep.max_abs_diff, rep.tolerance, rep.exporter)
    return result


app = stage_app(export_onnx, __doc__,
                option("strict", False, "fail (exit 2, nothing written) when parity fails"))

if __name__ == "__main__":
    app()

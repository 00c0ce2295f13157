"""Stage export_onnx: export the student to one self-contained ONNX file and check parity with onnxruntime.

    python -m tasks.export_onnx --params params.yaml        # -> models/student.onnx, reports/export.json

reports/export.json records ``passed`` (max |logit diff| onnxruntime vs PyTorch <= export.tolerance). A failed
parity check is recorded, not fatal (``--strict`` makes it fatal): registration carries it as the model
version's ``onnx_parity`` tag, and promotion refuses such a model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import task

from gkd_core.io import write_json
from tasks import common, tracking
from tasks.stages import EXPORT_REPORT, ONNX, PREPARED, STAGES, STUDENT

logger = logging.getLogger(__name__)
STAGE = "export_onnx"
EXAMPLE_ROWS = 8


def example_batch(data: Any, rows: int = EXAMPLE_ROWS):
    """The first ``rows`` test images, normalised exactly as in training (float32 NCHW)."""
    from gkd_core.runner import normalise_images

    return normalise_images(data.test_x[:rows], data.mean.tolist(), data.std.tolist())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(
    params_path: str | Path = "params.yaml",
    data_path: str | Path = PREPARED,
    student_path: str | Path = STUDENT,
    out: str | Path = ONNX,
    report: str | Path = EXPORT_REPORT,
    strict: bool = False,
    overrides: Optional[dict[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    root: str | Path = ".",
) -> dict[str, Any]:
    """Export and parity-check the student; returns the report dict (``passed``, ``max_abs_diff``, ...)."""
    from gkd_core.export import ExportError
    from gkd_core.export import export_onnx as run_export

    root = Path(root)
    params = common.load_checked_params(root / params_path, overrides, check_dataset=False)
    data = common.load_prepared_checked(root / data_path)
    student, _ = common.load_model_checked(root / student_path, "student model", "distill_student")
    with tracking.stage_run(STAGE, root, parent_run_id, params=params) as run:
        try:
            rep = run_export(student, root / out, example_batch(data), opset=params.export.opset,
                             tolerance=params.export.tolerance, strict=strict)
        except ExportError as err:
            raise common.StageInputError(f"ONNX export failed: {err}") from None
        result = {**rep.to_dict(), "path": str(out), "sha256": file_sha256(root / out),
                  "bytes": (root / out).stat().st_size}
        write_json(root / report, result)
        run.set_tags({"onnx_parity": "passed" if rep.passed else "failed"})
        tracking.log_stage_files(run, STAGES[STAGE], paths={EXPORT_REPORT: str(report), ONNX: str(out)})
    log = logger.info if rep.passed else logger.warning
    log("ONNX %s: parity %s (max |diff| %.3g, tolerance %.3g, %s exporter)", out,
        "passed" if rep.passed else "FAILED", rep.max_abs_diff, rep.tolerance, rep.exporter)
    return result


export_onnx_task = task(export_onnx, name=STAGE)

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", "-p", help=common.PARAMS_HELP),
    data: Path = typer.Option(Path(PREPARED), help="prepared dataset (example inputs)"),
    student: Path = typer.Option(Path(STUDENT), help="student model file"),
    out: Path = typer.Option(Path(ONNX), help="ONNX file"),
    report: Path = typer.Option(Path(EXPORT_REPORT), help="export report JSON"),
    strict: bool = typer.Option(False, help="fail (exit 2, nothing written) when parity fails"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-S", help=common.SET_HELP),
    parent_run_id: Optional[str] = typer.Option(None, envvar=tracking.PARENT_ENV, help=common.PARENT_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Export the student to ONNX and check it against PyTorch."""
    common.run_cli(lambda: export_onnx(params_path, data, student, out, report, strict,
                                       common.parse_overrides(overrides), parent_run_id), verbose)


if __name__ == "__main__":
    app()

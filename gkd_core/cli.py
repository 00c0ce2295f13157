"""`gkd`: the library on the command line, usable without the pipeline.

    gkd prepare --params params.yaml --out data/prepared.pt
    gkd train-teacher --params params.yaml --out models/teacher.pt
    gkd distill --params params.yaml --teacher models/teacher.pt --out models/student.pt [--method kd]
    gkd evaluate --model models/student.pt --data data/prepared.pt
    gkd predict --model models/student.pt photos/ more.tar.gz --out preds.csv
    gkd predict --model models/student.onnx --split test --data data/prepared.pt
    gkd schedules --params params.yaml --out reports/schedules.png

Bad input (params, dataset paths, model names) ends with one clear message and exit code 2 before any
compute; outputs are written atomically, so a failed command leaves nothing half-written. ``train-teacher``
and ``distill`` run under torchrun too (``torchrun --nproc-per-node 4 -m gkd_core.cli distill ...``): every
process trains, rank 0 writes.

This module needs no MLflow (``python -m gkd_core.cli``): ``predict`` reads local model files. The installed
``gkd`` command is tasks/gkd.py's app: these same commands, built by :func:`build_app` with a model opener
that also takes MLflow model URIs (``models:/gkd-student@champion``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from gkd_core import distributed
from gkd_core.cli_support import UserError, load_params_checked, parse_overrides, run_cli
from gkd_core.config import ConfigError, load_params
from gkd_core.data import DatasetError, PreparedData, load_prepared, prepare_dataset, save_prepared
from gkd_core.io import write_json
from gkd_core.limits import InputLimits, LimitError, using_limits
from gkd_core.methods import method_schedule, method_spec
from gkd_core.modelfile import ModelFileError, check_model, read_model
from gkd_core.plots import plot_schedules
from gkd_core.predict import ImageInputError, Predictor, open_model, run_prediction
from gkd_core.runner import distill_student, evaluate_model, save_model, train_teacher

logger = logging.getLogger("gkd")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read")
DataOpt = typer.Option(None, "--data", help="prepared dataset (.pt); prepared on the fly when omitted")
Overrides = typer.Option(None, "--set", "-S", help="override a param: -S method.gompertz.c=6.0 (repeatable)")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
                        force=True)  # stderr: stdout carries results only (predictions, evaluate's JSON)


def load_checked(params_path: Path, overrides: Optional[list[str]] = None):
    """Validate params and the dataset source (cheap checks only) or raise UserError."""
    return load_params_checked(params_path, parse_overrides(overrides))


def load_or_prepare(params, data_path: Optional[Path]) -> PreparedData:
    try:
        if data_path is not None:
            return load_prepared(data_path)
        return prepare_dataset(params.dataset, params.seed)
    except DatasetError as err:
        raise UserError(str(err)) from None


def read_checked_model(path: Path, role: str, data: PreparedData):
    """A model file read without running code and checked against ``data`` (input shape, classes, the data
    it was trained on), or UserError with one line."""
    try:
        model, meta = read_model(path)
        check_model(meta, path, role, data)
    except ModelFileError as err:
        raise UserError(str(err)) from None
    return model


def main(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    setup_logging(verbose)


def prepare(params_path: Path = ParamsOpt, out: Path = typer.Option(Path("data/prepared.pt"), "--out"),
            overrides: Optional[list[str]] = Overrides) -> None:
    """Load the configured dataset, split it and write the uint8 tensor cache."""

    def body() -> None:
        params = load_checked(params_path, overrides)
        data = load_or_prepare(params, None)
        save_prepared(data, out)
        logger.info("wrote %s: %s", out, {k: data.meta[k] for k in ("name", "sizes") if k in data.meta})

    run_cli(body)


def train_teacher_cmd(params_path: Path = ParamsOpt, data: Optional[Path] = DataOpt,
                      out: Path = typer.Option(Path("models/teacher.pt"), "--out"),
                      checkpoint: Optional[Path] = typer.Option(None, help="full-state checkpoint for resume"),
                      overrides: Optional[list[str]] = Overrides) -> None:
    """Train the teacher network with cross-entropy."""

    def body() -> None:
        params = load_checked(params_path, overrides)
        prepared = load_or_prepare(params, data)
        result = train_teacher(params, prepared, checkpoint_path=checkpoint)
        main = distributed.is_main()
        distributed.shutdown()  # under torchrun: every rank has the trained model; rank 0 writes it
        if not main:
            return
        save_model(result.model, params.teacher.model, prepared, out, extra=result.summary)
        test = evaluate_model(result.model, prepared, "test", device=params.runtime.device)
        logger.info("teacher: val %.4f, test %.4f -> %s", result.summary["final_val_accuracy"], test["accuracy"], out)

    run_cli(body)


def distill(params_path: Path = ParamsOpt, data: Optional[Path] = DataOpt,
            teacher: Path = typer.Option(Path("models/teacher.pt"), "--teacher"),
            out: Path = typer.Option(Path("models/student.pt"), "--out"),
            method: Optional[str] = typer.Option(None, help="override method.name (none, kd, gompertz, ...)"),
            checkpoint: Optional[Path] = typer.Option(None, help="full-state checkpoint for resume"),
            overrides: Optional[list[str]] = Overrides) -> None:
    """Distil the student from a trained teacher under the configured method."""

    def body() -> None:
        extra = list(overrides or []) + ([f"method.name={method}"] if method else [])
        params = load_checked(params_path, extra)
        prepared = load_or_prepare(params, data)
        teacher_model = None
        if method_spec(params.method.name).needs_teacher:
            teacher_model = read_checked_model(teacher, "teacher", prepared)
        result = distill_student(params, prepared, teacher_model, checkpoint_path=checkpoint)
        main = distributed.is_main()
        distributed.shutdown()  # under torchrun: every rank has the trained model; rank 0 writes it
        if not main:
            return
        save_model(result.model, params.student.model, prepared, out, extra=result.summary)
        test = evaluate_model(result.model, prepared, "test", device=params.runtime.device)
        logger.info("student [%s]: val %.4f, test %.4f -> %s", params.method.name,
                    result.summary["final_val_accuracy"], test["accuracy"], out)

    run_cli(body)


def evaluate(model: Path = typer.Option(..., "--model"), data: Path = typer.Option(..., "--data"),
             split: str = typer.Option("test"), teacher: Optional[Path] = typer.Option(None, "--teacher"),
             out: Optional[Path] = typer.Option(None, "--out", help="write the report as JSON")) -> None:
    """Accuracy, top-5, ECE, per-class accuracy and teacher agreement of a saved model."""

    def body() -> None:
        try:
            prepared = load_prepared(data)
        except DatasetError as err:
            raise UserError(str(err)) from None
        net = read_checked_model(model, "model", prepared)
        ref = read_checked_model(teacher, "teacher", prepared) if teacher else None
        report = evaluate_model(net, prepared, split, teacher=ref)
        if out:
            write_json(out, report)
        typer.echo(json.dumps({k: report[k] for k in ("accuracy", "top5", "ece", "agreement") if k in report}))

    run_cli(body)


def schedules(params_path: Path = ParamsOpt, out: Path = typer.Option(Path("reports/schedules.png"), "--out"),
              overrides: Optional[list[str]] = Overrides) -> None:
    """Plot every schedule with the configured parameters (PNG)."""

    def body() -> None:
        try:
            params = load_params(params_path, parse_overrides(overrides))
        except ConfigError as err:
            raise UserError(str(err)) from None
        curves = []
        for name in ("kd", "linear", "cosine", "logistic", "gompertz"):
            curves.append(method_schedule(params.method.model_copy(update={"name": name})))
        plot_schedules(curves, str(out))
        logger.info("wrote %s", out)

    run_cli(body)


ModelOpener = Callable[[str, str], Predictor]
"""``opener(model, device) -> Predictor``: what ``predict --model`` accepts."""

LOCAL_MODEL_HELP = "model to predict with: a gkd model file (.pt) or an exported ONNX file (.onnx)"


def open_local_model(model: str, device: str = "cpu") -> Predictor:
    """``predict --model`` without MLflow: a local .pt or .onnx file (a model URI is refused with the fix)."""
    if "://" in model or model.startswith(("models:/", "runs:/")):
        raise UserError(f"--model {model}: MLflow model URIs need the pipeline's `gkd` command (tasks/gkd.py, "
                        "`pip install -e '.[pipeline]'`); `python -m gkd_core.cli` reads local .pt and .onnx files")
    return open_model(model, device)


def predict_command(opener: ModelOpener = open_local_model, model_help: str = LOCAL_MODEL_HELP) -> Callable[..., None]:
    """The ``predict`` command over ``opener`` (see :func:`build_app`)."""

    def predict(
        inputs: Optional[list[Path]] = typer.Argument(
            None, help="image files, folders and tar archives (.tar, .tar.gz, .tar.xz; the image_folder dataset's "
            "reading rules)", show_default=False),
        model: str = typer.Option(..., "--model", "-m", help=model_help),
        split: Optional[str] = typer.Option(None, "--split", help="predict a split of the prepared data instead: "
                                            "train | val | test (prints its accuracy)"),
        data: Path = typer.Option(Path("data/prepared.pt"), "--data", help="prepared dataset for --split"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the predictions to a .csv or .json "
                                           "file (default: print path, label and confidence)"),
        batch_size: int = typer.Option(256, "--batch-size", min=1, help="images per batch"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto (.pt models; ONNX runs on the CPU)"),
        progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                                help="progress bar (default: when stderr is a terminal)",
                                                show_default=False),
        strict: bool = typer.Option(False, "--strict", help="stop at the first input that cannot be read "
                                    "(default: report it and go on)"),
        max_image_pixels: Optional[int] = typer.Option(
            None, "--max-image-pixels", help="refuse images larger than this many pixels (width x height, from "
            "the header, before decoding; default $GKD_MAX_IMAGE_PIXELS or 40,000,000)", show_default=False),
        max_file_bytes: Optional[int] = typer.Option(
            None, "--max-file-bytes", help="refuse image files and archive members larger than this (default "
            "$GKD_MAX_FILE_BYTES or 64 MiB)", show_default=False),
    ) -> None:
        """Label images (files, folders, tar archives) or a prepared split with a trained model.

        The model is a gkd model file, an exported ONNX file or (with the installed `gkd`) an MLflow model URI;
        its own preprocessing (channels, size, normalisation) is applied. Without --out each image's path (or
        row number), label and confidence are printed; --out writes a CSV (one p_<class> column per class) or
        JSON file with every probability."""

        def body() -> None:
            if split is not None and inputs:
                raise UserError("give image inputs or --split, not both")
            if split is None and not inputs:
                raise UserError("nothing to predict: give image files, folders or archives, or --split test")
            if out is not None and out.suffix.lower() not in (".csv", ".json"):
                raise UserError(f"--out {out}: the file must end in .csv or .json")
            try:
                chosen = InputLimits.from_env(image_pixels=max_image_pixels, file_bytes=max_file_bytes)
            except LimitError as err:
                raise UserError(str(err)) from None
            with using_limits(chosen):
                predict_with_limits()

        def predict_with_limits() -> None:
            prepared = None
            if split is not None:
                try:
                    prepared = load_prepared(data)
                except DatasetError as err:
                    raise UserError(str(err)) from None
            try:
                predictor = opener(model, device)
                result = run_prediction(predictor, [str(p) for p in inputs or []], split, prepared, out, batch_size,
                                        progress, strict=strict)
            except (ModelFileError, ImageInputError) as err:
                raise UserError(str(err)) from None
            what = f"the {split} split of {data}" if split else "image(s)"
            acc = f": accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
            where = f" -> {out}" if out is not None else ""
            # stderr, unwrapped: stdout carries the predictions themselves when there is no --out
            skipped = (f"; {len(result['unreadable'])} input(s) could not be read (listed above; --strict stops at "
                       "the first)" if result["unreadable"] else "")
            typer.echo(f"predicted {result['rows']} {what} with {predictor.source}{acc}{where}{skipped}", err=True)

        run_cli(body)

    return predict


COMMANDS: dict[str, Callable[..., None]] = {
    "prepare": prepare,
    "train-teacher": train_teacher_cmd,
    "distill": distill,
    "evaluate": evaluate,
    "schedules": schedules,
}


def build_app(opener: ModelOpener = open_local_model, model_help: str = LOCAL_MODEL_HELP) -> typer.Typer:
    """The ``gkd`` app: every command of :data:`COMMANDS` plus ``predict`` over ``opener`` (tasks/gkd.py passes
    one that also resolves MLflow model URIs)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
    app.callback()(main)
    for name, command in COMMANDS.items():
        app.command(name)(command)
    app.command("predict")(predict_command(opener, model_help))
    return app


app = build_app()

if __name__ == "__main__":
    app()

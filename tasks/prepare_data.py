"""Stage prepare_data: read the configured dataset, split it, write the uint8 tensor cache.

    python -m tasks.prepare_data --params params.yaml      # -> data/prepared.pt, reports/data.json
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import task

from gkd_core.io import write_json
from tasks import common, tracking
from tasks.stages import DATA_REPORT, PREPARED, STAGES

logger = logging.getLogger(__name__)
STAGE = "prepare_data"


def prepare_data(
    params_path: str | Path = "params.yaml",
    out: str | Path = PREPARED,
    report: str | Path = DATA_REPORT,
    overrides: Optional[dict[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    root: str | Path = ".",
) -> dict[str, Any]:
    """Validate params and the dataset source, prepare the dataset, write it and a JSON summary.

    Returns the summary (dataset, sizes, classes, content hash). Paths are relative to ``root``.
    """
    from gkd_core.data import DatasetError, prepare_dataset, save_prepared

    root = Path(root)
    params = common.load_checked_params(root / params_path, overrides)
    with tracking.stage_run(STAGE, root, parent_run_id, params=params) as run:
        try:
            data = prepare_dataset(params.dataset, params.seed)
        except DatasetError as err:
            raise common.StageInputError(str(err)) from None
        summary = {
            "dataset": params.dataset.name,
            "source": data.meta.get("source"),
            "hash": data.meta.get("sha256"),
            "sizes": data.meta.get("sizes"),
            "classes": list(data.classes),
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "image_size": data.image_size,
            "mean": data.meta.get("mean"),
            "std": data.meta.get("std"),
            "seed": params.seed,
        }
        save_prepared(data, root / out)
        write_json(root / report, summary)
        run.set_tags({"data_hash": summary["hash"]})
        tracking.log_stage_files(run, STAGES[STAGE], paths={DATA_REPORT: str(report)})
    logger.info("prepared %s -> %s (sha256 %s)", data, out, str(summary["hash"])[:12])
    return summary


prepare_data_task = task(prepare_data, name=STAGE, retries=2, retry_delay_seconds=10)

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", "-p", help=common.PARAMS_HELP),
    out: Path = typer.Option(Path(PREPARED), help="prepared dataset file"),
    report: Path = typer.Option(Path(DATA_REPORT), help="dataset summary JSON"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-S", help=common.SET_HELP),
    parent_run_id: Optional[str] = typer.Option(None, envvar=tracking.PARENT_ENV, help=common.PARENT_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Prepare the dataset (validated params first; bad input ends with one message, exit code 2)."""
    common.run_cli(lambda: prepare_data(params_path, out, report, common.parse_overrides(overrides), parent_run_id),
                   verbose)


if __name__ == "__main__":
    app()

"""Stage prepare_data: read the configured dataset, split it, write the uint8 tensor cache.

    python -m tasks.prepare_data --params params.yaml      # -> data/prepared.pt, reports/data.json
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from gkd_core.cli_support import UserError, load_params_checked
from gkd_core.data import DatasetError, prepare_dataset, save_prepared
from gkd_core.io import write_json
from tasks import tracking
from tasks.cli import stage_app
from tasks.paths import DATA_REPORT, PARAMS_FILE, PREPARED, StagePaths
from tasks.stages import STAGES

logger = logging.getLogger(__name__)
STAGE = "prepare_data"


def prepare_data(
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Validate params and the dataset source, prepare the dataset, write it and a JSON summary.

    Returns the summary (dataset, sizes, classes, content hash).
    """
    params = load_params_checked(paths.root / params_path, overrides)
    with tracking.stage_run(STAGE, paths.root, parent_run_id, params=params) as run:
        try:
            data = prepare_dataset(params.dataset, params.seed)
        except DatasetError as err:
            raise UserError(str(err)) from None
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
        save_prepared(data, paths.output(PREPARED))
        write_json(paths.output(DATA_REPORT), summary)
        run.set_tags({"data_hash": summary["hash"]})
        tracking.log_stage_files(run, STAGES[STAGE], paths)
    logger.info("prepared %s -> %s (sha256 %s)", data, paths.output(PREPARED), str(summary["hash"])[:12])
    return summary


app = stage_app(prepare_data, __doc__)

if __name__ == "__main__":
    app()

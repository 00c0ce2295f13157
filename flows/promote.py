"""Promotion as a Prefect flow: compare ``challenger`` with ``champion`` and move ``champion`` when better.

    python -m flows.promote                     # rule from params.yaml's promote section

The rule and how decisions are recorded: tasks/promote.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import flow, get_run_logger

from flows import cli as flow_cli
from flows.prefect_tasks import promote_task
from gkd_core.cli_support import load_params_checked, run_cli
from tasks import handoff
from tasks.cli import configure_logging
from tasks.paths import PARAMS_FILE, StagePaths
from tasks.promote import REFUSED_EXIT_CODE

logger = logging.getLogger(__name__)


@flow(name="gkd-promote")
def promote(project_dir: Optional[str] = None) -> dict[str, Any]:
    """Run the promotion rule once; returns the decision record (``decision``: promoted | refused | unchanged)."""
    root = handoff.project_dir(project_dir)
    load_params_checked(root / PARAMS_FILE, check_dataset=False)  # fail fast on bad params
    record = promote_task(StagePaths(root))
    get_run_logger().info("promotion %s: %s", record["decision"], record["reason"])
    return record


def main(project_dir: Path = Path("."), fail_on_refuse: bool = False) -> None:
    """Run the promotion flow; exit code 2 on bad params, 3 on a refusal when --fail-on-refuse."""
    flow_cli.install()
    configure_logging()
    run_cli(lambda: load_params_checked(project_dir.resolve() / PARAMS_FILE, check_dataset=False),
            report=logger.error)
    record = flow_cli.run_flow(lambda: promote(str(project_dir)), "promote")
    logger.info("decision: %s (champion now: version %s)", record["decision"], record["champion_after"])
    if fail_on_refuse and record["decision"] == "refused":
        raise typer.Exit(REFUSED_EXIT_CODE)


if __name__ == "__main__":
    typer.run(main)

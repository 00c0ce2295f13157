"""Promotion as a Prefect flow: compare ``challenger`` with ``champion`` and move ``champion`` when better.

    python -m flows.promote                     # rule from params.yaml's promote section

The rule and how decisions are recorded: tasks/promote.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE

from tasks import common
from tasks.promote import promote_task

logger = logging.getLogger(__name__)


@flow(name="gkd-promote")
def promote(project_dir: str = ".") -> dict[str, Any]:
    """Run the promotion rule once; returns the decision record (``decision``: promoted | refused | unchanged)."""
    root = Path(project_dir).resolve()
    common.load_checked_params(root / "params.yaml", check_dataset=False)  # fail fast on bad params
    record = promote_task.with_options(cache_policy=NO_CACHE)("params.yaml", root=str(root))
    get_run_logger().info("promotion %s: %s", record["decision"], record["reason"])
    return record


def main(project_dir: Path = Path("."), fail_on_refuse: bool = False) -> None:
    """Run the promotion flow; exit code 2 on bad params, 3 on a refusal when --fail-on-refuse."""
    import typer

    common.configure_logging()
    try:
        common.load_checked_params(project_dir.resolve() / "params.yaml", check_dataset=False)
    except common.StageInputError as err:
        logger.error("%s", err)
        raise typer.Exit(2) from None
    record = promote(str(project_dir))
    logger.info("decision: %s (champion now: version %s)", record["decision"], record["champion_after"])
    if fail_on_refuse and record["decision"] == "refused":
        raise typer.Exit(3)


if __name__ == "__main__":
    import typer

    typer.run(main)

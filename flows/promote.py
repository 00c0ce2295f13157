"""Promotion as a Prefect flow: compare ``challenger`` with ``champion`` and move ``champion`` when better.

    python -m flows.promote                     # rule from params.yaml's promote section

The rule and how decisions are recorded: tasks/promote.py. The deployment (``gkd-promote/daily``) runs the
flow. On the command line a flow run is only worth it where a Prefect server keeps it: with no server
configured (``PREFECT_API_URL`` unset, in the environment and the Prefect profile) ``python -m flows.promote``
calls tasks.promote directly, the same decision and records, without starting a temporary Prefect server
(seconds instead of the server's start-up); ``--flow`` forces the flow run.

A flow run promotes while holding the one slot of the Prefect global concurrency limit ``gkd-promotion``
(flows/prefect_tasks.py): two promotions at once (the nightly pipeline's and ``gkd-promote/daily``, or two
people's) take turns, so the registry ends as after one then the other. The direct path takes no slot: it is
for a project without a Prefect server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import flow, get_run_logger
from prefect.runtime import deployment

from flows import cli as flow_cli
from gkd_core.cli_support import UserError, load_params_checked, run_cli
from tasks import promote as promote_rule
from tasks import flow_inputs
from tasks.cli import configure_logging
from tasks.paths import PARAMS_FILE, StagePaths
from tasks.promote import REFUSED_EXIT_CODE

logger = logging.getLogger(__name__)


@flow(name="gkd-promote", timeout_seconds=flow_inputs.flow_timeout("promote"))
def promote(project_dir: Optional[str] = None, version: Optional[str] = None) -> dict[str, Any]:
    """Run the promotion rule once for model version ``version`` (default: the ``challenger`` alias), holding
    the one promotion slot; returns the decision record (``decision``: promoted | refused | unchanged)."""
    # imported here: flows.prefect_tasks loads every task module (registration, sweep: onnx, pandas, scipy),
    # seconds that the command line's direct path (no flow run) does not need
    from flows.prefect_tasks import promote_task

    if version is not None and not (isinstance(version, str) and version.isdigit() and len(version) <= 12):
        raise UserError(f"version={str(version)[:60]!r}: expected a model version number")
    root = flow_inputs.project_dir(project_dir, from_deployment=deployment.id is not None)
    load_params_checked(root / PARAMS_FILE, check_dataset=False)  # fail fast on bad params
    record = promote_task(StagePaths(root), version=version)
    get_run_logger().info("promotion %s: %s", record["decision"], record["reason"])
    return record


def prefect_server_configured() -> bool:
    """Whether a Prefect API is configured (``PREFECT_API_URL`` in the environment or the active profile):
    then a flow run is kept there; without one, Prefect would start a temporary server just for it."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def main(project_dir: Path = Path("."), fail_on_refuse: bool = False,
         flow: Optional[bool] = typer.Option(None, "--flow/--no-flow", show_default=False,
                                             help="run as a Prefect flow (default: only when PREFECT_API_URL is "
                                                  "set); only a flow run waits for the one promotion slot"),
         version: Optional[str] = typer.Option(None, "--model-version", help="the model version to promote "
                                                "(default: the one the challenger alias points to)"),
         ) -> None:
    """Run the promotion rule; exit code 2 on bad params, 3 on a refusal when --fail-on-refuse."""
    flow_cli.install()
    configure_logging()
    root = project_dir.resolve()
    run_cli(lambda: load_params_checked(root / PARAMS_FILE, check_dataset=False), report=logger.error)
    as_flow = prefect_server_configured() if flow is None else flow
    if as_flow:
        record = flow_cli.run_flow(lambda: promote(str(project_dir), version), "promote")
    else:
        logger.info("no Prefect server configured (PREFECT_API_URL unset): promotion runs directly, no flow run "
                    "(--flow starts one on a temporary server)")
        record = flow_cli.run_flow(lambda: promote_rule.promote(StagePaths(root), version=version), "promote")
    logger.info("decision: %s (champion now: version %s)", record["decision"], record["champion_after"])
    if fail_on_refuse and record["decision"] == "refused":
        raise typer.Exit(REFUSED_EXIT_CODE)


if __name__ == "__main__":
    typer.run(main)

"""Flow parameters checked at the start of every flow: anyone who reaches the Prefect API can create a flow
run of a deployment with any parameters, so they are hostile until checked (issue 23).

* names that become folders or run names (a sweep's name, an arm, a preset): ``[A-Za-z0-9][A-Za-z0-9_.-]*``,
  at most 100 characters, so never ``..``, ``/`` or an option;
* a commit: a full 40-hex id (tasks/handoff.py:check_commit), never a ref that could move or read as an option;
* an MLflow parent run id: 32 hex digits;
* a stage: one of dvc.yaml's;
* ``project_dir`` of a run created through a deployment: inside the worker's project (``$GKD_PROJECT_DIR``,
  else its working directory), so the API cannot point a worker at another folder of the machine. A flow
  called in-process (``python -m flows...``) is the caller's own: any folder.

Each check raises :class:`gkd_core.cli_support.UserError` naming the parameter and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from gkd_core.cli_support import UserError, load_params_checked
from gkd_core.sections import TimeoutsConfig
from tasks import handoff
from tasks.paths import PARAMS_FILE

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
RUN_ID_RE = re.compile(r"[0-9a-f]{32}")


def _shown(value: Any) -> str:
    return repr(str(value)[:60]) if isinstance(value, str) else repr(value)


def name(value: Any, field: str) -> str:
    """``value`` when it is a safe name (see the module docstring)."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise UserError(f"{field}={_shown(value)}: expected a name of letters, digits, '_', '.' and '-' that "
                        "starts with a letter or digit (at most 100 characters)")
    return value


def names(values: Optional[Iterable[Any]], field: str) -> list[str]:
    return [name(v, field) for v in (values or [])]


def run_id(value: Any, field: str = "parent_run_id") -> Optional[str]:
    """``value`` when it is None or an MLflow run id."""
    if value is not None and (not isinstance(value, str) or not RUN_ID_RE.fullmatch(value)):
        raise UserError(f"{field}={_shown(value)}: expected an MLflow run id (32 lowercase hex digits)")
    return value


def commit(value: Any, field: str = "git_commit") -> Optional[str]:
    return None if value is None else handoff.check_commit(value, field)


def one_of(value: Any, allowed: Iterable[str], field: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise UserError(f"{field}={_shown(value)}: expected one of {', '.join(allowed)}")
    return value


def project_dir(given: Optional[str], from_deployment: bool) -> Path:
    """The project folder of this flow run (``handoff.project_dir``); for a run created through a deployment,
    refused unless it lies inside the worker's own project."""
    root = handoff.project_dir(given)
    if given is None or not from_deployment:
        return root
    allowed = Path(os.environ.get(handoff.PROJECT_DIR_ENV) or os.getcwd()).resolve()
    if root != allowed and allowed not in root.parents:
        raise UserError(f"project_dir={_shown(given)}: a run created through a deployment must stay inside this "
                        f"worker's project {allowed} (${handoff.PROJECT_DIR_ENV} or its working directory)")
    return root


def flow_timeout(name: str) -> int:
    """``timeouts.<name>`` of the params.yaml of this process's project (``$GKD_PROJECT_DIR``, else the current
    folder: where a worker runs its flows), read when the flow module is imported, since Prefect takes a flow's
    ``timeout_seconds`` from the flow object; the section's default when that file is missing or invalid (the
    flow then refuses the file itself, with the reason)."""
    path = handoff.project_dir(None) / PARAMS_FILE
    try:
        return int(getattr(load_params_checked(path, check_dataset=False).timeouts, name))
    except UserError:
        return int(TimeoutsConfig.model_fields[name].default)

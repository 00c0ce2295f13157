"""Promotion: compare the ``challenger`` with the ``champion`` and move the ``champion`` alias when it is better.

    python -m tasks.promote --params params.yaml        # decision in reports/promote.{json,md} and MLflow

Rules (params ``promote.*``):

* a challenger whose ONNX parity did not pass, or whose run lacks the metric, is refused;
* so is one below a floor (the first champion too): test accuracy under ``min_accuracy``, not above chance
  (1 / classes) by ``min_above_chance``, or more than ``max_below_teacher`` under the teacher's;
* a challenger is compared only with a champion evaluated on the same data: the same prepared-data hash and
  the same classes (version tags ``data_sha256``, ``classes_sha256``, written at registration); otherwise, or
  when either version does not record them, it is refused with that reason (keep one registered model per
  dataset: ``mlflow.registered_model_name``);
* with no champion yet, a challenger that passes those checks becomes champion;
* otherwise it is promoted when ``improvement > 0`` and ``improvement >= min_improvement``, where
  ``improvement = challenger - champion`` (or the reverse when lower is better); a champion without the
  metric is replaced by any challenger that passes the checks;
* a challenger that already is the champion leaves everything unchanged;
* before it becomes champion its model file is downloaded and loaded once (tasks.registry): a version whose
  file cannot be read is refused.

Registry errors are never read as "no champion": only MLflow's "no such registered model" or "alias not
found" means absent; a timeout, a 5xx, a 403 or a deleted run ends the promotion with :class:`PromotionError`
naming the call and its cause, and nothing is moved. The pipeline promotes the version it registered
(``version``), not whatever ``challenger`` points to by then.

Each decision is recorded on the challenger's model version (tags ``promote.*``), as an MLflow run named
``promote`` (tags + the report files) and as reports/promote.json and reports/promote.md.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import typer
from mlflow.exceptions import MlflowException

from gkd_core.checkpoints import hold_until_removed
from gkd_core.cli_support import load_params_checked
from gkd_core.io import atomic_write, write_json
from tasks import tracking
from tasks.cli import option, stage_app
from tasks.paths import PARAMS_FILE, PROMOTE_JSON, PROMOTE_MD, StagePaths
from tasks.registry import CLASSES_TAG, DATA_TAG

logger = logging.getLogger(__name__)
CHALLENGER = "challenger"
CHAMPION = "champion"
HOLD_ENV = "GKD_TEST_HOLD_BEFORE_ALIAS"  # tests: "<file>" holds each promotion there until <file> is removed
REFUSED_EXIT_CODE = 3  # --fail-on-refuse


class PromotionError(RuntimeError):
    """The registry could not be read or written as promotion needs: nothing was decided or moved. One line.
    ``retryable``: whether trying again may help (a timeout, a 5xx), not for a deleted run or a 403."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


_FINAL_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def _retryable(err: Exception) -> bool:
    return getattr(err, "error_code", None) not in _FINAL_CODES


def _cause(err: Exception) -> str:
    code = getattr(err, "error_code", None)
    text = (getattr(err, "message", None) or str(err)).strip().splitlines()
    return f"{code + ': ' if code else ''}{text[0][:300] if text else type(err).__name__}"


def alias_absent(err: MlflowException) -> bool:
    """Whether ``err`` (from ``get_model_version_by_alias``) says the alias or the registered model does not
    exist, which is all that may be read as "absent"."""
    if err.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return err.error_code == "INVALID_PARAMETER_VALUE" and re.search(r"alias \S+ not found", err.message) is not None


def _version_by_alias(client: Any, name: str, alias: str) -> Optional[Any]:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if alias_absent(err):
            return None
        raise PromotionError(f"reading alias {alias!r} of {name!r} failed ({_cause(err)}): nothing was "
                             "promoted", _retryable(err)) from None
    except Exception as err:  # noqa: BLE001 - connection errors, timeouts: not "absent" either
        raise PromotionError(f"reading alias {alias!r} of {name!r} failed ({type(err).__name__}: {err}): "
                             "nothing was promoted") from None


def describe_version(client: Any, mv: Any, metric: str) -> dict[str, Any]:
    """What promotion needs to know about a model version: its metric (from its run), parity, and the data
    and classes it was evaluated on. A run that cannot be read raises :class:`PromotionError`."""
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
        except Exception as err:  # noqa: BLE001 - a deleted run, a timeout, a 403: never "no metrics"
            raise PromotionError(f"reading the run {mv.run_id} of version {mv.version} failed ({_cause(err)}): "
                                 "nothing was promoted", _retryable(err)) from None
        if run.info.lifecycle_stage == "deleted":
            raise PromotionError(f"the run {mv.run_id} of version {mv.version} was deleted: its metrics cannot "
                                 "be trusted; nothing was promoted", retryable=False)
        metrics = dict(run.data.metrics)

    def finite(key: str) -> Optional[float]:
        v = metrics.get(key)
        return float(v) if v is not None and math.isfinite(v) else None

    return {"version": str(mv.version), "run_id": mv.run_id, "value": finite(metric),
            "accuracy": finite("test_accuracy"), "teacher_accuracy": finite("teacher_test_accuracy"),
            "num_classes": finite("num_classes"),
            "onnx_parity": mv.tags.get("onnx_parity", "unknown"), "method": mv.tags.get("method"),
            "data_sha256": mv.tags.get(DATA_TAG) or None, "classes_sha256": mv.tags.get(CLASSES_TAG) or None}


def not_comparable(challenger: dict[str, Any], champion: dict[str, Any]) -> Optional[str]:
    """Why two versions' scores may not be compared (None: same data and classes). Pure."""
    for key, what in (("data_sha256", "prepared data"), ("classes_sha256", "classes")):
        a, b = challenger.get(key), champion.get(key)
        if a is None or b is None:
            missing = challenger["version"] if a is None else champion["version"]
            return (f"version {missing} does not record its {what} ({key}; registered before this check): its "
                    "score cannot be compared; set the champion alias by hand if you mean it")
        if a != b:
            return (f"version {challenger['version']} was evaluated on other {what} ({a[:12]}) than champion "
                    f"version {champion['version']} ({b[:12]}): scores on different test data are not comparable; "
                    "keep one registered model per dataset (mlflow.registered_model_name)")
    return None


def floor_violation(candidate: dict[str, Any], cfg: Any) -> Optional[str]:
    """Why ``candidate`` may not become champion whatever the comparison says (None: it clears every floor).
    Pure. The floors are on test accuracy: above ``min_accuracy``, clearly above chance, near the teacher."""
    acc, version = candidate.get("accuracy"), candidate["version"]
    if acc is None:
        return f"test_accuracy is missing on version {version}'s run (the floors cannot be checked)"
    if acc < cfg.min_accuracy:
        return f"test accuracy {acc:.4f} of version {version} is below promote.min_accuracy {cfg.min_accuracy:g}"
    classes = candidate.get("num_classes")
    if not classes:
        return f"num_classes is missing on version {version}'s run (the chance floor cannot be checked)"
    chance = 1.0 / classes
    if acc < chance + cfg.min_above_chance:
        return (f"test accuracy {acc:.4f} of version {version} is not clearly above chance ({chance:.4f} for "
                f"{int(classes)} classes; promote.min_above_chance {cfg.min_above_chance:g})")
    teacher = candidate.get("teacher_accuracy")
    if cfg.max_below_teacher is not None and teacher is not None and acc < teacher - cfg.max_below_teacher:
        return (f"test accuracy {acc:.4f} of version {version} trails its teacher's {teacher:.4f} by more than "
                f"promote.max_below_teacher {cfg.max_below_teacher:g}")
    return None


def decide(challenger: Optional[dict[str, Any]], champion: Optional[dict[str, Any]], cfg: Any
           ) -> tuple[str, str, Optional[float]]:
    """``(decision, reason, improvement)`` with decision ``promoted`` | ``refused`` | ``unchanged``, under the
    rule of ``cfg`` (params' ``promote`` section). Pure."""
    metric, higher_is_better, min_improvement = cfg.metric, cfg.higher_is_better, cfg.min_improvement
    if challenger is None:
        return "refused", f"no model version has alias {CHALLENGER!r}", None
    if challenger["onnx_parity"] != "passed":
        return "refused", f"ONNX parity {challenger['onnx_parity']} for version {challenger['version']}", None
    if challenger["value"] is None:
        return "refused", f"metric {metric!r} is missing on version {challenger['version']}'s run", None
    floor = floor_violation(challenger, cfg)
    if floor is not None and (champion is None or champion["version"] != challenger["version"]):
        return "refused", floor, None
    if champion is None:
        return "promoted", f"no champion yet; version {challenger['version']} passes the checks", None
    if champion["version"] == challenger["version"]:
        return "unchanged", f"version {challenger['version']} already is the champion", 0.0
    unlike = not_comparable(challenger, champion)
    if unlike is not None:
        return "refused", unlike, None
    if champion["value"] is None:
        return "promoted", f"champion version {champion['version']} has no {metric!r}", None
    diff = challenger["value"] - champion["value"]
    improvement = diff if higher_is_better else -diff
    verdict = (f"{metric} {challenger['value']:.6g} vs champion {champion['value']:.6g} "
               f"(version {champion['version']}): improvement {improvement:+.6g}, required > 0 and >= {min_improvement:g}")
    if improvement > 0 and improvement >= min_improvement:
        return "promoted", verdict, improvement
    return "refused", verdict, improvement


def _unloadable(name: str, version: str, root: Path) -> Optional[str]:
    """Why version ``version``'s model file cannot be used (None: downloaded and read once, no code run)."""
    from gkd_core.modelfile import ModelFileError, read_model
    from tasks.registry import downloaded_model_file

    try:
        with downloaded_model_file(f"models:/{name}/{version}", root=root) as path:
            read_model(path)
    except ModelFileError as err:
        return f"the model file of version {version} cannot be loaded: {err}"
    except (MlflowException, OSError) as err:
        raise PromotionError(f"downloading version {version}'s model file failed ({_cause(err)}): nothing was "
                             "promoted", _retryable(err)) from None
    return None


def _markdown(record: dict[str, Any]) -> str:
    ch, cp = record["challenger"] or {}, record["champion_before"] or {}

    def cell(d: dict[str, Any], key: str) -> str:
        v = d.get(key)
        return "-" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))

    return "\n".join([
        f"# Promotion decision: **{record['decision']}**",
        "",
        f"- model: `{record['model']}`",
        f"- when: {record['at']}",
        f"- rule: `{record['metric']}` {'higher' if record['higher_is_better'] else 'lower'} is better, "
        f"min improvement {record['min_improvement']:g}",
        f"- reason: {record['reason']}",
        "",
        "| | version | method | " + record["metric"] + " | ONNX parity |",
        "|---|---|---|---|---|",
        f"| challenger | {cell(ch, 'version')} | {cell(ch, 'method')} | {cell(ch, 'value')} | {cell(ch, 'onnx_parity')} |",
        f"| champion (before) | {cell(cp, 'version')} | {cell(cp, 'method')} | {cell(cp, 'value')} | "
        f"{cell(cp, 'onnx_parity')} |",
        "",
        f"Champion after: version {record['champion_after'] or '-'}.",
        "",
    ])


def promote(
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    challenger_alias: str = CHALLENGER,
    champion_alias: str = CHAMPION,
    version: Optional[str] = None,
) -> dict[str, Any]:
    """Decide, move the alias when promoted, record the decision everywhere; returns the record.

    The challenger is model version ``version`` when given (the pipeline passes the one it registered), else
    the one ``challenger_alias`` points to. The decision run is a top-level run of ``params.mlflow.experiment``,
    or nested under ``parent_run_id``. Raises :class:`PromotionError` when the registry cannot be read.
    """
    root = paths.root
    params = load_params_checked(root / params_path, overrides, check_dataset=False)
    cfg, name = params.promote, params.mlflow.registered_model_name
    client = tracking.get_client(root)
    if version is not None:
        if not str(version).isdigit():
            raise PromotionError(f"version {version!r}: expected a model version number", retryable=False)
        try:
            mv_challenger = client.get_model_version(name, str(version))
        except Exception as err:  # noqa: BLE001
            raise PromotionError(f"reading version {version} of {name!r} failed ({_cause(err)})",
                                 _retryable(err)) from None
    else:
        mv_challenger = _version_by_alias(client, name, challenger_alias)
    mv_champion = _version_by_alias(client, name, champion_alias)
    challenger = describe_version(client, mv_challenger, cfg.metric) if mv_challenger else None
    champion = describe_version(client, mv_champion, cfg.metric) if mv_champion else None
    decision, reason, improvement = decide(challenger, champion, cfg)
    if decision == "promoted":
        unreadable = _unloadable(name, challenger["version"], root)
        if unreadable is not None:
            decision, reason, improvement = "refused", unreadable, improvement
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    champion_after = champion["version"] if champion else None
    if os.environ.get(HOLD_ENV):  # tests: a window between the decision and the alias move, to race into
        hold_until_removed(Path(os.environ[HOLD_ENV]), "between the promotion decision and the alias move")
    if decision == "promoted":
        client.set_registered_model_alias(name, champion_alias, challenger["version"])
        champion_after = challenger["version"]
        client.set_model_version_tag(name, challenger["version"], "champion_since", now)
        if champion is not None:
            client.set_model_version_tag(name, champion["version"], "replaced_by", challenger["version"])
    record = {
        "decision": decision, "reason": reason, "model": name, "metric": cfg.metric,
        "higher_is_better": cfg.higher_is_better, "min_improvement": cfg.min_improvement,
        "improvement": improvement, "challenger": challenger, "champion_before": champion,
        "champion_after": champion_after, "at": now,
    }
    if challenger is not None:
        for key, value in (("decision", decision), ("reason", reason[:5000]), ("at", now),
                           ("compared_with", champion["version"] if champion else "none")):
            client.set_model_version_tag(name, challenger["version"], f"promote.{key}", value)
    write_json(paths.output(PROMOTE_JSON), record)
    with atomic_write(paths.output(PROMOTE_MD)) as fh:
        fh.write(_markdown(record))
    parent_run_id = tracking.parent_from_env(parent_run_id)
    experiment_id = tracking.experiment_for(client, params.mlflow.experiment, root, parent_run_id)
    run = tracking.StageRun(client, tracking.create_run(client, experiment_id, "promote", {
        **tracking.base_tags(root), "gkd.stage": "promote", "promote.decision": decision,
        "promote.challenger": challenger["version"] if challenger else "none",
        "promote.champion_before": champion["version"] if champion else "none",
        "promote.champion_after": champion_after or "none"}, parent_run_id), root)
    run.log_params({"metric": cfg.metric, "higher_is_better": cfg.higher_is_better,
                    "min_improvement": cfg.min_improvement, "model": name})
    run.log_metrics({k: v for k, v in (("challenger_value", (challenger or {}).get("value")),
                                       ("champion_value", (champion or {}).get("value")),
                                       ("improvement", improvement),
                                       ("promoted", 1.0 if decision == "promoted" else 0.0)) if v is not None})
    run.log_file(PROMOTE_JSON, paths.out_dir)
    run.log_file(PROMOTE_MD, paths.out_dir)
    client.set_terminated(run.run_id, "FINISHED")
    record["decision_run_id"] = run.run_id
    log = logger.info if decision != "refused" else logger.warning
    log("promotion %s: %s", decision, reason)
    return record


def promote_cli(paths: StagePaths, fail_on_refuse: bool = False, **options: Any) -> dict[str, Any]:
    """:func:`promote`, then exit code 3 for a refusal when ``fail_on_refuse``."""
    record = promote(paths, **options)
    if fail_on_refuse and record["decision"] == "refused":
        raise typer.Exit(REFUSED_EXIT_CODE)
    return record


app = stage_app(promote_cli, __doc__,
                option("fail_on_refuse", False, "exit with code 3 when the challenger is refused"))

if __name__ == "__main__":
    app()

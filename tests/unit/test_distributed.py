"""Several processes on CPU: 2 torchrun workers (gloo) against one process, sharding, failures, the stage
launcher. Each multi-process run is one torchrun launch with a bounded timeout (tests/unit/ddp_worker.py);
the references run in this process.

Tolerances (measured, docs/performance.md "Multi-process (DDP)"): without BatchNorm every step of 2 x B/2 is
the step of 1 x B up to float32 round-off (summation order; the workers run one OpenMP thread each, this
process two), so histories and weights agree to ~1e-6. With BatchNorm each process normalises over its own
B/2 images (no SyncBatchNorm on CPU: torch has no CPU kernels for it), which changes the function being
trained: after two epochs the losses differ by up to 0.4 % and the validation accuracy by 2 images of 144.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddp_worker import NoBatchNorm, fixed_teacher, plain_history, tiny_params, weights
from gkd_core import runner
from gkd_core.config import ConfigError
from gkd_core.data import DeviceLoader, TorchLoader, make_loaders, prepare_dataset, save_prepared
from gkd_core.distributed import Shard
from tasks import launch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _torchrun(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), *args]
    return subprocess.run(cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _history_gap(a: list[dict], b: list[dict]) -> float:
    """The largest gap between two histories, relative to max(1, |value|): relative for the losses (2-3),
    absolute for accuracies and small terms (a KD term of 4e-4 that moves by 3e-8 is round-off)."""
    assert [set(r) for r in a] == [set(r) for r in b]
    return max(abs(x[k] - y[k]) / max(1.0, abs(x[k])) for x, y in zip(a, b) for k in x)


def _weight_gap(a: dict, b: dict) -> float:
    return max(max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a)


@pytest.fixture(scope="module")
def setup():
    params = tiny_params()
    return params, prepare_dataset(params.dataset, seed=params.seed)


@pytest.fixture(scope="module")
def one_process(setup):
    params, data = setup
    with NoBatchNorm():
        teacher = runner.train_teacher(params, data)
        student = runner.distill_student(params, data, fixed_teacher())
    student_bn = runner.distill_student(params, data, fixed_teacher(bn=True))
    return {"teacher": plain_history(teacher.history), "student": plain_history(student.history),
            "student_weights": weights(student.model), "student_bn": plain_history(student_bn.history)}


@pytest.fixture(scope="module")
def two_processes(setup, tmp_path_factory):
    """One torchrun launch of the ``train`` scenario; a one-process checkpoint after epoch 1 is handed to it."""
    params, data = setup
    out = tmp_path_factory.mktemp("ddp")
    with NoBatchNorm():
        runner.distill_student(params, data, fixed_teacher(), checkpoint_path=out / "single-epoch1.ckpt",
                               stop_after_epochs=1)
    t0 = time.perf_counter()
    proc = _torchrun("train", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads((out / "results.json").read_text())["ranks"]
    return {"out": out, "ranks": ranks, "main": ranks[0], "seconds": time.perf_counter() - t0}


# --- sharding (in this process: every rank's loader built side by side) --------------------------------


@pytest.mark.parametrize("n,batch,world,drop_last", [
    (64, 16, 2, True), (70, 16, 2, True), (70, 16, 4, True), (70, 16, 2, False), (70, 12, 4, False),
    (10, 16, 4, False), (9, 8, 2, False),
])
def test_shards_split_each_global_batch_without_overlap_or_loss(n, batch, world, drop_last):
    steps = n // batch if drop_last else -(-n // batch)
    shards = [Shard(r, world) for r in range(world)]
    pos = [s.positions(n, batch, drop_last) for s in shards]
    b = batch // world
    assert {s.num_batches(n, batch, drop_last) for s in shards} == {steps}
    for i in range(steps):
        rank_batches = [p[i * b:(i + 1) * b] for p in pos]
        assert len({len(rb) for rb in rank_batches}) == 1  # equal batches: DDP averages equal shares
        merged = torch.stack(rank_batches, 1).flatten()  # rank r holds every world-th position from r on
        lo, hi = i * batch, min((i + 1) * batch, n)
        assert torch.equal(merged[:hi - lo], torch.arange(lo, hi))  # the global batch of one process, in order
        assert len(merged) - (hi - lo) < world  # padding (a last partial batch) only up to a multiple of world
    covered = torch.cat(pos)
    expected = (n // batch) * batch if drop_last else n
    assert set(covered.tolist()) == set(range(expected))
    if drop_last or n % world == 0 and (n % batch) % world == 0:
        assert len(covered) == expected  # nothing twice


def test_evaluation_shards_partition_the_split():
    pos = [Shard(r, 3, pad=False).positions(10, 4, False) for r in range(3)]
    assert sorted(torch.cat(pos).tolist()) == list(range(10))
    assert [Shard(r, 3, pad=False).num_batches(10, 4, False) for r in range(3)] == [1, 1, 1]
    assert Shard(2, 3, pad=False).num_batches(2, 4, False) == 0  # more ranks than images: an empty share


def test_a_batch_the_processes_cannot_share_equally_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the 3 processes"):
        Shard(0, 3).batch(32)
    with pytest.raises(ConfigError, match="student.train.batch_size = 30 is not a multiple of runtime.nproc = 4"):
        tiny_params(batch=30, nproc=4)
    tiny_params(batch=32, nproc=4)


@pytest.mark.parametrize("cls", [DeviceLoader, TorchLoader])
def test_sharded_loaders_yield_the_strided_share_of_the_single_process_batches(cls):
    """Same plan (order, flips, crops) on every rank: rank r's batch i is single-process batch i [r::W], pixels
    and labels included, for both loader paths."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (70, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(70) % 10
    common = dict(batch_size=16, shuffle=True, augment=True, crop_padding=2, hflip=True, drop_last=True, seed=3,
                  with_index=True)
    single = list(cls(x, y, torch.zeros(1), torch.ones(1), **common))
    ranks = [list(cls(x, y, torch.zeros(1), torch.ones(1), shard=Shard(r, 2), **common)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for i, batch in enumerate(single):
        for r in range(2):
            for a, b in zip(batch, ranks[r][i]):
                assert torch.equal(a[r::2], b)


# --- two processes against one --------------------------------------------------------------------------


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_two_processes_cover_every_training_image_once_per_epoch(setup, two_processes):
    params, data = setup
    train, _, _ = make_loaders(data, params.student.train, "device", "cpu", seed=params.seed, with_index=True)
    ranks = two_processes["ranks"]
    for epoch, single in enumerate([int(i) for _x, _y, idx in train for i in idx] for _ in range(2)):
        seen = [i for r in ranks for i in r["indices"][epoch]]
        assert len(seen) == len(set(seen)) == len(single)  # no image twice, none lost
        assert set(seen) == set(single)  # exactly the images one process sees (n mod B left out, as there)
    n, b = len(data.train_y), params.student.train.batch_size
    assert len(seen) == (n // b) * b


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_two_processes_train_as_one_without_batchnorm(one_process, two_processes):
    """2 x B/2 = 1 x B up to float round-off: teacher (CE) and student (KD + sliced W + input-GM, projector)."""
    main = two_processes["main"]
    gaps = {"teacher": _history_gap(one_process["teacher"], main["teacher"]),
            "student": _history_gap(one_process["student"], main["student"]),
            "weights": _weight_gap(one_process["student_weights"], main["student_weights"])}
    print("no BatchNorm, 2 processes vs 1:", gaps)
    assert gaps["teacher"] < 1e-5 and gaps["student"] < 1e-5 and gaps["weights"] < 1e-5, gaps
    assert main["student_summary"]["processes"] == 2
    assert two_processes["ranks"][1]["student"] == main["student"]  # every rank reports the all-reduced row


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_per_process_batchnorm_changes_the_run_within_the_stated_tolerance(one_process, two_processes):
    gap = _history_gap(one_process["student_bn"], two_processes["main"]["student_bn"])
    print("per-process BatchNorm, 2 processes vs 1: max gap", gap)
    assert gap < 0.05  # measured 0.014: 2 validation images of 144; the loss terms within 0.4 %


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_ddp_gradients_equal_the_single_process_gradients(two_processes):
    """One global batch, two steps (input-gradient matching on the first: DDP + double backward); W is computed
    on the gathered features: its value is the whole batch's, not the local share's, and so is its gradient."""
    for method, result in two_processes["main"]["gradients"].items():
        for step in result["steps"]:
            assert step["same_names"], method
            assert step["max_abs_diff"] <= 1e-6 * max(1.0, step["max_abs_grad"]), (method, step)
            assert _rel(step["ref"]["wasserstein"], step["ddp"]["wasserstein"]) < 1e-6, (method, step)
    gompertz = two_processes["main"]["gradients"]["gompertz"]
    assert gompertz["steps"][0]["ddp"]["grad_match"] > 0 and gompertz["steps"][1]["ddp"]["grad_match"] == 0
    assert abs(gompertz["local_w"] - gompertz["steps"][1]["ref"]["wasserstein"]) > 1e-3  # local W differs


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_a_checkpoint_resumes_with_another_number_of_processes(setup, one_process, two_processes):
    params, data = setup
    from_single = two_processes["main"]["resumed_from_single"]  # written by 1 process, resumed by 2
    assert from_single["resumed_from_epoch"] == 1
    assert _weight_gap(one_process["student_weights"], from_single["weights"]) < 1e-5
    with NoBatchNorm():  # written by 2 processes, resumed by 1
        resumed = runner.distill_student(params, data, fixed_teacher(),
                                         checkpoint_path=two_processes["out"] / "ddp-epoch1.ckpt")
    assert resumed.summary["resumed_from_epoch"] == 1
    assert _history_gap(one_process["student"], plain_history(resumed.history)) < 1e-5
    assert _weight_gap(one_process["student_weights"], weights(resumed.model)) < 1e-5


# --- failures are bounded -------------------------------------------------------------------------------


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_a_dead_rank_fails_the_run_with_its_exit_code(tmp_path):
    t0 = time.perf_counter()
    proc = _torchrun("dies", str(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert "rank 1 dies at step 2" in proc.stderr
    assert "exitcode  : 17" in proc.stderr and "rank      : 1" in proc.stderr  # torchrun names the failed rank
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_a_stuck_rank_fails_the_run_at_the_collective_timeout(tmp_path):
    t0 = time.perf_counter()
    proc = _torchrun("hangs", str(tmp_path), timeout=120, GKD_DIST_TIMEOUT="6")
    assert proc.returncode != 0
    assert "rank 1 hangs at step 2" in proc.stderr
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower()
    assert time.perf_counter() - t0 < 90  # not the 300 s rank 1 sleeps


# --- the stage launcher ---------------------------------------------------------------------------------


def test_torchrun_command_standalone_or_the_users_rendezvous(monkeypatch):
    monkeypatch.delenv(launch.TORCHRUN_ARGS_ENV, raising=False)
    cmd = launch.torchrun_command(4, "tasks.train_teacher", ["--params", "params.yaml"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                       "-m", "tasks.train_teacher", "--params", "params.yaml"]
    monkeypatch.setenv(launch.TORCHRUN_ARGS_ENV, "--nnodes 2 --node-rank 1 --rdzv-endpoint host0:29500")
    cmd = launch.torchrun_command(8, "tasks.distill_student", [])
    assert cmd[5:11] == ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "host0:29500"]
    assert launch.stage_argv(Path("p.yaml"), ["seed=1"], Path("out"), None, True, {"strict": False}) == [
        "--params", "p.yaml", "--set", "seed=1", "--out-dir", "out", "--verbose", "--no-strict"]


def test_sync_batchnorm_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="SyncBatchNorm has no double backward"):
        tiny_params(sync_batchnorm=True)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: nothing to refuse")
    params = tmp_path / "params.yaml"
    _write_params(params, nproc=2, sync_batchnorm=True, weights={"kd": 1.0, "wasserstein": 0.0, "grad_match": 0.0})
    with pytest.raises(launch.UserError, match="sync_batchnorm = true needs CUDA"):
        launch.processes_to_launch(params, None)


def _write_params(path: Path, weights=None, **runtime) -> None:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"]["limit"] = 200
    for net in ("teacher", "student"):
        raw[net]["train"].update(epochs=1, batch_size=32, warmup_epochs=0)
    if weights is not None:
        raw["method"]["gompertz"]["weights"] = weights
    raw["runtime"].update(device="cpu", num_workers=0, **runtime)
    path.write_text(yaml.safe_dump(raw))


SPY = """
import os
if os.environ.get("GKD_SPY_FILE"):
    _replace = os.replace
    def _spy(src, dst, *a, **k):
        with open(os.environ["GKD_SPY_FILE"], "a") as fh:
            fh.write(f"{os.environ.get('RANK', 'parent')} {dst}\\n")
        return _replace(src, dst, *a, **k)
    os.replace = _spy
"""


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_the_stage_relaunches_itself_on_nproc_processes_and_only_rank_0_writes(tmp_path):
    """``python -m tasks.train_teacher`` with runtime.nproc 2: torchrun runs two workers; every file (written
    atomically: temp file + os.replace, spied on in every process) comes from rank 0."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    _write_params(project / "params.yaml", nproc=2)
    save_prepared(prepare_dataset(tiny_params().dataset, seed=0), project / "data" / "prepared.pt")
    spy_dir, spy = tmp_path / "spy", tmp_path / "writes.txt"
    spy_dir.mkdir()
    (spy_dir / "sitecustomize.py").write_text(SPY)
    env = _env(GKD_SPY_FILE=str(spy))
    env["PYTHONPATH"] = os.pathsep.join([str(spy_dir), env["PYTHONPATH"]])
    env.pop("GKD_MLFLOW_PARENT_RUN_ID", None)
    proc = subprocess.run([sys.executable, "-m", "tasks.train_teacher", "--params", "params.yaml"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch.distributed.run --nproc-per-node 2 --standalone -m tasks.train_teacher" in proc.stderr
    report = json.loads((project / "reports" / "teacher.json").read_text())
    assert report["processes"] == 2 and (project / "models" / "teacher.pt").is_file()
    writes = [line.split(" ", 1) for line in spy.read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}, writes  # nothing from rank 1, nothing from the launcher
    written = {(Path(p).resolve().relative_to(project.resolve()) if Path(p).is_absolute() else Path(p)).as_posix()
               for _, p in writes}
    assert {"models/teacher.pt", "reports/teacher.json", "reports/plots/teacher_history.csv"} <= written
    assert any(p.startswith("checkpoints/") for p in written)  # the per-epoch checkpoint, by rank 0
    assert not (project / "checkpoints").exists() or not any((project / "checkpoints").iterdir())


def test_a_worker_error_ends_the_stage_with_its_message_and_exit_code(monkeypatch, caplog):
    """torchrun fails because a worker refused its input: the worker's error file (run_cli writes it) gives the
    command's exit code and last message; without one, torchrun's exit code. (A stand-in for torchrun here:
    the real one is exercised by the other tests.)"""
    fake = ("import json, os, sys; json.dump({'exit_code': 2, 'kind': 'user_input', 'error': 'no teacher: run "
            "train_teacher first'}, open(os.environ['GKD_ERROR_FILE'], 'w')); sys.exit(1)")
    monkeypatch.delenv("GKD_ERROR_FILE", raising=False)
    monkeypatch.setattr(launch, "torchrun_command", lambda *a, **k: [sys.executable, "-c", fake])
    assert launch.relaunch(2, "tasks.distill_student", []) == 2
    assert caplog.records[-1].getMessage() == "no teacher: run train_teacher first"
    monkeypatch.setattr(launch, "torchrun_command", lambda *a, **k: [sys.executable, "-c", "raise SystemExit(1)"])
    assert launch.relaunch(2, "tasks.distill_student", []) == 1
    assert "the 2 training processes failed (torchrun exit code 1)" in caplog.records[-1].getMessage()
    assert "GKD_ERROR_FILE" not in os.environ


@pytest.mark.slow  # process start-up: torch is imported by every process
def test_a_sigterm_to_the_stage_command_stops_the_training_processes(tmp_path):
    """A cancelled flow run sends SIGTERM to the stage command: it reaches torchrun (here a stand-in that sleeps),
    which stops; the command ends with 128 + 15 and leaves no process behind."""
    import signal

    pid_file = tmp_path / "child.pid"
    script = tmp_path / "relaunch.py"
    script.write_text(
        "import sys\n"
        "from tasks import launch\n"
        "child = 'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(120)'\n"
        f"launch.torchrun_command = lambda *a, **k: [sys.executable, '-c', child, {str(pid_file)!r}]\n"
        "sys.exit(launch.relaunch(2, 'tasks.train_teacher', []))\n")
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not pid_file.is_file() or not pid_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)

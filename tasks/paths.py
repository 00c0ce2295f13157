"""Where the stages read and write: the project's file layout and :class:`StagePaths`, the one object a stage
function takes instead of a list of paths.

Every file has one relative path (the constants below, the layout dvc.yaml declares). A ``StagePaths`` places
them: a stage's outputs (and the inputs a run writes for itself, e.g. the student that evaluate reads after
distill_student) under ``out_dir``; the *shared* inputs (by default the prepared data and the teacher) under
the project ``root``. ``out_dir`` defaults to the root, which gives the layout of dvc.yaml; a sweep point
redirects it to ``reports/sweep/points/<method>-seed<n>/`` and still reads the pipeline's data and teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PARAMS_FILE = "params.yaml"  # dvc.yaml's stage commands read this file, in the project folder

PREPARED = "data/prepared.pt"
TEACHER = "models/teacher.pt"
TEACHER_CACHE = "data/teacher_cache.pt"  # a sweep's teacher outputs on its training split, computed once
STUDENT = "models/student.pt"
ONNX = "models/student.onnx"
DATA_REPORT = "reports/data.json"
TEACHER_REPORT = "reports/teacher.json"
STUDENT_REPORT = "reports/student.json"
EVALUATE_REPORT = "reports/evaluate.json"
EXPORT_REPORT = "reports/export.json"
# companions of the four metrics files above (tasks.reports.write_report): text facts and numeric details
TEACHER_INFO = "reports/info/teacher.json"
STUDENT_INFO = "reports/info/student.json"
EVALUATE_INFO = "reports/info/evaluate.json"
EXPORT_INFO = "reports/info/export.json"
TEACHER_HISTORY = "reports/plots/teacher_history.csv"
STUDENT_HISTORY = "reports/plots/student_history.csv"
TEACHER_CURVES = "reports/plots/teacher_curves.png"
STUDENT_CURVES = "reports/plots/student_curves.png"
SCHEDULE_CSV = "reports/plots/schedule.csv"
SCHEDULE_PNG = "reports/plots/schedule.png"
CONFUSION_CSV = "reports/plots/confusion.csv"
CONFUSION_PNG = "reports/plots/confusion.png"
PROMOTE_JSON = "reports/promote.json"  # promotion is not a DVC stage: these two are not DVC outputs
PROMOTE_MD = "reports/promote.md"
CHECKPOINT_DIR = "checkpoints"  # resume state of interrupted training; not a DVC output (git-ignored)

SHARED_INPUTS = frozenset({PREPARED, TEACHER})


@dataclass(frozen=True)
class StagePaths:
    """The files of one stage run.

    ``StagePaths()`` is the project in the current directory with dvc.yaml's layout;
    ``StagePaths(root, "reports/sweep/points/kd-seed0")`` writes everything under that folder (relative to
    ``root``; an absolute ``out_dir`` is taken as is) and reads the ``shared`` inputs from ``root``.
    """

    root: Path = Path(".")
    out_dir: Optional[Path] = None  # None: the root
    shared: frozenset[str] = field(default=SHARED_INPUTS)

    def __post_init__(self) -> None:
        root = Path(self.root)
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "out_dir", root if self.out_dir is None else root / self.out_dir)

    def output(self, rel: str) -> Path:
        """Where this run writes ``rel`` (one of the layout's relative paths)."""
        return self.out_dir / rel

    def input(self, rel: str) -> Path:
        """Where this run reads ``rel``: the project's file for a shared input, else this run's own output."""
        return (self.root if rel in self.shared else self.out_dir) / rel

    def checkpoint(self, name: str, data: Any) -> Path:
        """Resume state of a training run in the project's checkpoints/ (not an output: removed on success),
        keyed by ``name`` and the data's content hash (the engine's fingerprint covers the config)."""
        return self.root / CHECKPOINT_DIR / f"{name}-{str(data.meta.get('sha256', 'nohash'))[:16]}.pt"

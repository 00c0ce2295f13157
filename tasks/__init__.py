"""Pipeline stages: one module per stage, each a plain function over a :class:`tasks.paths.StagePaths` and
the typer CLI that dvc.yaml calls (built by :func:`tasks.cli.stage_app`).

    python -m tasks.prepare_data     --params params.yaml   # data/prepared.pt, reports/data.json
    python -m tasks.train_teacher    --params params.yaml   # models/teacher.pt, reports/teacher.json, curves
    python -m tasks.distill_student  --params params.yaml   # models/student.pt, reports/student.json, curves
    python -m tasks.evaluate         --params params.yaml   # reports/evaluate.json, confusion matrix
    python -m tasks.export_onnx      --params params.yaml   # models/student.onnx, reports/export.json
    python -m tasks.register         --params params.yaml   # MLflow registry: version + alias challenger
    python -m tasks.promote          --params params.yaml   # MLflow registry: challenger -> champion?

dvc.yaml calls the first five; flows/ chain them through DVC and wrap the rest as Prefect tasks (tasks/ has no
Prefect in it). This is the only layer that touches files, MLflow and DVC; the work itself is gkd_core's. A
stage CLI that finds ``GKD_MLFLOW_PARENT_RUN_ID`` in its environment logs a nested MLflow run under that
parent (live, through the training callbacks); without it the stage runs with no tracking at all, so plain
``dvc repro`` needs no MLflow.

The supporting modules, one topic each: paths (file layout, StagePaths), stages (what each stage writes),
cli (the CLI factory, logging), inputs (upstream files with clear errors), reports (CSV and JSON report
files), training (a trained model's files), tracking (MLflow), provenance (git and dvc.lock facts),
dvc_ops (DVC from Python), code_deps (dvc.yaml's code dependencies, generated).
"""

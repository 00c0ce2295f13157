"""Prefect flows: pipeline (all stages through DVC, then registration), sweep (methods x seeds), promote
(registry aliases), deployments (cron schedules on the "cpu" and "gpu" work pools)."""

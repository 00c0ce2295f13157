"""Refuse to start the compose services with missing, example or weak secrets (compose.yaml's `secrets-check`).

    python scripts/check_secrets.py     # POSTGRES_PASSWORD, MLFLOW_ADMIN_PASSWORD, MLFLOW_SECRET_KEY from the env

Exit 0 when each is set, is not the value .env.example ships (`change-me`), and has at least 16 characters;
else exit 1 with one line per problem, naming the variable (never printing a value). compose.yaml starts
every other service only after this check passed. Standard library only.
"""

from __future__ import annotations

import os
import sys

REQUIRED = {
    "POSTGRES_PASSWORD": "the database password of MLflow's and Prefect's stores",
    "MLFLOW_ADMIN_PASSWORD": "the MLflow server's admin password (basic-auth app)",
    "MLFLOW_SECRET_KEY": "the MLflow server's key for CSRF tokens",
}
EXAMPLE_VALUES = frozenset({"change-me", "changeme", "password", "secret"})
MIN_LENGTH = 16


def problems(env: dict[str, str]) -> list[str]:
    out = []
    for name, what in REQUIRED.items():
        value = env.get(name, "")
        if not value:
            out.append(f"{name} ({what}) is not set: put it in .env (see .env.example)")
        elif value.strip().lower() in EXAMPLE_VALUES:
            out.append(f"{name} ({what}) is the example value: replace it in .env, e.g. with `openssl rand -hex 24`")
        elif len(value) < MIN_LENGTH:
            out.append(f"{name} ({what}) is shorter than {MIN_LENGTH} characters: use e.g. `openssl rand -hex 24`")
    return out


def main() -> int:
    found = problems(dict(os.environ))
    for line in found:
        print(f"check_secrets: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

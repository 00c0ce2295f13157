"""Container health of a Prefect worker started with ``--with-healthcheck`` (the Dockerfile's HEALTHCHECK).

Exit 0 when the worker's health server answers 200 (the worker polled its pool recently), 1 otherwise. The
server listens on PREFECT_WORKER_WEBSERVER_HOST:PREFECT_WORKER_WEBSERVER_PORT (the image sets 127.0.0.1:8080).
Standard library only: it runs every 30 s, so it must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    host = os.environ.get("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    port = os.environ.get("PREFECT_WORKER_WEBSERVER_PORT", "8080")
    url = f"http://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as err:
        print(f"{url}: {err}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

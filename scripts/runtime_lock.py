"""Print requirements.lock without the packages only the ``dev`` extra needs (pytest, hadolint and what they
alone pull in): what the worker image installs.

    python scripts/runtime_lock.py requirements.lock pyproject.toml > runtime.lock

A package is kept when a runtime requirement of pyproject.toml (the dependencies and every extra but ``dev``)
names it, or when pip-compile's ``# via`` annotation names a kept package among its dependents; a package with
no annotation is kept. Standard library only (it runs in the image before anything is installed).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

DEV_EXTRA = "dev"
PROJECT_VIA = re.compile(r"^[\w.-]+ \(pyproject\.toml\)$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalise(re.split(r"[\s<>=!~;\[(]", spec.strip(), maxsplit=1)[0])


def parse_lock(text: str) -> dict[str, tuple[str, set[str]]]:
    """``{name: (pin line, names in its "# via" annotation)}``; the project itself appears as "<project>"."""
    packages: dict[str, tuple[str, set[str]]] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            current = requirement_name(line)
            packages[current] = (line.strip(), set())
        elif current and line.strip().startswith("#"):
            via = line.strip().lstrip("#").strip()
            via = via[len("via"):].strip() if via.startswith("via") else via
            if via:
                packages[current][1].add("<project>" if PROJECT_VIA.match(via) else requirement_name(via))
        elif not line.strip():
            current = None
    return packages


def runtime_pins(lock_text: str, pyproject: dict) -> list[str]:
    project = pyproject["project"]
    runtime = {requirement_name(r) for r in project.get("dependencies", [])}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        if extra != DEV_EXTRA:
            runtime |= {requirement_name(r) for r in reqs}
    packages = parse_lock(lock_text)
    kept = {name for name, (_, via) in packages.items() if name in runtime or not via}
    grew = True
    while grew:
        grew = False
        for name, (_, via) in packages.items():
            if name not in kept and via & kept:
                kept.add(name)
                grew = True
    return [pin for name, (pin, _) in packages.items() if name in kept]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    lock, pyproject = (Path(a) for a in argv)
    print("\n".join(runtime_pins(lock.read_text(), tomllib.loads(pyproject.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Build .dvc/plots_template.html: DVC's plots page with vega, vega-lite and vega-embed inline (offline).

    python scripts/vega_template.py                 # npm pack the pinned versions, write the template
    python scripts/vega_template.py --packs DIR     # use vega-*.tgz already in DIR (no npm)

`dvc plots show` writes dvc_plots/index.html from an HTML template; DVC's default one loads the three
libraries from cdn.jsdelivr.net, so the page stays blank without internet. This template has no ``{scripts}``
placeholder (where DVC would put those CDN tags) and carries the libraries' UMD builds in ``<script>``
elements instead, each with its licence (BSD-3-Clause, University of Washington Interactive Data Lab).
.dvc/config points ``plots.html_template`` at it, so plain ``dvc plots show`` uses it.

The versions are the ones dvc-render's own page loads (dvc_render/vega.py), so the specs DVC writes render
exactly as with its default page.
"""

from __future__ import annotations

import argparse
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots_template.html"
PACKAGES = (("vega", "5.20.2", "build/vega.min.js"), ("vega-lite", "5.2.0", "build/vega-lite.min.js"),
            ("vega-embed", "6.18.2", "build/vega-embed.min.js"))
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- gkd-pipeline: vega, vega-lite and vega-embed inline (scripts/vega_template.py), no CDN: works offline -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def _member(pack: Path, name: str) -> str:
    with tarfile.open(pack) as tf:
        fh = tf.extractfile(f"package/{name}")
        if fh is None:
            raise SystemExit(f"{pack}: no package/{name}")
        return fh.read().decode("utf8")


def build(packs: Path) -> str:
    scripts = []
    for pkg, ver, build_file in PACKAGES:
        pack = packs / f"{pkg}-{ver}.tgz"
        if not pack.is_file():
            raise SystemExit(f"{pack} not found (npm pack {pkg}@{ver})")
        code, licence = _member(pack, build_file), _member(pack, "LICENSE")
        # no source-map comment: the page would ask for a .map file that is not there
        code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
        for bad in ("</script", *PLACEHOLDERS):
            if bad in code:
                raise SystemExit(f"{pkg}@{ver}: its build contains {bad!r}: it cannot be inlined in the template")
        licence = licence.replace("*/", "* /")
        scripts.append(f"    <script type=\"text/javascript\">\n/*! {pkg}@{ver} ({build_file}), from the npm registry.\n"
                       f"{licence.strip()}\n*/\n{code.strip()}\n    </script>")
    page = PAGE.format(scripts="\n".join(scripts))
    if page.count("{plot_divs}") != 1 or "{scripts}" in page:
        raise SystemExit("template placeholders wrong")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packs", type=Path, help="folder with vega-*.tgz from `npm pack` (default: run npm pack)")
    parser.add_argument("--out", type=Path, default=TEMPLATE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        packs = args.packs
        if packs is None:
            packs = Path(tmp)
            subprocess.run(["npm", "pack", "--silent", *(f"{p}@{v}" for p, v, _ in PACKAGES)], cwd=packs, check=True)
        args.out.write_text(build(packs), encoding="utf8")
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()

"""Renders chapter notebooks as reveal.js decks that open from the file system, offline.

`make slides` runs it; by hand:

    .venv/bin/python slides/build_decks.py --vendor                      # reveal.js and MathJax, once
    .venv/bin/python slides/build_decks.py notebooks/02_normalfloat.ipynb

Each deck is written beside this file as ``NN_name.slides.html`` with the notebook's
committed outputs (plots are embedded in the page). The page loads reveal.js and
MathJax from ``node_modules/`` beside it and nothing from the network: copy the whole
``slides/`` folder to present from another machine.

Why these two packages from npm: nbconvert's slides exporter expects a reveal.js
distribution (``dist/reveal.js``, ``plugin/notes/notes.js``, the themes), and only the
npm package ships one. ``jupyterlab-rise`` (the live slideshow in JupyterLab) contains
reveal.js 4.4.0 too, but compiled into JupyterLab's own bundles, from which no page can
load it. So the decks use reveal.js 4.4.0 from npm, the version RISE presents with, and
MathJax 3.2.2, the version JupyterLab renders formulas with: a deck looks like the
notebook and like the live slideshow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "deck.html.j2"
VENDOR = HERE / "node_modules"
#: The npm packages the decks load, pinned. Changing a version here reinstalls them.
NPM_PACKAGES = {"reveal.js": "4.4.0", "mathjax": "3.2.2"}
VENDOR_STAMP = VENDOR / ".qlora-lab-vendor"
REVEAL_PREFIX = "node_modules/reveal.js"
# "white" reads its font from reveal.js's own folder; nbconvert's default theme, "simple",
# imports two fonts from Google's servers.
REVEAL_THEME = "white"
MATHJAX_SCRIPT = "node_modules/mathjax/es5/tex-svg-full.js"

# What a browser would fetch by itself: a tag's source (links that the reader may click,
# <a href>, are not fetched), a CSS url() or @import, a JavaScript import.
TAG = re.compile(r"<([a-zA-Z][\w-]*)\b([^>]*)>")
REMOTE_ATTRIBUTE = re.compile(r"""\b(?:src|href|data|poster|srcset|action)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
REMOTE_CSS_OR_JS = re.compile(
    r"""(?:url\(\s*["']?|@import\s+(?:url\(\s*)?["']?|\bimport\b[^;'"\n]*["'])(?:https?:)?//""", re.I)
CSS_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
STYLE = re.compile(r"(<style[^>]*>)(.*?)(</style>)", re.DOTALL | re.IGNORECASE)


def installed_versions() -> dict[str, str | None]:
    versions = {}
    for name in NPM_PACKAGES:
        manifest = VENDOR / name / "package.json"
        versions[name] = json.loads(manifest.read_text())["version"] if manifest.exists() else None
    return versions


def vendor() -> None:
    """Installs the pinned reveal.js and MathJax into slides/node_modules (npm, once)."""
    if installed_versions() == NPM_PACKAGES and VENDOR_STAMP.exists():
        VENDOR_STAMP.touch()
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("make slides needs npm (Node.js) once, to install reveal.js and MathJax into slides/node_modules: "
                 "install Node.js (apt-get install npm, brew install node, or nodejs.org), then run make slides again.")
    specs = [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
    print(f"Installing {', '.join(specs)} into {VENDOR.relative_to(HERE.parent)} with npm.")
    subprocess.run([npm, "install", "--prefix", str(HERE), "--no-save", "--no-package-lock", "--no-audit",
                    "--no-fund", "--loglevel=error", *specs], check=True)
    found = installed_versions()
    if found != NPM_PACKAGES:
        sys.exit(f"npm installed {found}, but the decks need {NPM_PACKAGES}.")
    VENDOR_STAMP.write_text("".join(f"{spec}\n" for spec in specs))


def strip_remote_comments(html: str) -> str:
    """JupyterLab's stylesheet credits its sources in CSS comments that hold web addresses.
    They load nothing, but a deck that must work offline is easier to check without them."""
    def clean(match: re.Match) -> str:
        css = CSS_COMMENT.sub(lambda c: "" if "//" in c.group(0) else c.group(0), match.group(2))
        return match.group(1) + css + match.group(3)

    return STYLE.sub(clean, html)


def remote_resources(html: str) -> list[str]:
    """Every place in the page where a browser would fetch something from a web address."""
    found = [tag.group(0)[:120] for tag in TAG.finditer(html)
             if tag.group(1).lower() != "a" and REMOTE_ATTRIBUTE.search(tag.group(2))]
    found += [html[max(0, m.start() - 40): m.end() + 40].replace("\n", " ") for m in REMOTE_CSS_OR_JS.finditer(html)]
    return found


def remote_stylesheet_imports(html: str) -> list[str]:
    """Web addresses in the local stylesheets the page links (a theme may @import a font)."""
    found = []
    for tag in TAG.finditer(html):
        href = re.search(r"""\bhref\s*=\s*["']([^"']+\.css)["']""", tag.group(2))
        if tag.group(1).lower() == "link" and href and "//" not in href.group(1):
            css = HERE / href.group(1)
            if css.exists():
                found += [f"{href.group(1)}: {m.group(0)}" for m in REMOTE_CSS_OR_JS.finditer(css.read_text())]
    return found


def slide_counts(notebook: Path) -> tuple[int, int, int]:
    """(slides, subslides, skipped cells) from the notebook's slide metadata."""
    cells = json.loads(notebook.read_text())["cells"]
    kinds = [c.get("metadata", {}).get("slideshow", {}).get("slide_type", "-") for c in cells]
    return kinds.count("slide"), kinds.count("subslide"), kinds.count("skip")


def build(notebook: Path, out_dir: Path) -> Path:
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    if installed_versions() != NPM_PACKAGES:
        sys.exit(f"reveal.js and MathJax are missing from {VENDOR}: run `make slides` "
                 f"(or `{Path(sys.executable).name} {Path(__file__).name} --vendor`) first.")
    config = Config()
    config.SlidesExporter.reveal_url_prefix = REVEAL_PREFIX
    config.SlidesExporter.reveal_theme = REVEAL_THEME
    config.HTMLExporter.mathjax_url = MATHJAX_SCRIPT
    exporter = SlidesExporter(config=config, template_file=str(TEMPLATE))
    html, _ = exporter.from_filename(str(notebook))
    html = strip_remote_comments(html)
    remote = remote_resources(html) + remote_stylesheet_imports(html)
    if remote:
        sys.exit(f"{notebook}: the deck would load from the network: {remote[:3]}")
    target = out_dir / f"{notebook.stem}.slides.html"
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out_dir, suffix=".tmp", delete=False) as tmp:
        tmp.write(html)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # a temporary file is private; a deck is not
    os.replace(tmp.name, target)
    slides, subslides, skipped = slide_counts(notebook)
    print(f"{target.relative_to(HERE.parent)}: {slides} slides, {subslides} subslides, "
          f"{skipped} {'cell' if skipped == 1 else 'cells'} left out of the talk")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="chapter notebooks to render")
    parser.add_argument("--vendor", action="store_true", help="install the pinned reveal.js and MathJax first")
    args = parser.parse_args(argv)
    if args.vendor:
        vendor()
    for notebook in args.notebooks:
        build(notebook, HERE)


if __name__ == "__main__":
    main()

"""The documents a reader finds (issue 33): the README is a landing page, and every link in
the Markdown files leads somewhere.

* the README stays under 8,000 characters, shows the two commands in its first screen and
  links one page per reader;
* every relative link of every Markdown file in the repository (and of the notebooks'
  Markdown cells) names a file or folder that exists, and a ``#fragment`` names a heading of
  the file it points to;
* the README's picture of the course is chapter 00's course map, byte for byte.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: a Markdown link or image: [text](target) or ![alt](target), target without spaces
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FIRST_SCREEN_LINES = 30
#: each reader's page, linked from the README's "Your path"
READER_PAGES = ["docs/laptop.md", "docs/hosted.md", "notebooks/TEACHING.md", "docs/gpu.md", "CONTRIBUTING.md"]
COURSE_MAP = ROOT / "docs" / "course-map.png"
COURSE_MAP_CELL = ("notebooks/00_welcome.ipynb", "5adc0189")


def markdown_files() -> list[Path]:
    """The repository's Markdown files, as git knows them (or, outside a checkout, on disk)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "*.md"], capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 and listed.stdout.strip() else None
    if names is None:
        skip = ("node_modules", ".venv", ".pytest_cache")
        return sorted(p for p in ROOT.rglob("*.md") if not any(part in skip for part in p.parts))
    return sorted(ROOT / name for name in names if (ROOT / name).is_file())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a '#' in a code block is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def broken_links(source: Path, text: str) -> list[str]:
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)  # links in code are code
    text = re.sub(r"`[^`\n]*`", "", text)
    wrong = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or a place in the same file
        path, _, fragment = target.partition("#")
        resolved = (source.parent / path).resolve()
        if not resolved.exists():
            wrong.append(f"{source.relative_to(ROOT)}: {target} does not exist")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            wrong.append(f"{source.relative_to(ROOT)}: {target}: {path} has no heading #{fragment}")
    return wrong


def test_every_relative_link_of_the_markdown_files_resolves():
    files = markdown_files()
    assert README in files and len(files) > 5, f"found only {files}"
    wrong = [w for path in files for w in broken_links(path, path.read_text(encoding="utf-8"))]
    assert not wrong, "links that lead nowhere (fix the path, relative to the file):\n" + "\n".join(wrong)


def test_every_relative_link_of_the_notebooks_resolves():
    wrong = []
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        wrong += broken_links(path, text)
    assert not wrong, "notebook links that lead nowhere:\n" + "\n".join(wrong)


def test_the_link_checker_finds_a_broken_link_and_a_missing_heading(tmp_path):
    page = ROOT / "docs" / "laptop.md"
    assert broken_links(page, "[ok](../README.md) [ok too](gpu.md#the-run) [web](https://example.org)") == []
    assert len(broken_links(page, "[gone](no-such-page.md) [anchor](gpu.md#no-such-heading)")) == 2
    assert broken_links(page, "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)`") == []


def test_the_readme_is_a_landing_page():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 8000, f"README.md has {len(text):,} characters; move details to docs/ (at most 8,000)"
    first_screen = "\n".join(text.splitlines()[:FIRST_SCREEN_LINES])
    for command in ("make lab", "make test"):
        assert command in first_screen, f"{command!r} is not in the README's first {FIRST_SCREEN_LINES} lines"
    path = text[text.index("## Your path"):]
    missing = [page for page in READER_PAGES if f"]({page})" not in path]
    assert not missing, f"the README's 'Your path' does not link {missing}"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == [str(COURSE_MAP.relative_to(ROOT))], f"the README should show one picture, the course map: {images}"


def test_the_readme_picture_is_chapter_00_s_course_map():
    notebook, cell_id = COURSE_MAP_CELL
    cell = next(c for c in json.loads((ROOT / notebook).read_text())["cells"] if c.get("id") == cell_id)
    png = next(o["data"]["image/png"] for o in cell["outputs"] if "image/png" in o.get("data", {}))
    assert COURSE_MAP.read_bytes() == base64.b64decode(png), (
        f"{COURSE_MAP.relative_to(ROOT)} is not the figure {notebook} (cell {cell_id}) draws: after re-executing "
        f"chapter 00, write the cell's image/png output to that file again")

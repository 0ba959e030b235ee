"""The package is the textbook: its shape, checked.

- a chapter's module is short enough to read in one sitting (speed, plumbing and
  exercise checkers are set apart in ``fast/``, ``support/`` and ``exercises/``);
- no module imports another that imports it back, counting imports inside functions
  (a cycle hidden behind a lazy import is still a cycle for the reader);
- nothing outside a module reaches for its private names (``_name``): the package's
  modules, ``bench/``, ``tests/`` and the notebooks use public names only;
- every speed module is introduced in ``qlora_lab.fast``'s docstring and proven
  equal to its reference in ``tests/fast/test_fast.py``.
"""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qlora_lab"
SET_APART = ("fast", "support", "exercises")
MAX_CHAPTER_MODULE_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports, at top level or inside functions.

    ``from qlora_lab.x import y`` imports ``qlora_lab.x.y`` if that is a module and
    ``qlora_lab.x`` otherwise; importing the package's root ``__init__`` is not counted
    (every submodule imports its parent package, and the root imports no submodule).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "qlora_lab" and name != this:
                found.add(name)
    return found


def test_no_chapter_module_is_longer_than_one_sitting():
    too_long = {}
    for name, path in package_modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in SET_APART:
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_CHAPTER_MODULE_LINES:
            too_long[name] = lines
    assert not too_long, (
        f"modules over {MAX_CHAPTER_MODULE_LINES} lines: {too_long}; split the idea, or move "
        "speed to qlora_lab/fast/ and plumbing to qlora_lab/support/")


def test_the_import_graph_has_no_cycle():
    modules = package_modules()
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycle = stack[stack.index(other):] + [other]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """The checker itself: a lazy import inside a function is an edge."""
    fake = tmp_path / "qlora_lab"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from qlora_lab import b\n")
    (fake / "b.py").write_text("from qlora_lab.a import f\n")
    modules = {"qlora_lab": fake / "__init__.py", "qlora_lab.a": fake / "a.py",
               "qlora_lab.b": fake / "b.py"}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imported_modules(fake / "a.py", modules) == {"qlora_lab.b"}
        assert imported_modules(fake / "b.py", modules) == {"qlora_lab.a"}
    finally:
        ROOT = saved


def private_uses(source: str, filename: str) -> list[str]:
    """``from qlora_lab... import _x`` and ``<qlora_lab module>._x`` in `source`."""
    tree = ast.parse(source, filename=filename)
    module_aliases = set()
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_lab"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    uses.append(f"from {node.module} import {alias.name}")
                module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qlora_lab"):
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id in module_aliases:
                uses.append(f"{ast.unparse(node)}")
    return uses


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            # IPython magics and shell escapes are not Python.
            lines += [line for line in source.splitlines()
                      if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def test_nothing_uses_another_modules_private_names():
    found = {}
    files = [p for d in ("qlora_lab", "bench", "tests") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        if path.name == "test_package_layout.py":
            continue
        uses = private_uses(path.read_text(), str(path))
        if uses:
            found[str(path.relative_to(ROOT))] = uses
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        uses = private_uses(notebook_code(path), str(path))
        if uses:
            found[str(path.relative_to(ROOT))] = uses
    assert not found, f"private names used across modules: {found}; make them public"


@pytest.mark.parametrize("source, expected", [
    ("from qlora_lab.memory import _PeakTracker", ["from qlora_lab.memory import _PeakTracker"]),
    ("from qlora_lab import memory\nmemory._release()", ["memory._release"]),
    ("import qlora_lab.models\nqlora_lab.models._quiet()", ["qlora_lab.models._quiet"]),
    ("from qlora_lab import memory\nmemory.estimate(x._private)", []),
    ("import torch\ntorch._C._get_tracing_state()", []),
])
def test_the_private_name_check_finds_what_it_should(source, expected):
    assert private_uses(source, "<test>") == expected


def test_every_speed_module_is_introduced_and_proven_equal():
    doc = ast.get_docstring(ast.parse((PACKAGE / "fast" / "__init__.py").read_text())) or ""
    test_file = ROOT / "tests" / "fast" / "test_fast.py"
    proven = imported_modules(test_file, package_modules())
    choices = (ROOT / "bench" / "speed_choices.md").read_text()
    assert doc.startswith("Speed, not course material"), doc[:80]
    for path in sorted((PACKAGE / "fast").glob("*.py")):
        if path.name == "__init__.py":
            continue
        name = module_name(path)
        assert f":mod:`{name}`" in doc, f"{name} is not introduced in qlora_lab.fast's docstring"
        assert name in proven, f"{name} has no equality test in tests/fast/test_fast.py"
        assert f"`{name.removeprefix('qlora_lab.')}" in choices, (
            f"{name}: what it gained is not in bench/speed_choices.md")


TIMING = re.compile(r"\b\d+(\.\d+)? ?(ms|µs|s)\b(?! (each|per|of|a|to|timeout)\b)|\b20\d\d-\d\d-\d\d\b")


@pytest.mark.parametrize("text, found", [("took 16.2 ms against", True), ("measured 2026-11-30", True),
                                         ("every 1 s of", False), ("blocks of 64", False)])
def test_the_timing_check_finds_what_it_should(text, found):
    assert bool(TIMING.search(text)) is found


def test_no_dated_measurement_sits_in_a_speed_module():
    """Timings and dates go stale in a docstring: the code says why, and
    bench/speed_choices.md (carried into bench/RESULTS.md) says by how much, when."""
    for path in sorted((PACKAGE / "fast").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            assert not TIMING.search(line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"


def test_contributing_names_every_module():
    """CONTRIBUTING.md's tree lists every module, so a new one gets its line."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    tree = text[text.index("## The package, module by module"):text.index("**Where new code goes.**")]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "exercises" or path.name == "__init__.py":
            continue
        if f" {path.name} " not in tree:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"CONTRIBUTING.md's tree does not name {missing}; add a line for each"


def notebook_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules a notebook imports, named below ``qlora_lab.`` (``quant.nf4``,
    ``memory``): ``from qlora_lab.x import y`` counts ``x.y`` when that is a module and ``x``
    otherwise. The package root and the exercise checkers are left out."""
    found = set()
    for node in ast.walk(ast.parse(notebook_code(path), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_lab"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in modules else node.module for name in names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("qlora_lab")]
        else:
            continue
        for name in names:
            while name not in modules:
                name = name.rpartition(".")[0]
            if name != "qlora_lab" and not name.startswith("qlora_lab.exercises"):
                found.add(name.removeprefix("qlora_lab."))
    return found


def chapter_notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_readme_chapter_table_names_what_each_notebook_imports():
    """One map, checked: CONTRIBUTING.md's table of what each chapter imports lists, for
    each chapter, exactly the package modules its notebook imports."""
    rows = {}
    for line in (ROOT / "CONTRIBUTING.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit() and "](notebooks/" in cells[1]:
            rows[cells[1].split("](notebooks/")[1].split(")")[0]] = set(re.findall(r"`([\w.]+)`", cells[2]))
    modules = package_modules()
    notebooks = chapter_notebooks()
    assert sorted(rows) == [p.name for p in notebooks], "CONTRIBUTING.md's chapter table needs one row per notebook"
    wrong = {}
    for path in notebooks:
        imported = notebook_imports(path, modules)
        if rows[path.name] != imported:
            wrong[path.name] = {"imported, not listed": sorted(imported - rows[path.name]),
                                "listed, not imported": sorted(rows[path.name] - imported)}
    assert not wrong, f"CONTRIBUTING.md's chapter table disagrees with the notebooks' imports: {wrong}"


def test_no_notebook_imports_plumbing_or_the_command_line():
    """Chapters teach from chapter modules: ``support`` is plumbing the course does not teach,
    and ``__main__`` is the command line, which a notebook runs as a learner would."""
    modules = package_modules()
    found = {}
    for path in chapter_notebooks() + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb")):
        bad = sorted(m for m in notebook_imports(path, modules) if m.split(".")[0] in ("support", "__main__"))
        if bad:
            found[path.name] = bad
    assert not found, f"notebooks import plumbing or the command line: {found}"


def test_every_stage_folder_names_its_chapter_and_reading_order():
    """Each stage folder's ``__init__`` says which chapter it is and lists every module in it,
    in the order to read them."""
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        if folder.name in SET_APART:
            continue
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert re.search(r"chapters? \d\d|appendix|make target", doc), f"{folder.name}/__init__.py names no chapter"
        for module in sorted(folder.glob("*.py")):
            if module.name != "__init__.py":
                assert f":mod:`{module_name(module)}`" in doc, f"{folder.name}/__init__.py does not list {module.name}"


def test_no_package_file_is_ignored_by_git():
    """Every file of the package is source: none may match a .gitignore pattern (a
    `runs/` pattern once hid qlora_lab/runs/ from every clone)."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    done = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    assert not done.stdout.split(), f"git ignores these package files: {done.stdout.split()}; fix .gitignore"


# test folders that test the repository or the exercises rather than one stage
TESTS = ROOT / "tests"
TESTS_OF_THE_WHOLE = {"repo", "exercises", "browser"}


def test_the_tests_mirror_the_package():
    """A stage's tests sit in the folder of the same name (``qlora_lab/quant`` ->
    ``tests/quant``), so a reader finds a module's tests from its path; every
    stage has its folder, and a test file at the top of tests/ tests a top-level
    module (``qlora.py`` -> ``tests/test_qlora.py``) or, as test_fuzz does, the
    command line's and the loaders' handling of generated bad input."""
    stages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders - stages - TESTS_OF_THE_WHOLE == set(), "test folders named after no stage of qlora_lab"
    assert stages - {"exercises"} - folders == set(), "stages of qlora_lab without a folder in tests/"
    top_level_modules = {p.stem for p in PACKAGE.glob("*.py") if not p.name.startswith("_")}
    for path in sorted(TESTS.glob("test_*.py")):
        tested = path.stem.removeprefix("test_")
        assert tested in top_level_modules | {"fuzz"}, (
            f"tests/{path.name} tests no top-level module of qlora_lab: move it into the folder of its stage")


DOCUMENTS = ("README.md", "CONTRIBUTING.md", "notebooks/TEACHING.md", "bench/README.md", "bench/RESULTS.md",
             *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md")))
STAGES = ("quant", "memory", "lora", "paging", "finetune", "after", "beyond", "fast", "models", "support", "runs",
          "qlora")


def cited_names(text: str) -> set[str]:
    """The package's names a Markdown text cites in backticks (``finetune.train.train``,
    ``qlora_lab.memory.estimate``), without the ``qlora_lab.`` prefix; a call's
    arguments (``build_model(...)``) are left off."""
    pattern = r"`(?:qlora_lab\.)?((?:%s)(?:\.[A-Za-z_][A-Za-z_0-9]*)*)" % "|".join(STAGES)
    return {m.group(1) for m in re.finditer(pattern, text) if not m.group(1).endswith(".py")}


def test_every_name_the_documents_cite_exists_and_is_public():
    """A document that names the package's code (the README's table of what runs only
    on CUDA, say) names something that exists and that a reader may use: a module, or
    a public attribute of one, never a private ``_name``."""
    import importlib

    wrong = []
    for document in DOCUMENTS:
        path = ROOT / document
        if not path.is_file():
            continue
        for name in sorted(cited_names(path.read_text())):
            parts = name.split(".")
            if any(p.startswith("_") for p in parts):
                wrong.append(f"{document}: {name} is private")
                continue
            for cut in range(len(parts), 0, -1):  # the longest prefix that is a module
                try:
                    obj = importlib.import_module("qlora_lab." + ".".join(parts[:cut]))
                except ModuleNotFoundError:
                    continue
                break
            else:
                wrong.append(f"{document}: {name} names no module")
                continue
            for attribute in parts[cut:]:
                if not hasattr(obj, attribute):
                    wrong.append(f"{document}: {name} has no {attribute}")
                    break
                obj = getattr(obj, attribute)
    assert not wrong, "\n".join(wrong)


def test_the_citation_check_reads_backticked_names():
    text = "see `finetune.backends.build_model(..., x)` and `qlora_lab.memory.estimate`, `qlora.py`, `torch.x`"
    assert cited_names(text) == {"finetune.backends.build_model", "memory.estimate"}
    assert "finetune.backends._load_bitsandbytes" in cited_names("`finetune.backends._load_bitsandbytes`")

"""Seminar mode: every chapter notebook is also a talk (notebooks/TEACHING.md).

Checks the notebooks' slide structure and the teacher's guide, without a browser:
`make test-browser` renders the decks and checks that every slide fits 1280 x 720.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
TEACHING = NOTEBOOKS / "TEACHING.md"
SLIDE_TYPES = {"slide", "subslide", "fragment", "skip", "notes", "-"}

# The slides of the seminar deck the course covers (seeds/ of the course design), in order.
# Titles repeated in the deck carry what distinguishes them in parentheses or after a colon.
SEMINAR_SLIDES = [
    "QLoRa: Efficient Finetuning of Quantized LLMs (title)",
    "Outline",
    "Abstract",
    "Introduction (Getting Started, Applications, Challenges)",
    "What is LLMs? (a model trained on a very large corpus)",
    "What is LLMs? (foundation models; BERT, an encoder)",
    "What is LLMs? (a prompt and its answer)",
    "LLMs size over time",
    "Low-precision",
    "Background (Quantization, LoRA)",
    "Float Point (FP)",
    "What is Quantization?",
    "Int8 Quantization (Weight): absmax",
    "Int8 Quantization (Weight): zero-point",
    "Matrix Multiplication Quantization",
    "Activation Quantization",
    "Quantization types",
    "Dynamic Quantization",
    "Static/Post Quantization",
    "Quantization aware training",
    "Quantization Types (table)",
    "Full Fine-tuning",
    "Fine-tuning a subset of parameters",
    "LoRA: Low-rank Adaptation",
    "Switch to another task",
    "LoRA: Low-rank Adaptation of LLMs (GPT-3 parameter count)",
    "Result of LoRA in GPT-2/3",
    'Result of LoRA in GPT-2/3 ("amplifies the important features")',
    "What is the optimal rank (r) for LoRA",
    "What is the optimal rank (r) for LoRA (subspace similarity)",
    "Methods (Introduction, QLoRA, 4-bit Quantization, Double Quantization)",
    "Introduction: QLoRA = Quantization + LoRA",
    "QLoRa (full finetuning, LoRA and QLoRA side by side)",
    "Block-wise k-bit Quantization",
    "4-bit NormalFloat Quantization",
    "Double Quantization (DQ)",
    "Guanaco with QLoRA (Table 6)",
    "Conclusion: Advantages",
    "Conclusion: Limitations",
    "Question",
]

# What each chapter leaves out of the talk (the notebook keeps it): a snippet of every
# cell that must be skipped. The brief of seminar mode names these detours.
DETOURS = {
    "01": ["A harder check: the inputs of every", "bnbF.int8_vectorwise_quant(A_copy, threshold)",
           "**bitsandbytes writes into its input.**", "bnb.nn.Linear8bitLt(576, 576",
           "The rescaling constant in bitsandbytes' pure-PyTorch kernel"],
    "02": ["### Where bitsandbytes disagrees with itself", "from bitsandbytes.backends.cpu.ops import _has_avx512"],
    "03": ["## 8. Bad inputs", "bad_calls = {"],
    "05": ["### Double quantization, and eval mode", "theirs_dq = bitsandbytes_layer(dense, double_quant=True)",
           "**A note on `.train()`.**"],
    "06": ["### Where bitsandbytes makes these calls", "### Where bitsandbytes decides, and what it does on a CPU",
           "On a CPU there is no unified memory", "paged_bnb = bnb.optim.PagedAdamW32bit"],
    "07": ["### What the released Guanaco code labels", "### Checks before the first step"],
    "09": ["packed = layer.weight.detach().reshape(-1, 2)"],
}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def text(cell: dict) -> str:
    return "".join(cell["source"])


def slide_type(cell: dict) -> str | None:
    return cell.get("metadata", {}).get("slideshow", {}).get("slide_type")


def chapter_id(path: Path) -> str:
    return path.name[:2]


def sections(nb: dict) -> list[tuple[int, str]]:
    """(index, heading) of the title and of every `##` heading."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            first = text(cell).lstrip("\n").split("\n", 1)[0]
            if first.startswith("## ") or (i == 0 and first.startswith("# ")):
                found.append((i, first))
    return found


def test_there_are_chapters():
    assert len(CHAPTERS) >= 8, [p.name for p in CHAPTERS]


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_id)
def test_every_cell_has_a_slide_type(path):
    nb = load(path)
    missing = [i for i, c in enumerate(nb["cells"]) if slide_type(c) not in SLIDE_TYPES]
    assert not missing, (f"{path.name}: cells {missing} have no slideshow.slide_type "
                         "(JupyterLab's property inspector sets it)")
    assert slide_type(nb["cells"][0]) == "slide", f"{path.name}: the title must open the first slide"
    code_notes = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and slide_type(c) == "notes"]
    assert not code_notes, f"{path.name}: code cells {code_notes} are speaker notes"


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_id)
def test_every_section_starts_a_slide_and_has_speaker_notes(path):
    nb = load(path)
    heads = sections(nb)
    assert len(heads) >= 5, f"{path.name}: too few sections"
    bounds = [i for i, _ in heads] + [len(nb["cells"])]
    for (start, heading), end in zip(heads, bounds[1:]):
        head_type = slide_type(nb["cells"][start])
        assert head_type in ("slide", "skip"), f"{path.name}: {heading!r} is {head_type!r}, not a new slide"
        notes = [text(c) for c in nb["cells"][start + 1:end] if slide_type(c) == "notes"]
        assert notes, f"{path.name}: no speaker notes in section {heading!r}"
        note = notes[0]
        for part in ("**Say:**", "**Ask the room:**", "**Time:**"):
            assert part in note, f"{path.name}, {heading!r}: the speaker notes lack {part}"
        assert re.search(r"\*\*Time:\*\* \d+ min\.", note), f"{path.name}, {heading!r}: no minutes in the notes"


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_id)
def test_the_talk_keeps_every_section_but_the_named_detours(path):
    nb = load(path)
    skipped = [heading for i, heading in sections(nb) if slide_type(nb["cells"][i]) == "skip"]
    allowed = DETOURS.get(chapter_id(path), [])
    assert all(heading in allowed for heading in skipped), f"{path.name}: sections left out of the talk: {skipped}"
    visible = [c for c in nb["cells"] if slide_type(c) not in ("skip", "notes")]
    assert sum(c["cell_type"] == "code" for c in visible) >= 3, f"{path.name}: the talk shows almost no code"


@pytest.mark.parametrize("chapter", sorted(DETOURS))
def test_the_long_detours_are_skipped_in_the_talk(chapter):
    path = next(p for p in CHAPTERS if chapter_id(p) == chapter)
    nb = load(path)
    for snippet in DETOURS[chapter]:
        cells = [c for c in nb["cells"] if snippet in text(c) and "Reading detour" not in text(c)]
        assert len(cells) == 1, f"{path.name}: {snippet!r} found in {len(cells)} cells"
        assert slide_type(cells[0]) == "skip", f"{path.name}: {snippet!r} is in the talk"
    markers = [c for c in nb["cells"] if text(c).startswith("> **Reading detour")]
    assert markers and all(slide_type(c) == "skip" for c in markers), (
        f"{path.name}: a detour must be announced to the notebook's readers (a '> **Reading detour' cell)")


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_id)
def test_every_chapter_ends_with_takeaways_and_self_check(path):
    nb = load(path)
    cells = nb["cells"]
    added = [i for i, c in enumerate(cells) if text(c).startswith("## What we added")]
    takeaways = [i for i, c in enumerate(cells) if text(c).startswith("## Key takeaways and self-check")]
    assert len(takeaways) == 1, f"{path.name}: no 'Key takeaways and self-check' section"
    assert added and added[0] < takeaways[0], f"{path.name}: the takeaways come after 'What we added'"
    assert len(re.findall(r"(?m)^\d\. ", text(cells[takeaways[0]]))) == 3, f"{path.name}: three key takeaways"
    checks = [c for c in cells[takeaways[0]:] if text(c).startswith("**Self-check.**")]
    assert len(checks) == 1, f"{path.name}: no self-check questions after the takeaways"
    questions = re.findall(r"(?m)^\d\. ", text(checks[0]))
    assert len(questions) in (2, 3), f"{path.name}: two or three self-check questions"
    solutions = re.search(r"`(solutions/[\w.]+\.ipynb)`", text(checks[0]))
    assert solutions, f"{path.name}: the self-check must say where the answers are"
    answers = [c for c in load(NOTEBOOKS / solutions.group(1))["cells"]
               if c["cell_type"] == "markdown" and text(c).startswith("## Self-check: answers")]
    assert len(answers) == 1, f"{solutions.group(1)}: no '## Self-check: answers' section"
    assert len(re.findall(r"(?m)^\d\. \*\*", text(answers[0]))) == len(questions), (
        f"{solutions.group(1)}: one answer per self-check question")


def teaching() -> str:
    return TEACHING.read_text(encoding="utf-8")


def test_the_guide_maps_every_slide_of_the_seminar_deck():
    rows = {}
    for line in teaching().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            rows[cells[1]] = cells[2]
    missing = [title for title in SEMINAR_SLIDES if title not in rows]
    assert not missing, f"TEACHING.md does not map these seminar slides: {missing}"
    for title in SEMINAR_SLIDES:
        assert re.search(r"\b0\d (§\d+|title)|every chapter", rows[title]), (
            f"TEACHING.md: {title!r} is mapped to {rows[title]!r}, not to a chapter section")


def test_every_section_the_guide_names_exists():
    headings = {chapter_id(p): {h.split(" ", 2)[1].rstrip(".") for _, h in sections(load(p)) if h.startswith("## ")}
                for p in CHAPTERS}
    for chapter, section in re.findall(r"\b(0\d) §(\d+)", teaching()):
        assert section in headings[chapter], f"TEACHING.md names {chapter} §{section}, which does not exist"


def test_the_guide_has_what_a_teacher_needs():
    guide = teaching()
    for heading in ("## What the room needs to know", "## The 90-minute path", "## The half-day path",
                    "## The seminar deck, slide by slide", "## Key takeaways, chapter by chapter",
                    "## Glossary", "## The day before"):
        assert heading in guide, f"TEACHING.md lacks {heading!r}"
    for command in ("make test", "make slides", "make gpu-smoke", "make test-browser"):
        assert command in guide
    for term in ("absmax", "zero-point", "block", "quantile", "NF4", "double quantization", "rank", "alpha",
                 "paged memory"):
        assert re.search(rf"(?m)^\| {re.escape(term)}\b", guide), f"the glossary lacks {term!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=chapter_id)
def test_the_guide_repeats_each_chapters_takeaways_and_talk_minutes(path):
    nb = load(path)
    cell = next(c for c in nb["cells"] if text(c).startswith("## Key takeaways and self-check"))
    for takeaway in re.findall(r"(?m)^\d\. (.+)$", text(cell)):
        assert takeaway in teaching(), f"TEACHING.md does not repeat the takeaway {takeaway[:60]!r}"
    minutes = sum(int(m) for c in nb["cells"] if slide_type(c) == "notes"
                  for m in re.findall(r"\*\*Time:\*\* (\d+) min\.", text(c)))
    row = re.search(rf"(?m)^\| {chapter_id(path)} [^|]*\| (\d+) min \|", teaching())
    assert row, f"TEACHING.md has no talk time for chapter {chapter_id(path)}"
    assert int(row.group(1)) == minutes, (
        f"TEACHING.md gives chapter {chapter_id(path)} {row.group(1)} min, its speaker notes add up to {minutes}")


ANSWERS = NOTEBOOKS / "ANSWERS.md"
PATHS = ("## The 90-minute path", "## The half-day path", "## The 2½-hour path")


def section_label(index: int, heading: str) -> str:
    """How the guide names a section: "title", "§N", or the heading of an unnumbered one."""
    if index == 0:
        return "title"
    numbered = re.match(r"## (\d+)\. ", heading)
    return f"§{numbered.group(1)}" if numbered else heading[3:]


def speaker_notes(nb: dict) -> list[tuple[str, str, str, int]]:
    """(label, heading, "Ask the room" question, minutes) of every speaker-notes cell, in order."""
    heads = sections(nb)
    bounds = [i for i, _ in heads] + [len(nb["cells"])]
    found = []
    for (start, heading), end in zip(heads, bounds[1:]):
        for cell in nb["cells"][start + 1:end]:
            if slide_type(cell) == "notes":
                question = re.search(r"\*\*Ask the room:\*\*(.*?)\*\*Time:\*\*", text(cell), re.S)
                minutes = sum(int(m) for m in re.findall(r"\*\*Time:\*\* (\d+) min\.", text(cell)))
                found.append((section_label(start, heading), heading, " ".join(question.group(1).split()), minutes))
    return found


def section_minutes(chapter: str) -> dict[str, int]:
    path = next(p for p in CHAPTERS if chapter_id(p) == chapter)
    minutes: dict[str, int] = {}
    for label, _, _, m in speaker_notes(load(path)):
        minutes[label] = minutes.get(label, 0) + m
    return minutes


def test_the_answer_key_answers_every_ask_the_room_question():
    """notebooks/ANSWERS.md: every "Ask the room" question of the notes, verbatim, in the order of the
    chapters and sections, each followed by an answer."""
    assert "(ANSWERS.md)" in teaching(), "TEACHING.md does not link the answer key"
    entry = re.compile(r"(?ms)^### (\d\d)(?: (title|§\d+))? · ([^\n]+)\n\n\*\*Ask the room:\*\* (.+?)\n\n"
                       r"\*\*Answer\.\*\* (.+?)\s*(?=^## |^### |\Z)")
    answers = ANSWERS.read_text(encoding="utf-8")
    entries = [(c, label or heading, " ".join(q.split()), a) for c, label, heading, q, a in entry.findall(answers)]
    assert len(entries) == answers.count("**Ask the room:**"), "ANSWERS.md has an entry its format does not allow"
    expected = [(chapter_id(p), label, question) for p in CHAPTERS for label, _, question, _ in speaker_notes(load(p))]
    for i, (want, got) in enumerate(zip(expected, entries)):
        assert got[:3] == want, f"ANSWERS.md entry {i + 1}: {got[:3]!r}, the notes have {want!r}"
        assert len(got[3].split()) >= 5, f"ANSWERS.md entry {i + 1} ({want[0]} {want[1]}) has no real answer"
    assert len(entries) == len(expected), (
        f"ANSWERS.md has {len(entries)} entries, the notebooks {len(expected)} 'Ask the room' questions")


@pytest.mark.parametrize("heading", PATHS)
def test_every_path_adds_up(heading):
    """A path's rows add up to its stated total, and a chapter's row to the notes of the sections it
    lists (or of every section)."""
    guide = teaching()
    assert heading in guide, f"TEACHING.md lacks {heading!r}"
    start = guide.index(heading)
    end = guide.find("\n## ", start + 1)
    part = guide[start:end if end > 0 else len(guide)]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in part.splitlines()
            if re.match(r"\| \d+ \|", line)]
    stated = re.search(r"(?m)^Total: (\d+) min(?: \((\d+) h (\d+) min)?", part)
    assert rows and stated, f"{heading}: no table of minutes, or no 'Total: N min' line"
    assert sum(int(r[0]) for r in rows) == int(stated.group(1)), (
        f"{heading}: the rows add up to {sum(int(r[0]) for r in rows)} min, the text says {stated.group(1)}")
    if stated.group(2):
        assert 60 * int(stated.group(2)) + int(stated.group(3)) == int(stated.group(1)), f"{heading}: hours"
    for row in rows:
        chapters = re.findall(r"\b0\d\b", row[1])
        if not chapters:
            continue
        if row[2] == "every section":
            expected = sum(sum(section_minutes(c).values()) for c in chapters)
        else:
            assert len(chapters) == 1, f"{heading}: a row of several chapters must present every section"
            minutes = section_minutes(chapters[0])
            listed = ["title" if t == "title" else f"§{n}" for t, n in re.findall(r"\b(title)\b|§(\d+)", row[2])]
            assert listed and all(s in minutes for s in listed), f"{heading}, {chapters[0]}: {row[2]!r}"
            expected = sum(minutes[s] for s in listed)
        assert int(row[0]) == expected, (
            f"{heading}: chapter {', '.join(chapters)} is given {row[0]} min, its sections' notes add up to {expected}")


def test_the_guide_gives_the_whole_talk_time():
    whole = sum(sum(section_minutes(chapter_id(p)).values()) for p in CHAPTERS)
    row = re.search(r"(?m)^\| all ten chapters \| (\d+) min \((\d+) h (\d+) min\) \|", teaching())
    assert row and int(row.group(1)) == whole == 60 * int(row.group(2)) + int(row.group(3)), (
        f"TEACHING.md's 'all ten chapters' row must say {whole} min")

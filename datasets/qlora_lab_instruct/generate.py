"""Generate the qlora-lab instruction data set (deterministic; see README.md).

    python datasets/qlora_lab_instruct/generate.py            # rewrite the files here
    python datasets/qlora_lab_instruct/generate.py --out DIR  # write them elsewhere
    python datasets/qlora_lab_instruct/generate.py --check    # regenerate and compare

Two kinds of examples, in the chat format of ``tokenizer.apply_chat_template``:

* **Scored format conversions** (``task`` one of :data:`SCORED_TASKS`): a short
  instruction and an input; the assistant's reply is exactly the ``answer`` field,
  checked by :func:`qlora_lab.finetune.evaluate.is_correct` (exact match after the documented
  normalisation). Every gold answer is checked with that same function here, so
  the generator and the scorer cannot disagree.
* **Open-ended conversations** (``task == "chat"``): explanations, how-to answers,
  polite rewrites and worked word problems, single- or multi-turn, assembled from
  the hand-written text in ``pool.py`` and ``pool_tasks.py``. Every pool is split into a training part
  and a held-out part, so held-out conversations are about topics that training
  never saw.

The same seed always produces byte-identical files (only Python's ``random``
module with an explicit seed and plain string formatting are used).
Code: MIT licence. Generated data and the text of pool.py and pool_tasks.py: CC-BY-4.0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for qlora_lab

import pool  # noqa: E402
import pool_tasks  # noqa: E402
from qlora_lab.finetune.data import SCORED_TASKS, validate_record  # noqa: E402
from qlora_lab.finetune.evaluate import is_correct, normalize_answer  # noqa: E402

SEED = 2023
# examples per split: scored items per task, and open-ended conversations
SIZES = {
    "train": {"scored_per_task": 300, "chat": 400},
    "validation": {"scored_per_task": 25, "chat": 60},
    "test": {"scored_per_task": 50, "chat": 60},
}
SPLITS = tuple(SIZES)

# --------------------------------------------------------------------------- #
# Word lists for the scored tasks (names and places are invented combinations)
# --------------------------------------------------------------------------- #
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_NAMES = [
    "Anna", "Ben", "Carla", "David", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Luis", "Maya", "Nils", "Olga", "Pavel", "Rosa", "Sami", "Tara", "Umar",
    "Vera", "Wim", "Yara", "Zoe", "Amir", "Bea", "Chen", "Dora", "Emil", "Fatima",
    "Gus", "Hana", "Ivan", "Julia", "Kofi", "Lena", "Marco", "Nora", "Omar", "Priya",
]
LAST_NAMES = [
    "Schmidt", "Okafor", "Rossi", "Nguyen", "Kowalski", "Silva", "Haddad", "Larsen",
    "Moreau", "Tanaka", "Petrov", "Garcia", "Novak", "Costa", "Berg", "Mensah",
    "Dubois", "Ivanova", "Keller", "Lindqvist", "Murphy", "Nakamura", "Ortiz", "Park",
    "Quinn", "Ramos", "Sato", "Torres", "Vogel", "Weber", "Yilmaz", "Zhang",
]
CITIES = [
    "Lyon", "Porto", "Oslo", "Krakow", "Lagos", "Osaka", "Leeds", "Quito", "Graz", "Tunis",
    "Perth", "Gdansk", "Turin", "Bergen", "Accra", "Bilbao", "Cork", "Dresden", "Seville",
    "Malmo", "Utrecht", "Brno", "Nantes", "Busan", "Kyoto", "Mombasa", "Cusco", "Tartu",
    "Aarhus", "Ghent", "Split", "Lublin",
]
SORT_WORDS = [
    "anchor", "apple", "badge", "basket", "bread", "bridge", "cabin", "candle", "carpet",
    "cherry", "cloud", "copper", "dancer", "desert", "dolphin", "eagle", "engine", "falcon",
    "feather", "forest", "garden", "ginger", "glacier", "hammer", "harbor", "hazel",
    "island", "ivory", "jacket", "jungle", "kettle", "kite", "ladder", "lemon", "lantern",
    "magnet", "mango", "meadow", "needle", "nutmeg", "ocean", "olive", "orbit", "paddle",
    "pencil", "pepper", "pillow", "quartz", "quilt", "rabbit", "ribbon", "river", "saddle",
    "salmon", "silver", "sugar", "tablet", "tiger", "tulip", "umbrella", "valley", "velvet",
    "violin", "wagon", "walnut", "window", "yogurt", "zebra", "zipper",
]

# --------------------------------------------------------------------------- #
# Scored tasks: each returns (user prompt, gold answer)
# --------------------------------------------------------------------------- #
DATE_INSTRUCTIONS = [
    "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Reply with the date only.\nDate: {src}",
    "Convert the date to YYYY-MM-DD. Answer with the date and nothing else.\n{src}",
    "What is this date in ISO format (YYYY-MM-DD)? Only give the date.\n{src}",
]
DATE_SENTENCES = [
    "The meeting was moved to {d}.",
    "Her contract started on {d}.",
    "The parcel was delivered on {d}.",
    "We planted the apple tree on {d}.",
]
DATE_IN_TEXT_INSTRUCTION = (
    "Which date is mentioned in this sentence? Write it as YYYY-MM-DD and nothing else.\n{src}"
)


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def make_date_iso(rng: random.Random) -> tuple[str, str]:
    """A calendar date written one of nine ways -> ``YYYY-MM-DD``."""
    date = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(36524))  # 1950..2049
    y, m, d = date.year, date.month, date.day
    month, weekday = MONTHS[m - 1], WEEKDAYS[date.weekday()]
    written = rng.choice([
        f"{month} {d}, {y}",
        f"{d} {month} {y}",
        f"{month[:3]} {d}, {y}",
        f"the {_ordinal(d)} of {month}, {y}",
        f"{weekday}, {month} {d}, {y}",
        f"{d:02d}.{m:02d}.{y} (day.month.year)",
        f"{m}/{d}/{y} (month/day/year)",
        f"{_ordinal(d)} {month[:3]}. {y}",
        f"{d}-{month[:3]}-{y}",
    ])
    if rng.random() < 0.25 and not written.endswith(")"):
        prompt = DATE_IN_TEXT_INSTRUCTION.format(src=rng.choice(DATE_SENTENCES).format(d=written))
    else:
        prompt = rng.choice(DATE_INSTRUCTIONS).format(src=written)
    return prompt, date.isoformat()


TIME_INSTRUCTIONS = [
    "Convert this time to 24-hour format (HH:MM). Reply with the time only.\nTime: {src}",
    "Write {src} as a 24-hour clock time (HH:MM). Give only the time.",
    "What is {src} on a 24-hour clock? Answer in HH:MM format only.",
]


def make_time_24h(rng: random.Random) -> tuple[str, str]:
    """A 12-hour clock time (am/pm) -> ``HH:MM`` on the 24-hour clock."""
    hour = rng.randrange(24)
    minute = rng.choice([0, 15, 30, 45, rng.randrange(60), rng.randrange(60)])
    h12, half = hour % 12 or 12, ("am" if hour < 12 else "pm")
    written = rng.choice([
        f"{h12}:{minute:02d} {half}",
        f"{h12}:{minute:02d} {half.upper()}",
        f"{h12}.{minute:02d}{half}",
        f"{h12}:{minute:02d} {'a.m.' if half == 'am' else 'p.m.'}",
    ])
    if minute == 0 and rng.random() < 0.5:
        written = f"{h12} {half}"
    return rng.choice(TIME_INSTRUCTIONS).format(src=written), f"{hour:02d}:{minute:02d}"


EXTRACT_INSTRUCTION = [
    "Extract the person's name, age and city. Answer exactly as name=...; age=...; city=...\nText: {src}",
    "From the text below, give name, age and city in the form name=...; age=...; city=...\n{src}",
]
EXTRACT_SENTENCES = [
    "{f} {l}, aged {a}, lives in {c}.",
    "Last year {f} {l} ({a}) moved to {c}.",
    "Our new member is {a} years old, comes from {c} and is called {f} {l}.",
    "In {c}, {a}-year-old {f} {l} opened a bakery.",
    "{l}, {f}: {a} years, resident of {c}.",
    "The prize went to {f} {l} from {c}, who is {a}.",
    "Born {a} years ago, {f} {l} still lives in {c}.",
    "Contact: {f} {l} | age {a} | city: {c}",
]


def make_extract_fields(rng: random.Random) -> tuple[str, str]:
    """A sentence about a person -> ``name=First Last; age=N; city=City``."""
    f, l, c = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(CITIES)
    a = rng.randint(18, 90)
    src = rng.choice(EXTRACT_SENTENCES).format(f=f, l=l, a=a, c=c)
    return rng.choice(EXTRACT_INSTRUCTION).format(src=src), f"name={f} {l}; age={a}; city={c}"


SORT_INSTRUCTIONS = [
    "Sort these words alphabetically. Reply with the words separated by commas.\nWords: {src}",
    "Put the following words in alphabetical order, separated by commas, and write nothing else: {src}",
]


def make_sort_words(rng: random.Random) -> tuple[str, str]:
    """Four to six lower-case words -> the same words in alphabetical order."""
    words = rng.sample(SORT_WORDS, rng.randint(4, 6))
    separator = rng.choice([", ", " ", "; "])
    return rng.choice(SORT_INSTRUCTIONS).format(src=separator.join(words)), ", ".join(sorted(words))


TASK_MAKERS = {
    "date_iso": make_date_iso,
    "time_24h": make_time_24h,
    "extract_fields": make_extract_fields,
    "sort_words": make_sort_words,
}
assert tuple(TASK_MAKERS) == SCORED_TASKS, "generator and qlora_lab.finetune.data.SCORED_TASKS disagree"


# --------------------------------------------------------------------------- #
# Open-ended conversations
# --------------------------------------------------------------------------- #
def _concept_chat(rng: random.Random, item: tuple[str, str, str, str, str]) -> tuple[list[dict], str]:
    term, what, example, analogy, why = item
    question = rng.choice(pool.CONCEPT_QUESTIONS).format(term=term)
    if "example" in question:
        first, rest = f"{what} {example}", {"analogy": analogy, "why": why}
    elif rng.random() < 0.5:
        first, rest = f"{what} {example}", {"analogy": analogy, "why": why}
    else:
        first, rest = f"{what} {why}", {"analogy": analogy, "example": example}
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": first}]
    for _ in range(rng.choice([0, 1, 1, 2])):
        kind = rng.choice(sorted(rest))
        follow = rng.choice(pool.FOLLOW_UPS[kind])
        messages += [{"role": "user", "content": follow},
                     {"role": "assistant", "content": rest.pop(kind)}]
    return messages, "concept"


def _howto_chat(rng: random.Random, item: tuple[str, list[str], str]) -> tuple[list[dict], str]:
    task, steps, tip = item
    question = rng.choice(pool_tasks.HOWTO_QUESTIONS).format(task=task)
    intro = rng.choice(["Here is a simple way to do it:", "You can do it in a few steps:",
                        "A good approach:"])
    body = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": f"{intro}\n{body}"}]
    if rng.random() < 0.5:
        messages += [{"role": "user", "content": rng.choice(pool_tasks.HOWTO_FOLLOW_UPS)},
                     {"role": "assistant", "content": f"One more tip: {tip}"}]
    return messages, "howto"


def _rewrite_chat(rng: random.Random, item: tuple[str, str]) -> tuple[list[dict], str]:
    blunt, polite = item
    question = rng.choice(pool_tasks.REWRITE_QUESTIONS).format(text=blunt)
    lead = rng.choice(["Here is a more polite version:", "Try this:", "You could say:"])
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": f"{lead}\n\"{polite}\""}], "rewrite"


INGREDIENTS = ["flour", "rice", "sugar", "butter", "lentils", "pasta", "oats", "cheese"]
ITEMS = ["jacket", "lamp", "backpack", "kettle", "bicycle helmet", "pair of boots", "desk chair"]


def _word_problem_chat(rng: random.Random) -> tuple[list[dict], str]:
    kind = rng.randrange(4)
    if kind == 0:
        n, m, per = rng.randint(2, 6), rng.randint(2, 12), rng.choice([25, 40, 50, 60, 75, 80, 100, 120])
        while m == n:
            m = rng.randint(2, 12)
        ing = rng.choice(INGREDIENTS)
        q = f"A recipe for {n} people needs {n * per} g of {ing}. How much {ing} do I need for {m} people?"
        a = (f"{n * per} g for {n} people is {n * per} / {n} = {per} g per person, "
             f"so for {m} people you need {m} x {per} = {m * per} g of {ing}.")
    elif kind == 1:
        speed = rng.choice([40, 50, 60, 80, 90, 100, 120])
        minutes = rng.choice([30, 45, 60, 75, 90, 105, 120, 150, 180])
        dist = speed * minutes // 60
        if speed * minutes % 60:
            minutes = 60 * rng.randint(1, 3)
            dist = speed * minutes // 60
        q = f"How long does it take to drive {dist} km at an average speed of {speed} km/h?"
        hours, rest = divmod(minutes, 60)
        spoken = f"{hours} hour{'s' if hours != 1 else ''}" + (f" and {rest} minutes" if rest else "")
        a = (f"Time is distance divided by speed: {dist} / {speed} = {minutes / 60:g} hours, "
             f"which is {spoken}.")
    elif kind == 2:
        price, pct = rng.choice([20, 40, 60, 80, 120, 150, 200, 250]), rng.choice([10, 15, 20, 25, 30, 50])
        item = rng.choice(ITEMS)
        off = price * pct / 100
        q = f"A {item} costs {price} euros and is {pct}% off. How much do I pay?"
        a = (f"The discount is {pct}% of {price} = {off:g} euros, "
             f"so you pay {price} - {off:g} = {price - off:g} euros.")
    else:
        people, each = rng.randint(2, 8), rng.randint(8, 45)
        total = people * each
        q = f"{people} friends share a restaurant bill of {total} euros equally. How much does each pay?"
        a = f"Each person pays {total} / {people} = {each} euros."
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "word_problem"


def _held_out_split(items: list, rng: random.Random, held_out: int) -> tuple[list, list, list]:
    """Shuffle a pool and cut it into (train, validation, test) parts."""
    items = list(items)
    rng.shuffle(items)
    half = held_out // 2
    return items[held_out:], items[:half], items[half:held_out]


def _chat_examples(rng: random.Random) -> dict[str, list[dict]]:
    concepts = _held_out_split(pool.CONCEPTS, rng, 12)
    howtos = _held_out_split(pool_tasks.HOWTOS, rng, 6)
    rewrites = _held_out_split(pool_tasks.REWRITES, rng, 6)
    makers = [
        (_concept_chat, concepts, 0.5),
        (_howto_chat, howtos, 0.2),
        (_rewrite_chat, rewrites, 0.15),
    ]
    out: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for s, split in enumerate(SPLITS):
        records = []
        while len(records) < SIZES[split]["chat"]:
            r = rng.random()
            for maker, parts, share in makers:
                if r < share:
                    messages, kind = maker(rng, rng.choice(parts[s]))
                    break
                r -= share
            else:
                messages, kind = _word_problem_chat(rng)
            if rng.random() < 0.15:
                messages = [{"role": "system", "content": rng.choice(pool_tasks.SYSTEM_PROMPTS)}] + messages
            key = json.dumps(messages)
            if key in seen:
                continue
            seen.add(key)
            records.append({"messages": messages, "task": "chat", "kind": kind})
        out[split] = records
    return out


def _scored_examples(rng: random.Random) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {split: [] for split in SPLITS}
    seen: set[str] = set()  # no prompt appears twice anywhere, so held-out items are new
    for task, maker in TASK_MAKERS.items():
        for split in SPLITS:
            made = 0
            while made < SIZES[split]["scored_per_task"]:
                prompt, answer = maker(rng)
                if prompt in seen:
                    continue
                seen.add(prompt)
                if normalize_answer(answer) != answer or not is_correct(answer, answer):
                    raise AssertionError(f"gold answer {answer!r} of {task} is not in the checker's normal form")
                out[split].append({
                    "messages": [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": answer}],
                    "task": task,
                    "answer": answer,
                })
                made += 1
    return out


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """All splits as lists of records, shuffled, with ids ``<split>-NNNNN``."""
    rng = random.Random(seed)
    scored = _scored_examples(rng)
    chat = _chat_examples(rng)
    splits = {}
    for split in SPLITS:
        records = scored[split] + chat[split]
        rng.shuffle(records)
        splits[split] = [{**r, "id": f"{split}-{i:05d}"} for i, r in enumerate(records)]
        for r in splits[split]:
            validate_record(r)
    return splits


def write(directory: Path, seed: int = SEED) -> dict[str, int]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl``; return their sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, records in build(seed).items():
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        sizes[split] = len(records)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: beside this script)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and compare with the files in --out")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp), args.seed)
            names = [f"{s}.jsonl" for s in SPLITS]
            _, mismatch, errors = filecmp.cmpfiles(tmp, args.out, names, shallow=False)
            if mismatch or errors:
                print(f"differs from a fresh generation: {mismatch + errors}")
                return 1
        print("identical to a fresh generation")
        return 0
    sizes = write(args.out, args.seed)
    print(", ".join(f"{k}: {v}" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

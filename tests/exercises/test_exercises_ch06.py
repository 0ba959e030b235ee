"""The chapter 06 checkers accept right answers, reject typical wrong ones with a
hint, and treat a skeleton as "not attempted yet" without raising."""

import torch

from qlora_lab.exercises import ch06

from exercise_feedback import assert_bugs_are_feedback


def skeleton(*args):
    raise NotImplementedError("your turn")


# ---------------------------------------------------------------- exercise 1


def pages_to_evict(lru_order, pinned, page_bytes, shortfall):
    if shortfall <= 0:
        return []
    candidates = [label for label in lru_order if label not in pinned]
    if len(candidates) * page_bytes < shortfall:
        return []
    victims, freed = [], 0
    for label in candidates:
        if freed >= shortfall:
            break
        victims.append(label)
        freed += page_bytes
    return victims


def test_exercise_1_cases_cover_every_rule():
    cases = list(ch06.exercise_1_cases())
    assert any(c[3] <= 0 for c in cases)                         # fits
    assert any(c[3] > 0 and c[4] == [] for c in cases)           # hopeless: nothing evicted
    assert any(c[1] for c in cases)                              # pinned pages
    assert any(c[3] % c[2] for c in cases if c[3] > 0)           # a partly needed page
    assert any(c[4] and c[4][0] != c[0][0] for c in cases)       # the oldest page is pinned
    for lru, pinned, page_bytes, shortfall, expected in cases:
        assert pages_to_evict(lru, pinned, page_bytes, shortfall) == expected


def test_exercise_1_right(capsys):
    assert ch06.check_exercise_1(pages_to_evict) is True
    assert "Exercise 1: correct" in capsys.readouterr().out


def test_exercise_1_skeleton(capsys):
    assert ch06.check_exercise_1(skeleton) is False
    assert "Exercise 1: not attempted yet" in capsys.readouterr().out


def test_exercise_1_wrong(capsys):
    def most_recent_first(lru, pinned, page_bytes, shortfall):
        return pages_to_evict(list(reversed(lru)), pinned, page_bytes, shortfall)

    def ignores_pins(lru, pinned, page_bytes, shortfall):
        return pages_to_evict(lru, set(), page_bytes, shortfall)

    def all_unpinned(lru, pinned, page_bytes, shortfall):
        if shortfall <= 0 or len([x for x in lru if x not in pinned]) * page_bytes < shortfall:
            return []
        return [x for x in lru if x not in pinned]

    def partial_when_hopeless(lru, pinned, page_bytes, shortfall):
        victims, freed = [], 0
        for label in lru:
            if freed >= shortfall:
                break
            if label not in pinned:
                victims.append(label)
                freed += page_bytes
        return victims

    def rounds_down(lru, pinned, page_bytes, shortfall):
        got = pages_to_evict(lru, pinned, page_bytes, shortfall)
        return got[:shortfall // page_bytes] if got else got

    def one_too_many(lru, pinned, page_bytes, shortfall):
        candidates = [x for x in lru if x not in pinned]
        if shortfall <= 0 or len(candidates) * page_bytes < shortfall:
            return []
        n = shortfall // page_bytes + 1
        return candidates[:n]

    cases = [
        (most_recent_first, "least recently used first"),
        (ignores_pins, "pinned pages"),
        (all_unpinned, "stop as soon as"),
        (partial_when_hopeless, "evicts nothing"),
        (rounds_down, "round up"),
        (one_too_many, "one page too many"),
        (lambda *a: "t0[0]", "return a list"),
        (lambda *a: [], "the pager evicts"),
    ]
    for wrong, hint in cases:
        assert ch06.check_exercise_1(wrong) is False, hint
        assert hint in capsys.readouterr().out


def test_exercise_1_reports_an_exception(capsys):
    assert ch06.check_exercise_1(lambda *a: 1 / 0) is False
    assert "raised ZeroDivisionError" in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 2


def adamw8bit_state_bytes(numel):
    if numel < 4096:
        return 2 * 4 * numel
    blocks = -(-numel // 256)
    return 2 * numel + 2 * 4 * blocks


def test_exercise_2_right(capsys):
    assert ch06.check_exercise_2(adamw8bit_state_bytes) is True
    assert "Exercise 2: correct" in capsys.readouterr().out


def test_exercise_2_reference_is_measured_from_bitsandbytes():
    # the checker's numbers come from the library: spot-check the layout it measures
    assert ch06.measured_adamw8bit_state_bytes(4095) == 8 * 4095
    assert ch06.measured_adamw8bit_state_bytes(4097) == 2 * 4097 + 8 * 17


def test_exercise_2_skeleton(capsys):
    assert ch06.check_exercise_2(skeleton) is False
    assert "Exercise 2: not attempted yet" in capsys.readouterr().out


def test_exercise_2_wrong(capsys):
    blocks = lambda n: -(-n // 256)  # noqa: E731
    cases = [
        (lambda n: 2 * n + 8 * blocks(n), "min_8bit_size = 4096"),
        (lambda n: 8 * n, "one uint8 per value"),
        (lambda n: 8 * n if n < 4096 else 2 * n, "float32 absmax"),
        (lambda n: 8 * n if n < 4096 else 2 * n + 8 * (n // 256), "round the number of blocks up"),
        (lambda n: 8 * n if n < 4096 else 2 * n + 4 * blocks(n), "both states"),
        (lambda n: 8 * n if n < 4096 else 2 * n + 8 * blocks(n) + 2048, "quantization maps"),
        (lambda n: float(adamw8bit_state_bytes(n)), "return an int"),
    ]
    for wrong, hint in cases:
        assert ch06.check_exercise_2(wrong) is False, hint
        assert hint in capsys.readouterr().out


def test_exercise_2_accepts_a_one_element_tensor(capsys):
    assert ch06.check_exercise_2(lambda n: torch.tensor(adamw8bit_state_bytes(n)))


def test_checkers_keep_the_global_random_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ch06.check_exercise_1(pages_to_evict)
    ch06.check_exercise_2(adamw8bit_state_bytes)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch06.check_exercise_1, ()),
        (2, ch06.check_exercise_2, ()),
    ])

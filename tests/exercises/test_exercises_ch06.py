"""The chapter 06 checkers accept right answers, reject typical wrong ones with a
hint, and treat a skeleton as "not attempted yet" without raising."""

import torch

from qlora_lab.exercises import ch06
from qlora_lab.paging.device_pool import DevicePool
from qlora_lab.paging.paged_adamw import PagedAdamW

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


# ---------------------------------------------------------------- exercise 3


def paging_traffic(page_bytes, device_bytes, free_activations=True, second_step=True, gradients=True):
    params = [torch.nn.Parameter(torch.ones(1024)) for _ in range(3)]
    pool = DevicePool(device_bytes)
    optimizer = PagedAdamW(params, lr=1e-2, page_bytes=page_bytes, pool=pool)
    for step in range(2 if second_step else 1):
        for p in params:
            p.grad = torch.full_like(p, 0.5) if gradients else None
        optimizer.step()
        if step == 0:
            activations = pool.allocate(10 * 1024, owner="activations")
            if free_activations:
                pool.free(activations)
    return optimizer.counters.as_dict()


def test_exercise_3_reference_is_section_4():
    # chapter 06, section 4: 2 KiB pages on a 28 KiB device move three pages out and back
    assert {k: ch06.paging_traffic(2048, 28 * 1024)[k] for k in ("evictions", "prefetches", "bytes_moved")} == {
        "evictions": 3, "prefetches": 3, "bytes_moved": 12288}
    assert ch06.paging_traffic(256, 34 * 1024)["bytes_moved"] == 0


def test_exercise_3_right(capsys):
    assert ch06.check_exercise_3(paging_traffic) is True
    assert "Exercise 3: correct" in capsys.readouterr().out


def test_exercise_3_wrong(capsys):
    cases = [
        (lambda pb, db: paging_traffic(pb, db, free_activations=False), "free the activations"),
        (lambda pb, db: paging_traffic(pb, db, second_step=False), "did you take it"),
        (lambda pb, db: paging_traffic(pb, db, gradients=False), "nothing moved"),
        (lambda pb, db: paging_traffic(2048, db), "the pager counts"),
        (lambda pb, db: (3, 3, 12288), "a dict"),
    ]
    for wrong, hint in cases:
        assert ch06.check_exercise_3(wrong) is False, hint
        assert hint in capsys.readouterr().out
    assert ch06.check_exercise_3(skeleton) is False
    assert "Exercise 3: not attempted yet" in capsys.readouterr().out


def test_checkers_keep_the_global_random_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ch06.check_exercise_1(pages_to_evict)
    ch06.check_exercise_2(adamw8bit_state_bytes)
    ch06.check_exercise_3(paging_traffic)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch06.check_exercise_1, ()),
        (2, ch06.check_exercise_2, ()),
        (3, ch06.check_exercise_3, ()),
    ])

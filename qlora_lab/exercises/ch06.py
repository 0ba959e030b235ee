"""Checkers for chapter 06 (paged optimizers).

Exercise 1: which optimizer pages the pager evicts when an allocation does not
            fit (least recently used first, pinned pages skipped, just enough,
            or nothing at all), checked against :class:`qlora_lab.paging.pager.Pager`.
Exercise 2: the bytes of bitsandbytes' 8-bit AdamW state for one parameter,
            checked against ``bitsandbytes.optim.AdamW8bit`` itself.
Exercise 3: an experiment: section 4's paging run with another page size and
            device budget, and the traffic it causes.
"""

from __future__ import annotations

import torch

from qlora_lab.exercises import call_learner, checker
from qlora_lab.paging.device_pool import DeviceOutOfMemoryError, DevicePool
from qlora_lab.paging.paged_adamw import PagedAdamW
from qlora_lab.paging.state_bytes import optimizer_state_bytes
from qlora_lab.paging.pager import Pager


# ---------------------------------------------------------------- exercise 1

_PAGE = 256  # bytes: 64 float32 values

# (pages of each state tensor, tensors pinned (an update in progress), tensors used
#  afterwards in this order, free pages on the device, bytes requested)
_EXERCISE_1_SCENARIOS = [
    ((2, 1, 3), (), (), 0, 3 * _PAGE),             # plain LRU: the first three pages
    ((2, 1, 3), (), (0,), 0, 3 * _PAGE),           # t0 was used again: it is now the newest
    ((2, 2, 2), (1,), (2,), 1, 4 * _PAGE),         # t1 pinned: skipped, t2's first page goes
    ((2, 2, 2), (0,), (1, 2), 0, 3 * _PAGE),       # the oldest pages are pinned
    ((1, 3, 2), (), (2, 0), 2, 2 * _PAGE + 100),   # 100 bytes short: a whole page goes
    ((1, 3, 2), (), (), 1, 3 * _PAGE - 1),         # 511 bytes short: two pages
    ((2, 2), (0,), (), 1, 4 * _PAGE),              # only t1's 2 pages may go: not enough, nothing goes
    ((3, 1, 2), (), (1,), 2, 2 * _PAGE),           # it fits: nothing to evict
    ((1, 1, 1, 1), (2,), (3, 1), 0, 2 * _PAGE),
]


def exercise_1_cases():
    """Yield ``(lru_order, pinned, page_bytes, shortfall, expected)`` for each
    scenario; ``expected`` is what the real pager evicted."""
    for sizes, pinned_ids, touched, free_pages, request in _EXERCISE_1_SCENARIOS:
        pool = DevicePool((sum(sizes) + free_pages) * _PAGE, record_events=True)
        pager = Pager(pool, _PAGE)
        tensors = [pager.create(torch.Size([n * _PAGE // 4]), torch.float32, f"t{i}", pin=False)
                   for i, n in enumerate(sizes)]
        pager.acquire([tensors[i] for i in pinned_ids])  # held until the update ends
        for i in touched:
            pager.acquire([tensors[i]])
            pager.release([tensors[i]])
        lru = pager.lru_order()
        pinned = {page.label for i in pinned_ids for page in tensors[i].pages}
        shortfall = request - pool.available
        pool.events.clear()
        try:
            pool.allocate(request, owner="activations")
        except DeviceOutOfMemoryError:
            pass
        expected = [e.label.removeprefix("evict ") for e in pool.events if e.label.startswith("evict ")]
        yield lru, pinned, _PAGE, shortfall, expected


def _exercise_1_hint(got, expected, lru, pinned, page_bytes, shortfall) -> str:
    unpinned = [label for label in lru if label not in pinned]
    if got and any(label in pinned for label in got):
        return "pinned pages belong to a tensor the optimizer is updating right now: skip them."
    if shortfall <= 0 and got:
        return "a shortfall of 0 or less means the request fits: evict nothing."
    if not expected and got:
        return ("when all the unpinned pages together cannot free the shortfall, the pool evicts nothing "
                "(moving them would not save the allocation) and raises its out-of-memory error.")
    if got == unpinned and got != expected:
        return "stop as soon as the evicted pages free at least the shortfall."
    if sorted(got) == sorted(expected):
        return "the order matters: least recently used first (lru_order starts with the oldest page)."
    if got and set(got) <= set(unpinned) and got[0] != unpinned[0]:
        return "least recently used first: lru_order starts with the oldest page, not the newest."
    if len(got) == len(expected) - 1:
        return "a page frees page_bytes bytes; a partly needed page must go too (round up)."
    if len(got) == len(expected) + 1:
        return "one page too many: stop when the freed bytes reach the shortfall (>=, not >)."
    return "walk lru_order from the start, skip pinned pages, stop when enough bytes are freed."


@checker(1)
def check_exercise_1(pages_to_evict) -> bool:
    """``pages_to_evict(lru_order, pinned, page_bytes, shortfall)`` must return
    the labels of the pages the pager moves to host memory, in order, when an
    allocation is ``shortfall`` bytes short: unpinned pages, least recently
    used first, just enough to free ``shortfall`` bytes; an empty list when
    the request fits (``shortfall <= 0``) or when all unpinned pages together
    would not free enough (the pool then evicts nothing)."""
    for lru, pinned, page_bytes, shortfall, expected in exercise_1_cases():
        ok, got = call_learner(1, pages_to_evict, list(lru), set(pinned), page_bytes, shortfall)
        if not ok:
            return False
        if not isinstance(got, (list, tuple)):
            print(f"Exercise 1: return a list of page labels, got {type(got).__name__}")
            return False
        got = list(got)
        if got != expected:
            print(f"Exercise 1: lru_order={lru}, pinned={sorted(pinned)}, page_bytes={page_bytes}, "
                  f"shortfall={shortfall}")
            print(f"  the pager evicts {expected}, your function returned {got}")
            print(f"  Hint: {_exercise_1_hint(got, expected, lru, pinned, page_bytes, shortfall)}")
            return False
    print("Exercise 1: correct")
    return True


# ---------------------------------------------------------------- exercise 2

_EXERCISE_2_SIZES = [1, 255, 4095, 4096, 4097, 5000, 12288, 36864, 98304, 100_003]


def measured_adamw8bit_state_bytes(numel: int) -> int:
    """What ``bitsandbytes.optim.AdamW8bit`` keeps for one parameter of
    ``numel`` values, measured: its tensors except the shared quantization maps."""
    import qlora_lab  # noqa: F401  (before bitsandbytes)
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.zeros(numel))
    optimizer = bnb.optim.AdamW8bit([p])
    p.grad = torch.zeros_like(p)
    optimizer.step()
    by_key = optimizer_state_bytes(optimizer, by_key=True)
    return sum(n for key, n in by_key.items() if not key.startswith("qmap"))


def _exercise_2_hint(got: int, numel: int) -> str:
    blocks = -(-numel // 256)
    if numel < 4096:
        if got == 2 * numel + 8 * blocks or got == 2 * numel:
            return ("bitsandbytes keeps tensors with fewer than min_8bit_size = 4096 values in 32 bits "
                    "(two float32 states, no absmax).")
        return "below 4096 values: two float32 states, 4 bytes each per value."
    if got == 8 * numel:
        return "from 4096 values on, each state is 8-bit: one uint8 per value."
    if got == 2 * numel:
        return "each block of 256 values also has a float32 absmax, for each of the two states."
    if got == 2 * numel + 8 * (numel // 256):
        return "a partial last block gets its own absmax: round the number of blocks up."
    if got == 2 * numel + 4 * blocks:
        return "both states (exp_avg and exp_avg_sq) have their own absmax per block."
    if got in (2 * numel + 8 * blocks + 2048, 2 * numel + 8 * blocks + 1024):
        return "leave out the two 256-entry quantization maps: they are shared by all parameters."
    return "two uint8 states of numel bytes, plus one float32 absmax per block of 256 values for each."


@checker(2)
def check_exercise_2(adamw8bit_state_bytes) -> bool:
    """``adamw8bit_state_bytes(numel)`` must return the bytes of
    ``bitsandbytes.optim.AdamW8bit``'s state for one parameter of ``numel``
    values: ``state1``, ``state2``, ``absmax1`` and ``absmax2`` (not the two
    quantization maps, which all parameters share, nor the integer step)."""
    for numel in _EXERCISE_2_SIZES:
        ok, got = call_learner(2, adamw8bit_state_bytes, numel)
        if not ok:
            return False
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, int):
            print(f"Exercise 2: return an int number of bytes, got {type(got).__name__} {got!r}")
            return False
        expected = measured_adamw8bit_state_bytes(numel)
        if got != expected:
            print(f"Exercise 2: a parameter of {numel:,} values: bitsandbytes keeps {expected:,} bytes, "
                  f"your function says {got:,}")
            print(f"  Hint: {_exercise_2_hint(got, numel)}")
            return False
    print("Exercise 2: correct")
    return True


# ---------------------------------------------------------------- exercise 3

# (page bytes, device bytes): a shortfall that whole pages cover exactly or not, a device
# smaller than the state, pages larger than a moment, and a device where nothing moves
_EXERCISE_3_SETTINGS = [(2048, 28 * 1024), (512, 27 * 1024), (4096, 27 * 1024), (1024, 16 * 1024),
                        (8192, 36 * 1024), (256, 34 * 1024)]
_TRAFFIC = ("evictions", "prefetches", "bytes_moved")


def paging_traffic(page_bytes: int, device_bytes: int) -> dict[str, int]:
    """Section 4's run on a device of ``device_bytes`` with pages of ``page_bytes``:
    three parameters of 1024 float32 values, a step, 10 KiB of activations
    allocated and freed, a second step; the optimizer's paging counters."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1024, generator=generator)) for _ in range(3)]
    pool = DevicePool(device_bytes)
    optimizer = PagedAdamW(params, lr=1e-2, page_bytes=page_bytes, pool=pool)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(1024, generator=generator)
        optimizer.step()
        if step == 0:
            pool.free(pool.allocate(10 * 1024, owner="activations"))
    return optimizer.counters.as_dict()


def _exercise_3_hint(got: dict, expected: dict) -> str:
    if all(got.get(key) == 0 for key in _TRAFFIC) and any(expected[key] for key in _TRAFFIC):
        return ("nothing moved: did every parameter get a gradient before each step (AdamW skips a parameter "
                "without one), and did the 10 KiB of activations go to the same pool?")
    if got.get("prefetches") == 0 and expected["prefetches"]:
        return "evicted pages come back by prefetch in the second step: did you take it?"
    if got.get("evictions", 0) > expected["evictions"]:
        return "more traffic than the pager's: free the activations before the second step."
    return "the run of section 4: step, allocate 10 KiB and free them, step; only page_bytes and the device change."


@checker(3)
def check_exercise_3(learner_paging_traffic) -> bool:
    """``paging_traffic(page_bytes, device_bytes)`` must run section 4's
    scenario with those settings (``PagedAdamW(params, lr=1e-2,
    page_bytes=page_bytes, pool=DevicePool(device_bytes))`` on three
    parameters of 1024 float32 values; a step; 10 KiB of activations allocated
    and freed; a second step) and return ``optimizer.counters.as_dict()``."""
    for page_bytes, device_bytes in _EXERCISE_3_SETTINGS:
        expected = paging_traffic(page_bytes, device_bytes)
        ok, got = call_learner(3, learner_paging_traffic, page_bytes, device_bytes)
        if not ok:
            return False
        if not isinstance(got, dict):
            print(f"Exercise 3: return optimizer.counters.as_dict(), a dict; got {type(got).__name__}")
            return False
        if any(got.get(key) != expected[key] for key in _TRAFFIC):
            print(f"Exercise 3: pages of {page_bytes:,} bytes on a device of {device_bytes:,} bytes: the pager "
                  f"counts " + ", ".join(f"{key} {expected[key]:,}" for key in _TRAFFIC)
                  + "; your run counts " + ", ".join(f"{key} {got.get(key)!r}" for key in _TRAFFIC))
            print(f"  Hint: {_exercise_3_hint(got, expected)}")
            return False
    print("Exercise 3: correct")
    return True

"""Checkers for chapter 03 (double quantization and the memory budget).

Exercise 1: the bytes of a tensor's quantization constants, with and without
double quantization, counted exactly (partial blocks included).
Exercise 2: double quantization from scratch: mean offset, blocks of 256, the
signed dynamic 8-bit map.
Exercise 3: change the budget, measure what fits: the longest QLoRA step that
fits a GPU, with and without gradient checkpointing.
"""

from __future__ import annotations

import torch

from qlora_lab import memory
from qlora_lab.exercises import call_learner, checker
from qlora_lab.quant.double_quant import double_dequantize, double_quantize, dynamic_map, storage_bytes
from qlora_lab.quant.nf4 import quantize_4bit


@checker(1)
def check_exercise_1(constants_bytes) -> bool:
    """``constants_bytes(numel, blocksize, double_quant)`` must return the bytes
    of the quantization constants of a 4-bit tensor of ``numel`` values (no
    packed weights, no code tables): float32 absmax per block, or with double
    quantization one uint8 code per block, one float32 absmax per 256 codes and
    the float32 offset; last blocks may be partial."""
    generator = torch.Generator().manual_seed(3)
    for numel, blocksize in [(4096, 64), (576 * 1536, 64), (1000, 64), (70_000, 128), (333, 32), (17, 64)]:
        packed, state = quantize_4bit(torch.randn(numel, generator=generator), blocksize=blocksize)
        packed_dq, state_dq = quantize_4bit(torch.randn(numel, generator=generator), blocksize=blocksize,
                                            double_quant=True)
        for double_quant, (p, s) in ((False, (packed, state)), (True, (packed_dq, state_dq))):
            expected = storage_bytes(p, s) - p.numel() * p.element_size()
            ok, got = call_learner(1, constants_bytes, numel, blocksize, double_quant)
            if not ok:
                return False
            if got != expected:
                print(f"Exercise 1: {numel:,} values in blocks of {blocksize}"
                      f"{' with double quantization' if double_quant else ''}: the constants take "
                      f"{expected:,} bytes, you said {got!r}.")
                blocks = -(-numel // blocksize)
                if double_quant and isinstance(got, (int, float)) and got == expected - 4:
                    if blocks % 256:  # two mistakes give the same 4 bytes here: say both
                        print(f"  Hint: 4 bytes short. The mean offset is stored too (one float32), and the "
                              f"{blocks:,} codes fill {-(-blocks // 256)} groups of 256 (the last one partial), "
                              f"each with its float32 absmax: count the groups rounding up.")
                    else:
                        print("  Hint: the mean offset is stored too (one float32).")
                elif numel % blocksize:
                    print("  Hint: the last block is partial, but it still needs its constant.")
                return False
    print("Exercise 1: correct")
    return True


def _cases():
    generator = torch.Generator().manual_seed(4)
    yield torch.rand(256 * 4, generator=generator) * 0.1 + 0.01     # whole blocks
    yield torch.rand(1000, generator=generator) * 0.05 + 0.02       # a partial last block
    yield torch.randn(300, generator=generator).abs() * 0.03 + 1e-3  # skewed, like real constants
    yield torch.full((40,), 0.25)                                   # every constant equal to the mean


@checker(2)
def check_exercise_2(my_double_quantize) -> bool:
    """``my_double_quantize(absmax, blocksize)`` must return ``(codes, nested_absmax,
    offset)`` as ``qlora_lab.quant.double_quant.double_quantize`` does: ``offset`` the
    mean, one float32 absolute maximum of the centred constants per block, and
    uint8 indices into ``dynamic_map()`` of the nearest value (ties may go
    either way)."""
    code = dynamic_map(signed=True)
    for absmax in _cases():
        ref_codes, nested = double_quantize(absmax, 256)
        ok, got = call_learner(2, my_double_quantize, absmax.clone(), 256)
        if not ok:
            return False
        if not isinstance(got, tuple) or len(got) != 3:
            print("Exercise 2: return a tuple (codes, nested_absmax, offset).")
            return False
        codes, nested_absmax, offset = got
        offset = torch.as_tensor(offset, dtype=torch.float32)
        if not torch.equal(offset, nested.offset):
            print(f"Exercise 2: the offset should be the mean of the constants, {nested.offset.item():.6g}; "
                  f"you have {offset.item():.6g}.")
            return False
        if not isinstance(nested_absmax, torch.Tensor) or not torch.equal(nested_absmax.float(), nested.absmax):
            print(f"Exercise 2: expected {nested.absmax.numel()} block absmax values of the *centred* constants, "
                  f"{nested.absmax.tolist()[:4]}...; you have "
                  f"{nested_absmax.tolist()[:4] if isinstance(nested_absmax, torch.Tensor) else nested_absmax!r}.")
            return False
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.shape != ref_codes.shape:
            print(f"Exercise 2: codes must be a uint8 tensor of shape {tuple(ref_codes.shape)}, got "
                  f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}.")
            return False
        scaled = (absmax - nested.offset) / torch.repeat_interleave(nested.absmax, 256)[: absmax.numel()].clamp_min(
            torch.finfo(torch.float32).tiny)
        yours, best = (scaled - code[codes.long()]).abs(), (scaled - code[ref_codes.long()]).abs()
        if bool((yours > best + 1e-7).any()):
            i = int((yours - best).argmax())
            nearest, chosen = int(ref_codes[i]), int(codes[i])
            print(f"Exercise 2: constant {i} scales to {scaled[i].item():.6g}; the nearest code is "
                  f"{code[nearest].item():.6g} (index {nearest}), you chose {code[chosen].item():.6g} "
                  f"(index {chosen}).")
            return False
        back = double_dequantize(codes, nested)
        if not torch.isfinite(back).all():
            print("Exercise 2: the dequantized constants are not finite.")
            return False
    print("Exercise 2: correct")
    return True


STEP = 128
"""Exercise 3 counts sequence lengths in multiples of 128 tokens."""


def longest_fit_reference(config, gpu_gb: int, gradient_checkpointing: bool) -> int:
    """Reference answer for exercise 3: the longest sequence (a multiple of
    :data:`STEP` tokens, batch 1) whose QLoRA step peak fits ``gpu_gb``; 0 if
    none does. The peak grows with the sequence, so doubling then bisecting
    finds it."""
    capacity = memory.gpu_capacity_bytes(gpu_gb)

    def fits(seq_len: int) -> bool:
        return memory.estimate(config, "qlora", seq_len=seq_len,
                               gradient_checkpointing=gradient_checkpointing).peak <= capacity

    if not fits(STEP):
        return 0
    low, high = STEP, 2 * STEP
    while fits(high):
        low, high = high, 2 * high
    while high - low > STEP:
        middle = (low + high) // (2 * STEP) * STEP
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@checker(3)
def check_exercise_3(longest_fit) -> bool:
    """``longest_fit(config, gpu_gb, gradient_checkpointing)`` must return the
    longest sequence, a multiple of 128 tokens, whose QLoRA step peak
    (``memory.estimate(config, "qlora", seq_len=..., gradient_checkpointing=...).peak``)
    fits in ``memory.gpu_capacity_bytes(gpu_gb)``, or 0; checked for LLaMA-7B to
    65B on 24 and 48 GB cards, then printed as a table."""
    rows = []
    for size in memory.LLAMA_SIZES:
        for gpu_gb in (24, 48):
            row = []
            for checkpointing in (True, False):
                expected = longest_fit_reference(size, gpu_gb, checkpointing)
                ok, got = call_learner(3, longest_fit, size, gpu_gb, checkpointing)
                if not ok:
                    return False
                if got != expected:
                    print(f"Exercise 3: {size} on a {gpu_gb} GB card, gradient checkpointing "
                          f"{'on' if checkpointing else 'off'}: the longest step that fits is {expected:,} tokens, "
                          f"you said {got!r}.")
                    if isinstance(got, int) and got == expected + STEP:
                        print("  Hint: that one no longer fits; compare the peak with the capacity using <=.")
                    elif isinstance(got, int) and got % STEP:
                        print(f"  Hint: count in multiples of {STEP} tokens.")
                    return False
                row.append(expected)
            rows.append((size, gpu_gb, *row))
    print("Exercise 3: correct. The longest QLoRA step that fits (tokens, batch 1):")
    print(f"  {'model':<10}{'GPU':>6}{'checkpointing on':>18}{'off':>8}{'ratio':>8}")
    for size, gpu_gb, on, off in rows:
        ratio = f"{on / off:.1f}" if off else "-"
        print(f"  {size:<10}{gpu_gb:>4} GB{on:>18,}{off:>8,}{ratio:>8}")
    print("  (LLaMA reads at most 2,048 tokens at a time: beyond that, the tokens of a step are a batch.)")
    return True

"""Checkers for chapter 09 (beyond one GPU, and after QLoRA).

Exercise 1: the bytes of one 4-bit layer that one rank holds under FSDP.
Exercise 2: one round of LoftQ's initialisation, and its error.
Exercise 3: change the card's memory and the batch, and measure how many GPUs
            FSDP-QLoRA needs (chapter 03's estimate for one of N GPUs).
"""

from __future__ import annotations

import torch

from qlora_lab.beyond.fits import estimate_per_gpu
from qlora_lab.beyond.loftq import loftq_init
from qlora_lab.exercises import call_learner, checker
from qlora_lab.quant.nf4 import dequantize_4bit, quantize_4bit


def _shard_bytes(tensor: torch.Tensor, world: int, rank: int) -> int:
    """Bytes of ``rank``'s piece of ``tensor`` cut as FSDP cuts it (``torch.chunk``
    along dim 0; a rank past the last chunk holds nothing but padding)."""
    chunks = tensor.chunk(world)
    return chunks[rank].numel() * tensor.element_size() if rank < len(chunks) else 0


@checker(1)
def check_exercise_1(rank_bytes) -> bool:
    """``rank_bytes(out_features, in_features, world_size, rank)`` must return
    the bytes of the packed weight and of the uint8 block constants (NF4,
    blocks of 64, double quantization) that ``rank`` holds when FSDP cuts
    both tensors along their first dimension into ``world_size`` pieces."""
    for out_features, in_features, world, rank in [(576, 576, 2, 1), (1536, 576, 4, 3), (192, 576, 3, 0),
                                                    (128, 64, 8, 7), (7, 33, 3, 2)]:
        packed, state = quantize_4bit(torch.randn(out_features, in_features), double_quant=True)
        expected = _shard_bytes(packed, world, rank) + _shard_bytes(state.absmax_indices, world, rank)
        ok, got = call_learner(1, rank_bytes, out_features, in_features, world, rank)
        if not ok:
            return False
        if got != expected:
            print(f"Exercise 1: rank {rank} of {world} holds {expected:,} bytes of a {out_features}x{in_features} "
                  f"layer, you said {got!r}.")
            if got == (out_features * in_features // 2) // world:
                print("  Hint: the block constants are sharded too (one uint8 per 64 weights).")
            return False
    print("Exercise 1: correct")
    return True


@checker(2)
def check_exercise_2(loftq_round) -> bool:
    """``loftq_round(weight, r)`` must return ``(Q, B, A)``: ``Q`` the
    dequantized NF4 (double-quantized, blocks of 64) of ``weight`` and ``B A``
    the best rank-``r`` approximation of the residual ``weight - Q``."""
    generator = torch.Generator().manual_seed(9)
    for shape, r in [((64, 96), 4), ((128, 64), 8)]:
        weight = torch.randn(shape, generator=generator)
        packed, state, A_ref, B_ref = loftq_init(weight, r, num_iter=1)
        Q_ref = dequantize_4bit(packed, state)
        ok, got = call_learner(2, loftq_round, weight, r)
        if not ok:
            return False
        if not (isinstance(got, tuple) and len(got) == 3):
            print("Exercise 2: return the tuple (Q, B, A).")
            return False
        Q, B, A = got
        if not torch.equal(Q, Q_ref):  # the same quantize_4bit / dequantize_4bit: the same bits
            print("Exercise 2: Q is not NF4(weight) dequantized (use quantize_4bit with double_quant=True).")
            return False
        if tuple(B.shape) != (shape[0], r) or tuple(A.shape) != (r, shape[1]):
            print(f"Exercise 2: B must be {shape[0]} x {r} and A {r} x {shape[1]}.")
            return False
        # Another SVD routine rounds otherwise: a backward-stable SVD errs by ~max(m, n) eps ||R||, which moves
        # the rank-r part by that over the gap sigma_r - sigma_{r+1} (Davis-Kahan), relative to its norm.
        sigma = torch.linalg.svdvals((weight - Q_ref).double())
        tol = max(shape) * torch.finfo(torch.float32).eps * (sigma[0] / (sigma[r - 1] - sigma[r])).item()
        reference = (B_ref @ A_ref).double()
        if not (B.double() @ A.double() - reference).norm().item() <= tol * reference.norm().item():
            print("Exercise 2: B A is not the best rank-r approximation of weight - Q (truncated SVD).")
            return False
    print("Exercise 2: correct")
    return True


MAX_GPUS = 64


def _fewest(config, gib, batch, seq_len, capacity=2**30, part="peak"):
    """The smallest N <= MAX_GPUS whose per-GPU estimate (``part``) is under
    ``gib * capacity`` bytes, or None."""
    for n in range(1, MAX_GPUS + 1):
        if getattr(estimate_per_gpu(config, "qlora", n, batch=batch, seq_len=seq_len), part) < gib * capacity:
            return n
    return None


@checker(3)
def check_exercise_3(fewest_gpus) -> bool:
    """``fewest_gpus(config, gib, batch, seq_len)`` must return the smallest number
    of GPUs N (1 to 64) for which FSDP-QLoRA's estimate for one GPU
    (``fits.estimate_per_gpu(config, "qlora", N, batch=, seq_len=)``) has a peak
    below ``gib`` GiB, or None when no N up to 64 does."""
    for config, gib, batch, seq_len in [("llama-2-70b", 24, 1, 512), ("llama-2-70b", 24, 2, 2048),
                                        ("llama-65b", 24, 1, 512), ("llama-65b", 48, 1, 512),
                                        ("llama-2-70b", 12, 2, 2048), ("llama-2-70b", 2, 1, 512)]:
        expected = _fewest(config, gib, batch, seq_len)
        ok, got = call_learner(3, fewest_gpus, config, gib, batch, seq_len)
        if not ok:
            return False
        right = got is None if expected is None else (isinstance(got, int) and not isinstance(got, bool)
                                                      and got == expected)
        if not right:
            print(f"Exercise 3: {config} on {gib} GB cards at batch {batch} x {seq_len} needs "
                  f"{expected or 'more than ' + str(MAX_GPUS)} GPUs, you said {got!r}.")
            decimal = got == _fewest(config, gib, batch, seq_len, capacity=10**9)
            total = got == _fewest(config, gib, batch, seq_len, part="total")
            if got == expected:
                print("  Hint: return the number of GPUs as an int (or None).")
            elif expected is None:
                print("  Hint: when no N up to 64 fits, return None.")
            elif decimal or total:
                if decimal:
                    print("  Hint: a 24 GB card holds 24 GiB, 24 * 2**30 bytes (as fits_table counts).")
                if total:
                    print("  Hint: compare the estimate's peak, not its total (a step's parts are not all alive "
                          "at once).")
            else:
                print("  Hint: try N = 1, 2, 3, ... and return the first whose estimate_per_gpu(...).peak fits.")
            return False
    print("Exercise 3: correct")
    return True

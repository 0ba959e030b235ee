"""bitsandbytes' 4-bit layers on a CPU with AVX-512 BF16: one path for every comparison.

On such a CPU (Intel Sapphire Rapids and later), a ``bitsandbytes.nn.Linear4bit``
that runs in eval mode on an input without gradients repacks its weight, once,
for a fused kernel that computes in bfloat16 (``Linear4bit.forward``, the
``support_avx512bf16_for_cpu`` test). Its outputs then differ from the same
layer's in training, and from the course's layer, by bfloat16's rounding (about
1e-3 relative) rather than float32's. On other CPUs, and on a GPU, the layer has
one path. :func:`keep_compute_dtype_path` turns the repacking off, so that a
reloaded model computes in its compute dtype as the model it is compared with did.
"""

from __future__ import annotations

from torch import nn


def keep_compute_dtype_path(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' bfloat16 CPU inference kernel in every 4-bit layer
    of ``model`` (in place; returns ``model``). A layer that has already repacked
    its weight keeps it: call this before the first forward pass."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model

"""DoRA and QDoRA: a length and a direction for every weight row (appendix, chapter 09).

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits
each weight row into a length and a direction, and trains them separately::

    W' = m * (W0 + s B A) / ||W0 + s B A||          (norm of each output row)

``m`` (one number per output feature, initialised to ``||W0||``) is trained
directly, the direction through LoRA's ``B A``. Following the paper (Sec. 4.3)
and peft, the norm is treated as a constant in backward, so no gradient flows
through it. With ``W0`` frozen in 4 bits this is QDoRA (Answer.AI, 2024):
:class:`DoRALinear` wraps :class:`qlora_lab.qlora.LinearNF4` exactly as it wraps
``nn.Linear`` and costs ``out_features`` extra parameters per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora_lab.lora import LoRALinear
from qlora_lab.qlora import LinearNF4
from qlora_lab.support.modules import replace_module

__all__ = ["DoRALinear", "add_dora", "dense_weight", "short_training"]


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The frozen weight as a float tensor: dequantized for a :class:`LinearNF4`."""
    if isinstance(base, LinearNF4):
        return base.dequantized_weight()
    return base.weight


class DoRALinear(LoRALinear):
    """A LoRA layer with DoRA's trained magnitude (see the module docstring).

    ``forward(x) = (m / ||W0 + s B A||) * (base(x) + s B A x)``, the norm
    computed per output row and detached; with ``B = 0`` and ``m = ||W0||`` it
    is exactly ``base(x)``. ``magnitude`` is the extra trained vector.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(base, r, alpha, dropout, adapter_dtype)
        if getattr(base, "bias", None) is not None:
            raise ValueError("DoRALinear handles layers without a bias (as in Llama); this layer has one")
        with torch.no_grad():
            norm = dense_weight(base).float().norm(dim=1).to(adapter_dtype)
        self.magnitude = nn.Parameter(norm)

    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||`` of each output row, without gradient (DoRA Sec. 4.3)."""
        with torch.no_grad():
            weight = dense_weight(self.base).to(self.lora_A.dtype) + self.scaling * (self.lora_B @ self.lora_A)
            return weight.norm(dim=1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base(x, *args, **kwargs)
        if self.merged:
            return base
        dtype = base.dtype
        x = x.to(self.lora_A.dtype)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        scale = self.magnitude / self.weight_norm()
        return (scale * (base.to(update.dtype) + update)).to(dtype)

    def merge(self) -> None:
        """Fold the adapter into a dense base weight, as peft does:
        ``W0 <- (m / ||W0 + s B A||) * (W0 + s B A)``, row by row; afterwards
        the forward pass is just ``base(x)``. A 4-bit base must be dequantized
        first (:func:`qlora_lab.after.export.dequantize_model`): the merged weight
        is not ``W0`` plus something, so it cannot be added to the packed codes."""
        if self.merged:
            raise RuntimeError("This DoRA adapter is already merged; call unmerge() before merging again.")
        weight = self._dense_base_weight()
        with torch.no_grad():
            self.merge_factor = (self.magnitude / self.weight_norm()).detach()
            merged = (weight.to(self.lora_A.dtype) + self.delta_weight()) * self.merge_factor[:, None]
            weight.data = merged.to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 <- W / factor - s B A`` with the factor kept by :meth:`merge`
        (restores ``W0`` up to rounding, not bit for bit)."""
        if not self.merged:
            raise RuntimeError("This DoRA adapter is not merged, so there is nothing to unmerge.")
        weight = self._dense_base_weight()
        with torch.no_grad():
            restored = weight.to(self.lora_A.dtype) / self.merge_factor[:, None] - self.delta_weight()
            weight.data = restored.to(weight.dtype)
        del self.merge_factor
        self.merged = False

    def _dense_base_weight(self) -> nn.Parameter:
        weight = getattr(self.base, "weight", None)
        if not (isinstance(weight, nn.Parameter) and weight.dtype.is_floating_point):
            raise TypeError(f"Merging DoRA needs a base layer with a dense floating-point weight, and this "
                            f"{type(self.base).__name__} has none; dequantize a 4-bit base first "
                            f"(qlora_lab.after.export.dequantize_model).")
        return weight


def add_dora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")) -> int:
    """Freeze ``model`` and wrap every ``nn.Linear``/``LinearNF4`` whose name
    ends with one of ``target_modules`` in a :class:`DoRALinear`, in place.
    Returns the number of layers wrapped."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, LinearNF4)) and name.rsplit(".", 1)[-1] in target_modules]
    if not names:
        raise ValueError(f"no linear layer of the model is named like {target_modules}")
    for name in names:
        replace_module(model, name, DoRALinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout))
    return len(names)


def short_training(model: nn.Module, batches: list[dict], lr: float = 1e-3) -> list[float]:
    """One AdamW step per batch (``input_ids``, ``attention_mask``, ``labels``)
    on the trainable parameters; the losses, for side-by-side comparisons."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=False)
    losses = []
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses

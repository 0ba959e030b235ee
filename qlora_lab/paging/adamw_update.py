"""AdamW's update of one parameter, operation for operation as PyTorch does it,
and the hyperparameters it accepts: the arithmetic of
:class:`qlora_lab.paging.paged_adamw.PagedAdamW` (chapter 06).

``torch.optim.AdamW``'s single-tensor path (``torch/optim/adam.py``,
``_single_tensor_adam`` with ``decoupled_weight_decay=True``) is::

    step += 1
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)

The same operations in the same order round the same way, so an optimizer that
applies :func:`adamw_update` to its moments, wherever it keeps them between
steps, updates the parameters bit for bit as ``torch.optim.AdamW(foreach=False)``
does (on CPU that is torch's default; on CUDA torch defaults to the ``foreach``
kernels, which round differently).
"""

from __future__ import annotations

import torch

__all__ = ["adamw_update", "check_hyperparameters", "scalar_dtype"]


def scalar_dtype() -> torch.dtype:
    """The dtype of Adam's ``step`` tensor (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """``torch.optim.Adam``'s checks, with its messages; and Python floats
    only (torch also takes tensors for ``lr`` and ``betas``)."""
    if isinstance(lr, torch.Tensor) or any(isinstance(b, torch.Tensor) for b in betas):
        raise TypeError("PagedAdamW takes lr and betas as Python floats (lr.item()), not tensors")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def adamw_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step_t: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """One parameter's AdamW update, in the order of torch's
    ``_single_tensor_adam`` (capturable=False, differentiable=False,
    decoupled_weight_decay=True, amsgrad=False, maximize=False); ``p``, the
    two moments and ``step_t`` are updated in place."""
    step_t += 1
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)

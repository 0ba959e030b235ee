"""A training run on a device with a budget: where the memory of a step goes,
and the spike that paging absorbs (chapter 06; QLoRA, Sec. 3).

To put a whole training run on the simulated device, :class:`ActivationMeter`
measures what a forward pass saves for backward (and can allocate each saved
tensor in a pool as it is saved), :func:`hold_model` puts a model's weights
and adapters in a pool, and :func:`training_steps` trains batch by batch,
charging activations, gradients and (through :class:`qlora_lab.paging.paged_adamw.PagedAdamW`) the
optimizer state, and reports each step as a :class:`StepTrace`.

A step peaks either when the backward pass begins (every activation, no
gradient yet) or in the optimizer step (every gradient, no activation): the
model of chapter 03's estimate, here charged allocation by allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from qlora_lab.paging.device_pool import Block, DevicePool, format_size
from qlora_lab.paging.pager import Pager
from qlora_lab.support.counting import distinct_tensors, tensor_bytes

__all__ = ["ActivationMeter", "StepTrace", "hold_model", "parameter_bytes", "training_steps"]


def _identity(t: Any) -> Any:
    return t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class ActivationMeter:
    """The activation memory of a forward pass: every tensor that autograd
    saves for the backward pass, counted once per storage, at the moment it
    is saved (``torch.autograd.graph.saved_tensors_hooks``).

    The saved tensors are what stays alive from the forward pass to the
    backward pass on top of the weights; they grow with batch size and
    sequence length, which is where a training run's memory spikes come from
    (QLoRA, Sec. 3, "Paged Optimizers"). Not counted: storages of the tensors
    in ``exclude`` (pass the model: its parameters and buffers are the
    weights, counted elsewhere), a storage saved a second time, and
    temporary buffers that the forward pass frees again without saving them.

    With a ``pool``, every newly saved storage is also allocated in the pool
    for ``owner`` as it is saved, and held until :meth:`release` (call it
    after ``backward()``, which frees them). On a full pool this is where a
    GPU runs out of memory: in the middle of the forward pass, with
    :class:`DeviceOutOfMemoryError` (the meter then gives back what it held);
    a registered pager is asked to evict first.

    One recording per forward pass::

        meter = ActivationMeter(model, pool=pool)
        with meter:
            loss = model(**batch).loss
        meter.nbytes, meter.tensors      # bytes and storages saved
        loss.backward()
        meter.release()

    ``exclude`` is read when the meter is made: make it after the model is
    in its final form (4-bit layers and adapters in place).
    """

    def __init__(self, exclude: torch.nn.Module | Iterable[torch.Tensor] = (), *,
                 pool: DevicePool | None = None, owner: str = "activations") -> None:
        if isinstance(exclude, torch.nn.Module):
            excluded = [*exclude.parameters(), *exclude.buffers()]
        elif isinstance(exclude, torch.Tensor):
            excluded = [exclude]
        else:
            excluded = list(exclude)
            for t in excluded:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"exclude takes a torch module or tensors, got a {type(t).__name__} in it")
        if pool is not None and not isinstance(pool, DevicePool):
            raise TypeError(f"pool must be a DevicePool, got {type(pool).__name__}")
        self._excluded = {_storage_key(t) for t in excluded if t.layout == torch.strided}
        self.pool = pool
        self.owner = owner
        self.nbytes = 0
        self.tensors = 0
        self._seen: set[tuple[str, int]] = set()
        self._blocks: list[Block] = []
        self._hooks: Any = None

    def __repr__(self) -> str:
        return f"ActivationMeter({self.tensors} storages, {format_size(self.nbytes)})"

    def __enter__(self) -> ActivationMeter:
        if self._hooks is not None:
            raise RuntimeError("this ActivationMeter is already recording")
        if self._blocks:
            raise RuntimeError("the last recording still holds its pool blocks; call release() after "
                               "backward() before recording the next forward pass")
        self.nbytes = 0
        self.tensors = 0
        self._seen.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _identity)
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            self.release()
        return False

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided:  # sparse and other layouts: count the tensor itself
            key, nbytes = ("tensor", id(t)), tensor_bytes(t)
        else:
            key, nbytes = _storage_key(t), t.untyped_storage().nbytes()
        if nbytes == 0 or key in self._excluded or key in self._seen:
            return t
        if self.pool is not None:
            self._blocks.append(self.pool.allocate(nbytes, self.owner,
                                                   label=f"saved {tuple(t.shape)} {t.dtype}"))
        self._seen.add(key)
        self.nbytes += nbytes
        self.tensors += 1
        return t

    def release(self) -> None:
        """Give the blocks held in the pool back (after ``backward()``, or when
        the forward pass failed). ``nbytes`` and ``tensors`` keep their values."""
        blocks, self._blocks = self._blocks, []
        for block in blocks:
            self.pool.free(block)  # type: ignore[union-attr]


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of a model's tensors, split the way a finetuning step sees them:
    ``"weights"``, the frozen parameters and all buffers (the packed 4-bit
    weights of :class:`qlora_lab.qlora.LinearNF4` are buffers), and
    ``"adapters"``, the trainable parameters. Each tensor counts once (a
    tied output head shares the embedding's)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parameter_bytes takes a torch module, got {type(model).__name__}")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    out = {"weights": 0, "adapters": 0}
    for t in distinct_tensors([*model.parameters(), *model.buffers()]):
        out["adapters" if id(t) in trainable else "weights"] += tensor_bytes(t)
    return out


def hold_model(pool: DevicePool, model: torch.nn.Module) -> list[Block]:
    """Put a model "on the device": allocate its frozen weights (owner
    ``"weights"``) and trainable parameters (``"adapters"``) in ``pool``
    (:func:`parameter_bytes`). They stay for the whole run, as a model moved
    to a GPU does; returns the two blocks (``pool.free`` them to take it off)."""
    if not isinstance(pool, DevicePool):
        raise TypeError(f"hold_model takes a DevicePool, got {type(pool).__name__}")
    sizes = parameter_bytes(model)
    blocks = [pool.allocate(sizes["weights"], "weights", label="model weights")]
    try:
        blocks.append(pool.allocate(sizes["adapters"], "adapters", label="trainable parameters"))
    except BaseException:
        pool.free(blocks[0])
        raise
    return blocks


@dataclass
class StepTrace:
    """One step of :func:`training_steps`: its loss, its activation memory,
    and the device memory by owner at the two high points of a step.

    ``at_backward``: when the backward pass begins (every activation saved,
    no gradient yet); ``at_update``: during the optimizer step (the
    gradients, no activation). A step peaks at one of the two (the model
    of chapter 03: activations and gradients are never all alive at once).
    Both are empty without a pool. ``counters``: what the optimizer's pager
    moved during the step (empty for an optimizer without one).
    """

    step: int
    tokens: int
    loss: float
    activation_bytes: int
    activation_tensors: int
    at_backward: dict[str, int]
    at_update: dict[str, int]
    peak: int
    counters: dict[str, int]


def _default_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _counters(optimizer: Optimizer) -> dict[str, int]:
    pager = getattr(optimizer, "pager", None)
    return pager.counters.as_dict() if isinstance(pager, Pager) else {}


def training_steps(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], optimizer: Optimizer,
                   pool: DevicePool | None = None, *,
                   loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                   ) -> Iterator[StepTrace]:
    """Train ``model`` one batch at a time and yield a :class:`StepTrace` per
    step, charging the step's memory to ``pool`` (a simulated GPU) as a GPU
    would see it.

    Each step: the forward pass (``loss_fn(model, batch)``, default
    ``model(**batch).loss``) inside an :class:`ActivationMeter` that
    allocates every saved tensor in the pool ("activations"); the backward
    pass; the activations are freed and the gradients of the trainable
    parameters are allocated ("gradients"); ``optimizer.step()`` (a
    :class:`PagedAdamW` on the same pool allocates and prefetches its pages
    there, "optimizer"); ``optimizer.zero_grad(set_to_none=True)`` frees the
    gradients. Put the model in the pool first (:func:`hold_model`).

    When the pool runs out, :class:`DeviceOutOfMemoryError` propagates out of
    the loop, as a CUDA out-of-memory error ends a training run, after the
    step's activations and gradients were given back. Without a pool nothing
    is charged, and the steps are the plain training loop (the activations
    are still measured).
    """
    if pool is not None and not isinstance(pool, DevicePool):
        raise TypeError(f"pool must be a DevicePool, got {type(pool).__name__}")
    loss_fn = loss_fn or _default_loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=True); add adapters first")
    gradient_bytes = sum(tensor_bytes(p) for p in trainable)
    meter = ActivationMeter(model, pool=pool)
    for step, batch in enumerate(batches):
        before = _counters(optimizer)
        if pool is not None:
            pool.reset_peak()
        gradients: Block | None = None
        try:
            with meter:
                loss = loss_fn(model, batch)
            at_backward = pool.usage() if pool is not None else {}
            loss.backward()
            meter.release()
            if pool is not None:
                gradients = pool.allocate(gradient_bytes, "gradients", label=f"gradients of step {step}")
            optimizer.step()
            at_update = pool.usage() if pool is not None else {}
        finally:
            meter.release()
            optimizer.zero_grad(set_to_none=True)
            if gradients is not None:
                pool.free(gradients)  # type: ignore[union-attr]
        after = _counters(optimizer)
        ids = batch.get("input_ids")
        yield StepTrace(
            step=step,
            tokens=ids.numel() if isinstance(ids, torch.Tensor) else 0,
            loss=loss.item(),
            activation_bytes=meter.nbytes,
            activation_tensors=meter.tensors,
            at_backward=at_backward,
            at_update=at_update,
            peak=pool.peak if pool is not None else 0,
            counters={k: after[k] - before[k] for k in after},
        )

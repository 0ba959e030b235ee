"""Paged optimizers: optimizer state that steps aside when memory runs out.

QLoRA, Sec. 3 ("Paged Optimizers"): a finetuning step's memory is not flat.
One batch with a long sequence needs far more activation memory than the
average batch, and on a GPU that is already full such a spike ends the run with
an out-of-memory error. The paper allocates the optimizer state (Adam's two
moments) in NVIDIA *unified memory*: the driver then moves that memory page by
page between GPU and CPU RAM on its own, evicting pages to CPU RAM when the GPU
runs out and bringing them back when the optimizer update needs them, the way
an operating system pages RAM out to disk.

The real thing, on CUDA (read in bitsandbytes 0.50.2). The driver's side,
``cudaMallocManaged`` memory and ``cudaMemPrefetchAsync``, is described in
:mod:`qlora_lab.paging.pager`; the optimizer's side:

* ``bitsandbytes.optim.PagedAdamW32bit`` / ``PagedAdamW8bit`` (and
  ``PagedAdamW``) are the ordinary 32-bit / 8-bit AdamW with ``is_paged=True``.
  ``Optimizer8bit.get_state_buffer`` makes the state paged only for
  parameters with at least 1e5 elements (smaller ones, such as the LoRA
  matrices of a small model, get plain ``torch.zeros_like`` GPU memory);
  ``Optimizer8bit.step`` calls ``prefetch_state(p)``
  (``prefetch_tensor`` on ``state1`` and ``state2``) right before
  ``update_step`` for each parameter.
* On CPU, bitsandbytes falls back to non-paged state. Verified here: the
  first ``step()`` warns ``UserWarning: Paged optimizers are not supported on
  CPU. Falling back to non-paged optimizer behavior.`` and the state is a
  plain ``torch.zeros_like`` tensor.

This module builds the same mechanism in plain PyTorch so that every move can
be watched: :class:`PagedAdamW` keeps ``exp_avg`` and ``exp_avg_sq`` in
fixed-size pages (:class:`qlora_lab.paging.paged_tensor.PagedTensor`) managed by
a :class:`qlora_lab.paging.pager.Pager`. The pages' "device" is a
:class:`qlora_lab.paging.device_pool.DevicePool`, a byte budget with an allocator.
On CPU the pool simulates a GPU's memory; on CUDA it hands out real GPU
memory under the budget and host pages are pinned CPU memory. Other users
(the activations of a long batch) allocate from the same pool; when it is
full, the pool asks the pager to give pages back, least recently used first
(our policy; the driver's choice of victims is its own).
Without paging the same allocation raises :class:`DeviceOutOfMemoryError`,
worded like PyTorch's CUDA out-of-memory error.

Two differences from the hardware are deliberate and documented where they
occur: the pool has no fragmentation (any free bytes can serve any
allocation), and the update kernel reads a parameter's pages through a
contiguous workspace (unified memory gives the kernel one contiguous virtual
range; here the pages are separate tensors). The arithmetic is
:func:`qlora_lab.paging.adamw_update.adamw_update`, ``torch.optim.AdamW``'s
single-tensor path operation for operation, so the updates are bit-for-bit
those of ``torch.optim.AdamW(foreach=False)`` whatever the budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from qlora_lab.paging.adamw_update import adamw_update, check_hyperparameters, scalar_dtype
from qlora_lab.paging.device_pool import DevicePool, format_size
from qlora_lab.paging.paged_tensor import DEFAULT_PAGE_BYTES, PagedTensor
from qlora_lab.paging.pager import Pager, PagingCounters
from qlora_lab.support.checks import check_nbytes

__all__ = ["PagedAdamW"]


class PagedAdamW(Optimizer):
    """AdamW whose state (``exp_avg``, ``exp_avg_sq``) lives in pages that
    move between a device budget and host memory (QLoRA, Sec. 3, "Paged
    Optimizers"; bitsandbytes' ``PagedAdamW32bit`` on CUDA).

    The update of each parameter is
    :func:`qlora_lab.paging.adamw_update.adamw_update`, ``torch.optim.AdamW``'s
    single-tensor path operation for operation, so the parameters equal
    ``torch.optim.AdamW(foreach=False)``'s bit for bit at any budget (on CPU
    that is torch's default; on CUDA torch defaults to the ``foreach``
    kernels, which round differently). Parameters whose ``grad`` is ``None``
    are skipped, as in torch.

    Per parameter, as bitsandbytes does it: create the state on the first
    step (zero pages, on the device), prefetch its pages, update, and leave
    the pages on the device until something needs the room.

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        page_bytes: the page size (a multiple of the parameters' element size).
        device_budget_bytes: the device memory the state may use. ``None``: no
            limit on CPU, the free GPU memory on CUDA. A pool of this size is
            created for the optimizer alone.
        pool: instead of a budget, a :class:`DevicePool` shared with other
            users (activations), so that they compete for the same memory.
        paging: ``False`` keeps every page on the device (never evicted): an
            ordinary optimizer's state, for comparison.
        prefetch: ``False`` brings pages in as page faults instead of
            prefetches (same data movement, counted as ``faults``).

    The state dict has ``torch.optim.AdamW``'s format (``step``, ``exp_avg``,
    ``exp_avg_sq`` tensors per parameter, the same group keys), so a
    checkpoint loads into either optimizer. ``optimizer.state[p]["exp_avg"]``
    is a :class:`PagedTensor`; ``.read()`` gives its values.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                 device_budget_bytes: int | None = None, pool: DevicePool | None = None,
                 paging: bool = True, prefetch: bool = True) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        check_nbytes(page_bytes, "page_bytes")
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be a positive number of bytes, got {page_bytes}; "
                             f"the default is {DEFAULT_PAGE_BYTES}")
        if pool is not None:
            if not isinstance(pool, DevicePool):
                raise TypeError(f"pool must be a DevicePool, got {type(pool).__name__}")
            if device_budget_bytes is not None:
                raise ValueError("pass either device_budget_bytes (a pool is made for the optimizer) "
                                 "or pool (a shared DevicePool with its own capacity), not both")
        elif device_budget_bytes is not None:
            check_nbytes(device_budget_bytes, "device_budget_bytes")
            if device_budget_bytes <= 0:
                raise ValueError(f"device_budget_bytes must be positive (or None for no limit), "
                                 f"got {device_budget_bytes}")
        budget = pool.capacity if pool is not None else device_budget_bytes
        if budget is not None and budget < page_bytes:
            raise ValueError(
                f"the device budget ({budget} bytes) is smaller than one page (page_bytes={page_bytes}): "
                "not a single page of optimizer state would fit. Raise the budget or use smaller pages."
            )

        self.page_bytes = page_bytes
        self._pool_arg = pool
        self._budget_arg = device_budget_bytes
        self._paging = paging
        self._prefetch = prefetch
        self.pager: Pager | None = None  # made once the parameters' device is known
        self._param_index: dict[int, int] = {}
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            # torch.optim.AdamW's other group keys, fixed, so state dicts match
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
            "differentiable": False, "fused": None, "decoupled_weight_decay": True,
        }
        super().__init__(params, defaults)

    @property
    def pool(self) -> DevicePool:
        """The device memory the pages live in."""
        assert self.pager is not None
        return self.pager.pool

    @property
    def counters(self) -> PagingCounters:
        """Pages and bytes moved so far (see :class:`PagingCounters`)."""
        assert self.pager is not None
        return self.pager.counters

    def reset_counters(self) -> None:
        assert self.pager is not None
        self.pager.counters = PagingCounters()

    def state_pages(self, p: torch.Tensor) -> int:
        """How many pages ``p``'s state takes (``exp_avg`` and ``exp_avg_sq``)."""
        per_page = self.page_bytes // p.element_size()
        return 2 * -(-p.numel() // per_page)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                self._check_param(p)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self.pager is None:
            self._make_pager(group["params"][0].device if group["params"] else torch.device("cpu"))
        for p in group["params"]:
            self._param_index[id(p)] = len(self._param_index)

    def _check_param(self, p: torch.Tensor) -> None:
        if not torch.is_floating_point(p):
            raise TypeError(f"PagedAdamW optimizes floating-point parameters, got {p.dtype}")
        if self.page_bytes % p.element_size():
            raise ValueError(f"page_bytes={self.page_bytes} is not a multiple of the {p.element_size()}-byte "
                             f"elements of a {p.dtype} parameter; use a multiple of {p.element_size()}")
        if self.pager is not None and p.device.type != self.pool.torch_device.type:
            raise ValueError(f"a parameter on {p.device} cannot use a pool on {self.pool.torch_device}; "
                             "keep all parameters on one device")
        budget = self._pool_arg.capacity if self._pool_arg is not None else self._budget_arg
        if budget is not None:
            need = self.state_pages(p) * self.page_bytes
            if need > budget:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} ({p.dtype}) needs {need} bytes "
                    f"({format_size(need)}) of Adam state on the device at once (exp_avg and exp_avg_sq, "
                    f"{self.state_pages(p)} pages of {self.page_bytes} bytes), but the whole device budget "
                    f"is {budget} bytes ({format_size(budget)}). Raise the budget to at least {need} bytes."
                )

    def _make_pager(self, device: torch.device) -> None:
        pool = self._pool_arg
        if pool is None:
            pool = DevicePool(self._budget_arg, torch_device="cuda" if device.type == "cuda" else "cpu")
        elif pool.torch_device.type != device.type:
            raise ValueError(f"the parameters are on {device} but the pool is on {pool.torch_device}")
        self.pager = Pager(pool, self.page_bytes, paging=self._paging, prefetch=self._prefetch)

    def _label(self, p: torch.Tensor, key: str) -> str:
        return f"p{self._param_index[id(p)]}.{key}"

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pager = self.pager
        assert pager is not None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients (nor does AdamW); "
                                       "consider torch.optim.SparseAdam")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                paged = (state["exp_avg"], state["exp_avg_sq"])
                try:
                    pager.acquire(paged)
                    exp_avg = state["exp_avg"].gather(p)
                    exp_avg_sq = state["exp_avg_sq"].gather(p)
                    adamw_update(p, p.grad, exp_avg, exp_avg_sq, state["step"], lr=group["lr"],
                                 beta1=beta1, beta2=beta2, eps=group["eps"],
                                 weight_decay=group["weight_decay"])
                    state["exp_avg"].scatter(exp_avg)
                    state["exp_avg_sq"].scatter(exp_avg_sq)
                finally:
                    pager.release(paged)
        return loss

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Zero state on the device, as torch's lazy initialization (and
        bitsandbytes' ``init_state``) does; nothing is kept if it fails."""
        assert self.pager is not None
        exp_avg = self.pager.create(p.shape, p.dtype, self._label(p, "exp_avg"))
        try:
            exp_avg_sq = self.pager.create(p.shape, p.dtype, self._label(p, "exp_avg_sq"))
        except BaseException:
            self.pager.drop(exp_avg)
            raise
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        state["exp_avg"] = exp_avg
        state["exp_avg_sq"] = exp_avg_sq

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.AdamW``'s format: the pages read back into tensors
        shaped like the parameters (no page moves). Unlike torch's, the
        returned tensors are copies (``step`` too): a snapshot."""
        packed = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index, values in packed["state"].items():
            p = params[index]
            state[index] = {key: (v.read(like=p) if isinstance(v, PagedTensor) else v.clone())
                            for key, v in values.items()}
        return {"state": state, "param_groups": packed["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of ``torch.optim.AdamW``. The
        loaded pages start in host memory (paging) and are prefetched on the
        next step; without paging they go straight to the device."""
        for group in state_dict["param_groups"]:
            for key in ("amsgrad", "maximize", "capturable", "differentiable"):
                if group.get(key, False):
                    raise ValueError(f"cannot load a state dict with {key}=True: PagedAdamW implements "
                                     "plain AdamW only")
        assert self.pager is not None
        for values in self.state.values():
            for v in values.values():
                if isinstance(v, PagedTensor):
                    self.pager.drop(v)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
            for p in group["params"]:
                values = self.state.get(p)
                if not values:
                    continue
                # torch's load_state_dict keeps the caller's "step" tensor; a
                # private copy keeps our in-place `step += 1` out of the caller's dict
                values["step"] = values["step"].clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    values[key] = self.pager.adopt(values[key], self._label(p, key), like=p)

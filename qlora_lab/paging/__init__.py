"""Paged optimizers: optimizer state that steps aside when memory runs out
(chapter 06; QLoRA Sec. 3, "Paged Optimizers").

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.paging.device_pool`: a device's memory as a byte budget
   with an allocator, the "GPU" of the chapter.
2. :mod:`qlora_lab.paging.paged_tensor`: a tensor stored in fixed-size pages,
   each on the device or in host memory.
3. :mod:`qlora_lab.paging.pager`: pages that move between device and host, as
   the CUDA driver moves ``cudaMallocManaged`` memory.
4. :mod:`qlora_lab.paging.adamw_update`: AdamW's update of one parameter,
   operation for operation as ``torch.optim.AdamW`` computes it.
5. :mod:`qlora_lab.paging.paged_adamw`: :class:`PagedAdamW`, an AdamW whose
   states live in pages, bit for bit ``torch.optim.AdamW``.
6. :mod:`qlora_lab.paging.state_bytes`: the bytes of any optimizer's state
   (torch's, paged, bitsandbytes' 8-bit): paging moves memory, it does not
   save it.
7. :mod:`qlora_lab.paging.simulated_run`: a training run on the budgeted
   device: where a step's memory goes, and the spike that paging absorbs.

Import the module you read: ``from qlora_lab.paging.paged_adamw import PagedAdamW``.
"""

"""Beyond one GPU and beyond QLoRA (appendix, chapter 09).

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.beyond.distributed`: one process per device: torchrun's
   environment, the process group (gloo on CPUs, nccl on GPUs), launching.
2. :mod:`qlora_lab.beyond.fsdp`: FSDP2 with the 4-bit weights sharded as
   parameters, and the course's one training loop run by N processes.
3. :mod:`qlora_lab.beyond.sharded_adapter`: the adapter of a sharded run,
   gathered whole and written once in peft's format, and read back into shards.
4. :mod:`qlora_lab.beyond.fits`: what one GPU holds under FSDP-QLoRA
   (chapter 03's estimate shared by N GPUs, :func:`estimate_per_gpu`), so
   that a 70B model is finetuned on two 24 GB cards.
5. :mod:`qlora_lab.beyond.dora`: DoRA / QDoRA, a trained length and a LoRA
   direction for every weight row.
6. :mod:`qlora_lab.beyond.loftq`: LoftQ, a 4-bit weight and an adapter chosen
   together so that training starts without the whole quantization error.

Import the module you read: ``from qlora_lab.beyond import fsdp``.
"""

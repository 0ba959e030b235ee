"""Finetuning with the Guanaco recipe (chapter 07; QLoRA Sec. 5 and Appendix B).

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.finetune.data`: instruction data, loaded and checked line by
   line before anything trains.
2. :mod:`qlora_lab.finetune.hub_data`: the hub's data sets (the paper's Guanaco
   set, OASST1, Alpaca, chat messages) turned into the same records.
3. :mod:`qlora_lab.finetune.chat_format`: the chat template, and labels on the
   answers (or on every token); truncation.
4. :mod:`qlora_lab.finetune.batching`: batches grouped by length, padding.
5. :mod:`qlora_lab.finetune.recipe`: every setting of a run as one dataclass,
   and the presets (SmolLM2 on a CPU, LLaMA-7B on a GPU).
6. :mod:`qlora_lab.finetune.backends`: the model to finetune, built from the
   course's layers or from bitsandbytes + peft.
7. :mod:`qlora_lab.finetune.streaming`: a checkpoint loaded straight into
   4 bits, one tensor at a time, so a 7B model never exists in 16 bits.
8. :mod:`qlora_lab.finetune.plan`: what a run will need before it starts (the
   dry run): GPU memory, host memory to load, which GPUs fit.
9. :mod:`qlora_lab.finetune.run_time`: how long a run will take, estimated from
   its arithmetic, and what a card's spare memory buys.
10. :mod:`qlora_lab.finetune.adapter_files`: the adapter on disk in peft's
    format, whichever backend trained it.
11. :mod:`qlora_lab.finetune.step`: the parts of a step: device, optimizer,
    learning-rate schedule, and the order of the batches as a pure function.
12. :mod:`qlora_lab.finetune.train`: the training loop, written once: gradient
    accumulation, clipping, checkpoints that resume bit for bit, in one
    process or (chapter 09) in N.
13. :mod:`qlora_lab.finetune.evaluate`: perplexity, evaluation loss, exact match.
14. :mod:`qlora_lab.finetune.mmlu`: MMLU 5-shot by the log-likelihood of the
    answer letter, the paper's benchmark for a 7B adapter.
15. :mod:`qlora_lab.finetune.judge`: a model as judge, its verdicts in both
    orders, and how far to trust them.
16. :mod:`qlora_lab.finetune.tournament`: games from the verdicts and Elo
    ratings over random orderings, the paper's chatbot evaluation in miniature.

Import the module you read: ``from qlora_lab.finetune.train import preset, train``.
"""

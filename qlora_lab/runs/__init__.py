"""The make targets' long runs, whose committed results the chapters read.

Each is a script as much as a module (``python -m qlora_lab.runs.<name>``):

1. :mod:`qlora_lab.runs.experiments`: ``make experiments``, QLoRA against
   16-bit LoRA on SmolLM2 (QLoRA Sec. 4, Tables 3-4 in miniature), chapter 07.
2. :mod:`qlora_lab.runs.rank_and_judge`: ``make rank-and-judge``, the adapters
   of several ranks and the judgements chapters 04 and 07 show.
3. :mod:`qlora_lab.runs.after_finetuning`: ``make after-finetuning``, chapter
   08's task adapters, their scores and the generation speeds.
4. :mod:`qlora_lab.runs.smoke`: ``make gpu-smoke``, both backends for a few
   steps on a GPU, each in a fresh process.
5. :mod:`qlora_lab.runs.gpu_check`: ``make gpu-check``, random models with 7B
   layer shapes on a GPU, offline: bits, memory, loss, paging, the adapter reloaded.
6. :mod:`qlora_lab.runs.mmlu_eval`: ``python -m qlora_lab mmlu``, MMLU 5-shot of
   a finetuned adapter (chapter 07's 7B path).
7. :mod:`qlora_lab.runs.after_commands`: ``chat``, ``export`` and
   ``after-finetuning`` on the command line (chapter 08).

Import the module you run: ``from qlora_lab.runs import experiments``.
"""

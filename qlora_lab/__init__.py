"""qlora-lab: QLoRA (Dettmers et al., 2023) built from first principles.

One module per idea of the paper, each checked against the production library:

==============================  ======================================================================  ======
module                          idea                                                                    chapter
==============================  ======================================================================  ======
``qlora_lab.models``            the course's models (SmolLM2 offline, tiny Llama, any model)            00
``qlora_lab.env_check``         is the environment what the course pins?                                00
``qlora_lab.floats``            float formats: sign, exponent, mantissa                                 01
``qlora_lab.int8``              absmax / zero-point int8, block-wise absmax                             01
``qlora_lab.llm_int8``          LLM.int8: vector-wise int8 with outliers                                01
``qlora_lab.blockwise``         blocks, absmax, scaling, nearest code, state                            01-03
``qlora_lab.nf4``               NormalFloat, FP4, Int4; block-wise 4-bit                                02
``qlora_lab.fake_quant``        a whole model's weights through a data type                             02, 03
``qlora_lab.evaluate``          perplexity, evaluation loss, exact match                                02, 07
``qlora_lab.double_quant``      quantizing the quantization constants                                   03
``qlora_lab.memory``            what finetuning costs, 7B to 65B                                        03
``qlora_lab.activations``       what autograd keeps for the backward pass                               03
``qlora_lab.memory_report``     the estimates as tables, the paper, a chart                             03
``qlora_lab.lora``              low-rank adapters (a package: layer, surgery, peft's format, counting)  04
``qlora_lab.subspace``          LoRA Sec. 7: subspace similarity, amplification                         04
``qlora_lab.qlora``             the QLoRA layer: frozen NF4 weight + LoRA                               05
``qlora_lab.device_pool``       a device's memory as a budget                                           06
``qlora_lab.pager``             pages that move between device and host                                 06
``qlora_lab.paged``             a paged AdamW surviving memory spikes                                   06
``qlora_lab.paged_step``        a training run on the simulated device                                  06
``qlora_lab.data``              instruction data, chat template, labels                                 07
``qlora_lab.recipe``            the Guanaco recipe's settings and presets                               07
``qlora_lab.train``             the training loop                                                       07
``qlora_lab.backends``          the course's layers or bitsandbytes + peft                              07
``qlora_lab.streaming``         loading a checkpoint straight into 4 bits                               07
``qlora_lab.smoke``             make gpu-smoke: both backends on a GPU                                  07
``qlora_lab.experiments``       QLoRA vs 16-bit LoRA, longer than CI allows                             07
``qlora_lab.judge``             pairwise judging and Elo, as the paper does                             07
``qlora_lab.rank_and_judge``    make rank-and-judge: chapters 04 and 07's runs                          04, 07
``qlora_lab.chat``              base + adapter: chat, switching adapters                                08
``qlora_lab.export``            merging; export to transformers and GGUF                                08
``qlora_lab.after_finetuning``  make after-finetuning: chapter 08's runs                                08
``qlora_lab.fsdp``              FSDP2 with 4-bit weights sharded as parameters                          09
``qlora_lab.after_qlora``       DoRA / QDoRA and LoftQ                                                  09
==============================  ======================================================================  ======

Submodules are imported on use (``from qlora_lab import nf4``), so importing
the package itself is cheap. Speed tricks live in ``qlora_lab.fast``, plumbing
(atomic writes, resuming, package files, quiet loading) in ``qlora_lab.support``,
the exercise checkers in ``qlora_lab.exercises``.
"""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend logs a warning at import when it cannot fetch an
# optional fused kernel from the Hugging Face Hub (always the case offline).
# Whether it tries depends on the CPU's instruction set, so the message would
# appear on some machines and not on others and make notebook outputs differ.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# tqdm.auto warns once per process, inside notebooks, that ipywidgets is not
# installed, and then falls back to plain text progress bars, which is what the
# course wants (text bars are what nbval can sanitize).
import warnings as _warnings

_warnings.filterwarnings("ignore", message="IProgress not found")

"""qlora-lab: QLoRA (Dettmers et al., 2023) built from first principles.

One folder a stage of the course; each folder's ``__init__`` names its chapter
and the order to read its modules in, one idea a module:

============  =================================================================  ==========
folder        stage                                                              chapter
============  =================================================================  ==========
``models``    the course's models: SmolLM2 offline, tiny Llamas, any model       00
``quant``     from a float to 4 bits: int8, LLM.int8, blocks, NF4, double quant  01-03
``memory``    what finetuning costs: the estimate, activations, a measured step  03
``lora``      low-rank adapters, equal to peft; what rank they need              04
``qlora``     the QLoRA layer: a frozen NF4 weight + LoRA (one module)           05
``paging``    a device's budget, pages, a paged AdamW, a simulated run           06
``finetune``  data, recipe, backends, streaming load, training, evaluation       07
``after``     chat with adapters, merging, export to transformers and GGUF       08
``beyond``    torchrun, FSDP with 4-bit weights, DoRA and LoftQ                  09
``runs``      the make targets' long runs, whose results the chapters read       04, 07, 08
============  =================================================================  ==========

Which modules each chapter's notebook uses is the README's chapter table
(checked against the notebooks by ``tests/repo/test_package_layout.py``).
``qlora_lab.env_check`` checks the environment (chapter 00); speed tricks live
in ``qlora_lab.fast``, plumbing (atomic writes, resuming, package files, quiet
loading) in ``qlora_lab.support``, the exercise checkers in
``qlora_lab.exercises``. Submodules are imported on use (``from
qlora_lab.quant import nf4``), so importing the package itself is cheap.
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

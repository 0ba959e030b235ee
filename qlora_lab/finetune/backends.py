"""Two ways to build the model QLoRA finetunes: the course's layers, or the
libraries practitioners run (chapter 07).

``qlora_lab``
    The course's own code: NF4 + double quantization by
    :func:`qlora_lab.quant.nf4.quantize_4bit` into :class:`qlora_lab.qlora.LinearNF4`
    layers (pure PyTorch: each forward and backward dequantizes the weight),
    LoRA by :func:`qlora_lab.lora.add_lora`. A checkpoint on disk is loaded by
    :func:`qlora_lab.finetune.streaming.load_quantized`, one tensor at a time, so the
    host never holds the 16-bit model. The default on the CPU, where it is also
    the faster of the two (``bench/train_step.py``).
``bitsandbytes``
    What the paper's released ``qlora.py`` runs: transformers quantizes while
    it loads (``BitsAndBytesConfig``: NF4, double quantization, the compute
    dtype), peft adds the LoRA adapters, and on CUDA bitsandbytes'
    ``PagedAdamW32bit`` steps them. Its 4-bit matmuls are bitsandbytes' CUDA
    kernels. The default on CUDA for a run that loads its model.

Chapter 05 proved that the two compute the same thing: given the same 4-bit
weights, the logits and every LoRA gradient are identical to the bit. Without
double quantization the weights themselves are identical (the course's
``quantize_4bit`` equals bitsandbytes' byte for byte), so a training run gives
the same losses on both backends; with it, bitsandbytes' CPU kernel picks
another 8-bit code for about 0.2 % of the block constants (chapter 03), and
the losses differ slightly (by 1e-6 to 5e-4 of their value, measured).
``tests/finetune/test_backends.py`` checks both statements on tiny-llama and SmolLM2.

For the adapters to start equal, :func:`peft_lora` can draw them as
:func:`qlora_lab.lora.add_lora` does: peft's rule is the same (A
Kaiming-uniform with ``a = sqrt(5)``, B zero, chapter 04), but peft first
builds each ``nn.Linear`` with its own initialisation, which takes other
numbers from the random stream.

Either backend's adapter is written and read in peft's format by
:mod:`qlora_lab.finetune.adapter_files`; what a run on either will need, before
it starts, is :mod:`qlora_lab.finetune.plan`'s.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from qlora_lab.finetune.chat_format import ensure_chat_template
from qlora_lab.finetune.recipe import GUANACO_7B

__all__ = [
    "BACKENDS",
    "bf16_full_model",
    "bitsandbytes_config",
    "bitsandbytes_qlora_model",
    "build_model",
    "check_backend",
    "compute_dtype",
    "peft_lora",
    "resolve_backend",
]

BACKENDS = ("qlora_lab", "bitsandbytes")
BITSANDBYTES_QUANT_TYPES = ("nf4", "fp4")
BITSANDBYTES_BLOCKSIZE = 64


# --------------------------------------------------------------------------- #
# Which backend
# --------------------------------------------------------------------------- #
def resolve_backend(name: str, device: torch.device, model_given: bool = False) -> str:
    """``"auto"``: ``bitsandbytes`` on CUDA when the run loads its model (the
    production path), ``qlora_lab`` on the CPU or for a model passed in
    memory (the course's layers quantize it in place). Other names as they are."""
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {name!r}; choose auto, {' or '.join(BACKENDS)}")
    if name != "auto":
        return name
    return "bitsandbytes" if torch.device(device).type == "cuda" and not model_given else "qlora_lab"


def compute_dtype(config, device: torch.device) -> torch.dtype:
    """The run's compute dtype: ``config.compute_dtype``, or for ``"auto"``
    bfloat16 on CUDA and float32 on a CPU (:func:`qlora_lab.qlora.default_compute_dtype`)."""
    if config.compute_dtype == "auto":
        from qlora_lab.qlora import default_compute_dtype

        return default_compute_dtype(device)
    return getattr(torch, config.compute_dtype)


def check_backend(config, backend: str) -> None:
    """A clear error for a setting the backend cannot run."""
    if backend != "bitsandbytes":
        return
    if config.method == "qlora" and config.quant_type not in BITSANDBYTES_QUANT_TYPES:
        raise ValueError(f"bitsandbytes' 4-bit types are {' and '.join(BITSANDBYTES_QUANT_TYPES)}; quant_type="
                         f"{config.quant_type!r} is the course's own (chapter 02): use --backend qlora_lab for it")
    if config.method == "qlora" and config.blocksize != BITSANDBYTES_BLOCKSIZE:
        raise ValueError(f"transformers' BitsAndBytesConfig quantizes in blocks of {BITSANDBYTES_BLOCKSIZE} and "
                         f"has no setting for another size; blocksize={config.blocksize} needs --backend qlora_lab")
    try:
        import qlora_lab  # noqa: F401  (before bitsandbytes)
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--backend bitsandbytes needs the bitsandbytes package, which does not import here "
                         f"({err}); use --backend qlora_lab") from err


# --------------------------------------------------------------------------- #
# The production libraries
# --------------------------------------------------------------------------- #
def bitsandbytes_config(quant_type: str = "nf4", double_quant: bool = True,
                        compute_dtype: torch.dtype = torch.bfloat16):
    """transformers' ``BitsAndBytesConfig`` for QLoRA (the paper's
    ``qlora.py``): 4-bit ``quant_type`` weights, double quantization of their
    constants, matmuls in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def peft_lora(model, r: int, alpha: float, dropout: float = 0.0, target_modules: str | list[str] = "all-linear",
              *, draw_like_add_lora: bool = False):
    """peft's LoRA on ``model`` (every other parameter frozen): a
    ``PeftModel``. With ``draw_like_add_lora`` the adapters are drawn as
    :func:`qlora_lab.lora.add_lora` draws them from the same random state
    (see the module docstring), so both backends start from the same adapters."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
                        task_type="CAUSAL_LM")
    if not draw_like_add_lora:
        return get_peft_model(model, config)
    cuda = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda):
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                torch.nn.init.kaiming_uniform_(module.lora_A["default"].weight, a=math.sqrt(5))
                torch.nn.init.zeros_(module.lora_B["default"].weight)
    return peft_model


def bitsandbytes_qlora_model(model_dir: str | os.PathLike | None = None, lora_r: int = GUANACO_7B.r,
                             lora_alpha: float = GUANACO_7B.lora_alpha,
                             compute_dtype: torch.dtype = torch.float32):
    """The QLoRA model as practitioners build it: the model in ``model_dir``
    (default: the cached SmolLM2) loaded by transformers in NF4 with double
    quantization (:func:`bitsandbytes_config`), weights outside the linear
    layers and compute in ``compute_dtype`` (fp32: the CPU-safe choice),
    then peft LoRA (no dropout) on every linear layer except the lm_head
    (:func:`peft_lora`). The reference of chapter 03's measurement and of
    ``bench/train_step.py``."""
    from qlora_lab.models import load_model, smollm2_cache_path

    model = load_model(str(model_dir or smollm2_cache_path()), dtype=compute_dtype, with_tokenizer=False,
                       quantization_config=bitsandbytes_config("nf4", True, compute_dtype))
    return peft_lora(model, lora_r, lora_alpha)


def bf16_full_model(model_dir: str | os.PathLike | None = None, lora_r: int | None = None,
                    lora_alpha: float | None = None):
    """The model in ``model_dir`` (default: the cached SmolLM2) in bfloat16,
    every parameter trainable: full 16-bit finetuning. ``lora_r`` and
    ``lora_alpha`` are ignored (the builder signature of
    :func:`qlora_lab.memory.measured_step.measure_training_step`)."""
    from qlora_lab.models import load_model, smollm2_cache_path

    model = load_model(str(model_dir or smollm2_cache_path()), dtype=torch.bfloat16, with_tokenizer=False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _load_bitsandbytes(config, device: torch.device, dtype: torch.dtype, model=None, tokenizer=None):
    """The base model quantized by transformers while it loads. A model in
    memory (tiny-llama, or one passed in) is written to a temporary directory
    first: transformers quantizes only while loading."""
    from qlora_lab.models import load_model

    quantization = (bitsandbytes_config(config.quant_type, config.double_quant, dtype)
                    if config.method == "qlora" else None)
    device_map = {"": device.index if device.index is not None else torch.cuda.current_device()} \
        if device.type == "cuda" else None
    # Loading must not move the run's random stream (the adapters are drawn from it next).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if model is None and config.model.lower() != "tiny-llama":
            model, tokenizer = load_model(config.model, dtype=dtype, quantization_config=quantization,
                                          device_map=device_map)
        else:
            if model is None:
                model, tokenizer = load_model("tiny-llama", dtype=dtype)
            name = model.name_or_path or config.model
            with tempfile.TemporaryDirectory(prefix="qlora-lab-bnb-") as tmp:
                model.save_pretrained(tmp)
                model = load_model(tmp, dtype=dtype, quantization_config=quantization, device_map=device_map,
                                   with_tokenizer=False)
            model.config._name_or_path = name
    if device.type == "cpu":
        for name, module in model.named_modules():
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                continue
            if module.in_features % BITSANDBYTES_BLOCKSIZE:
                raise ValueError(
                    f"{name} is {module.in_features} wide, not a multiple of {BITSANDBYTES_BLOCKSIZE}: bitsandbytes "
                    f"0.50.2's CPU kernel dequantizes such a layer wrongly (its rows end inside a block of "
                    f"{BITSANDBYTES_BLOCKSIZE}). Use --backend qlora_lab on the CPU for this model, or a GPU.")
            # On CPUs with AVX512-BF16, Linear4bit switches in eval mode to a
            # bfloat16 kernel that repacks its weight in place. Evaluation then
            # would not compute what training computes, and would differ
            # between CPUs: keep the one path.
            module.support_avx512bf16_for_cpu = False
    return model, tokenizer


# --------------------------------------------------------------------------- #
# Building the model of a run
# --------------------------------------------------------------------------- #
def build_model(config, device: torch.device, backend: str, model=None, tokenizer=None):
    """Load (unless given), quantize (for ``qlora``), add LoRA adapters and
    switch on gradient checkpointing, with ``backend``: ``(model, tokenizer)``.

    Everything that is not quantized is stored in the compute dtype (float32
    on a CPU, bfloat16 in the GPU recipe), as the paper's ``qlora.py`` loads
    it; adapters are float32 on both backends (peft up-casts them).
    """
    if model is not None and tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    check_backend(config, backend)
    dtype = compute_dtype(config, device)
    if backend == "bitsandbytes":
        model, tokenizer = _load_bitsandbytes(config, device, dtype, model, tokenizer)
        ensure_chat_template(tokenizer)
        model = peft_lora(model, config.r, config.lora_alpha, config.lora_dropout, config.target_modules,
                          draw_like_add_lora=True)
    else:
        model, tokenizer = _build_qlora_lab(config, device, dtype, model, tokenizer)
    model.config.use_cache = False  # a key/value cache serves generation, not training
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _build_qlora_lab(config, device: torch.device, dtype: torch.dtype, model, tokenizer):
    from qlora_lab.lora import add_lora
    from qlora_lab.models import checkpoint_directory, load_model
    from qlora_lab.qlora import quantize_model
    from qlora_lab.support.loading import quiet_loading

    quantized = False
    if model is None and config.method == "qlora" and config.model.lower() != "tiny-llama":
        from transformers import AutoTokenizer

        from qlora_lab.finetune.streaming import load_quantized

        directory = checkpoint_directory(config.model)
        model, _ = load_quantized(directory, dtype=dtype, device=device, quant_type=config.quant_type,
                                  double_quant=config.double_quant, blocksize=config.blocksize)
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(directory)
        quantized = True
    elif model is None:
        model, tokenizer = load_model(config.model, dtype=dtype)
    ensure_chat_template(tokenizer)
    if config.method == "qlora" and not quantized:
        # Quantize on the device, layer by layer: peak device memory stays near
        # the 4-bit size (the 16-bit model is only ever on the host).
        quantize_model(model, quant_type=config.quant_type, double_quant=config.double_quant,
                       blocksize=config.blocksize, compute_dtype=dtype, device=device)
    model.to(device)
    add_lora(model, r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
             target_modules=config.target_modules)
    return model, tokenizer

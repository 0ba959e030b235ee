"""Writing a Llama-architecture model as a GGUF file (llama.cpp's format), with
the ``gguf`` package that llama.cpp publishes.

A GGUF file is a header of key-value metadata (the architecture's sizes, the
tokenizer's vocabulary, merges, special tokens and chat template) followed by
named tensors, each in its own type. This module writes what llama.cpp's own
converter (``convert_hf_to_gguf.py``) writes for a ``LlamaForCausalLM`` with a
byte-level BPE tokenizer (SmolLM2's kind), and what transformers' GGUF loader
reads back:

* the tensor names of llama.cpp (``blk.N.attn_q.weight`` ...);
* the query and key weights permuted the way llama.cpp's rotary embedding
  expects (pairs of dimensions interleaved instead of split in halves);
  transformers undoes it when it loads;
* one-dimensional tensors (the RMSNorm weights) in float32, the matrices in
  float16 or Q8_0 (blocks of 32 weights with one float16 scale each:
  ``w = scale * q``, ``q`` an int8; 8.5 bits per weight).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

QUANT_TYPES = {"f16": "F16", "q8_0": "Q8_0"}
FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}

_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                "mlp.down_proj.weight": "ffn_down.weight"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for a transformers Llama parameter."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_KEY.match(name)
    if match and match[2] in _LAYER_NAMES:
        return f"blk.{match[1]}.{_LAYER_NAMES[match[2]]}"
    raise ValueError(f"{name!r} has no place in a llama GGUF file (only Llama models without biases are exported)")


def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation of a query or key projection (its converter's
    ``permute``): within each head, the first and second halves of the rows
    become interleaved pairs. transformers reverses it on load."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_llama(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"GGUF export writes the llama architecture; this model is {config.model_type!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"GGUF export handles Llama models without biases; this one has {flag}=True")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export handles the default rotary embedding; this model uses {rope.get('rope_type')!r}")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """Tokens (by id), their types, the BPE merges and the special token ids of
    a byte-level BPE tokenizer, as llama.cpp's ``gpt2`` tokenizer model stores them."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE" or backend.get("pre_tokenizer") is None:
        raise ValueError("GGUF export writes byte-level BPE tokenizers (the 'gpt2' model of llama.cpp, as SmolLM2's); "
                         f"this tokenizer is a {model.get('type')!r} model")
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = {t["id"] for t in backend.get("added_tokens", []) if t.get("special")}
    # 1 NORMAL, 3 CONTROL (special tokens), 5 UNUSED (padding rows of the embedding)
    types = [3 if i in special else 1 for i in range(n)]
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [5] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(model, tokenizer, path: str | os.PathLike, gguf_type: str = "f16", name: str = "model",
               tokenizer_pre: str = "default") -> Path:
    """Write ``model`` (a transformers ``LlamaForCausalLM``) and its tokenizer
    to the GGUF file ``path`` with the matrices in ``gguf_type`` (``"f16"`` or
    ``"q8_0"``). ``tokenizer_pre`` names llama.cpp's pre-tokenizer rule
    (``"smollm"`` for SmolLM2, the value in the file the course ships).
    The file must not exist yet."""
    import gguf

    if gguf_type not in QUANT_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {sorted(QUANT_TYPES)}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new file name")
    config = model.config
    _check_llama(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    state = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    vocab = tokenizer_metadata(tokenizer, vocab_size)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    qtype = getattr(gguf.GGMLQuantizationType, QUANT_TYPES[gguf_type])
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            array = permute_for_rope(array, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            array = permute_for_rope(array, config.num_key_value_heads)
        target = gguf_tensor_name(key)
        if array.ndim == 1:
            writer.add_tensor(target, array.astype(np.float32))
        elif gguf_type == "f16":
            writer.add_tensor(target, array.astype(np.float16))
        else:
            if array.shape[-1] % 32:
                raise ValueError(f"Q8_0 needs rows that are a multiple of 32 wide; {key} is {array.shape[-1]} wide")
            writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` read back from a GGUF file with transformers' GGUF
    loader (as :func:`qlora_lab.models.load_smollm2` reads the course's model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_lab.support.loading import quiet_loading

    path = Path(path)
    again = "export it again (python -m qlora_lab export --format gguf ...)"
    if not path.is_file():
        raise FileNotFoundError(f"there is no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); {again}")
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, IndexError, KeyError, OSError, EOFError, struct.error) as err:  # the reader on a file cut short
        raise ValueError(f"{path} is not a complete GGUF file ({type(err).__name__}: {str(err)[:200]}); {again}") from None
    return model.eval(), tokenizer

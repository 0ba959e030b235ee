"""Chapter 08, part 1: chatting with base + adapter, and switching adapters on one base.

A tiny Llama with a small BPE tokenizer (qlora_lab.models.tiny) stands in
for SmolLM2: what is tested (loading, streaming, the session's commands, switching,
equality with peft) does not depend on the model's size.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from qlora_lab import __main__ as cli
from qlora_lab.after.chat import AdapterSet, cpu_name, generation_speed, load_with_adapter, reply, chat_loop
from qlora_lab.lora import lora_modules
from qlora_lab.models import load_model
from qlora_lab.models.tiny import write_tiny_adapter, write_tiny_chat_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return (write_tiny_adapter(tiny_dir, root / "a", seed=1),
            write_tiny_adapter(tiny_dir, root / "b", seed=2, r=2, target_modules=("q_proj", "v_proj")))


def logits(model):
    with torch.no_grad():
        ids = torch.tensor([[5, 17, 40, 3, 99, 120, 7, 250, 11, 2]])
        return model(ids).logits


def test_prompt_answers_once_streaming_what_reply_returns(tiny_dir, adapters, capsys):
    assert cli.main(["chat", "--adapter", str(adapters[0]), "--prompt", "Hello! How are you?",
                     "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_with_adapter(adapters[0])  # the base the adapter names, in NF4
    expected = reply(model, tokenizer, "Hello! How are you?", max_new_tokens=12)
    assert expected and printed.strip() == expected


def test_streamed_pieces_add_up_to_the_reply(tiny_dir, adapters):
    model, tokenizer = load_with_adapter(adapters[0])
    pieces = []

    class Sink(io.StringIO):
        def write(self, text):
            pieces.append(text)
            return super().write(text)

    answer = reply(model, tokenizer, "Sort these words: pear, fig", max_new_tokens=10, stream=Sink())
    assert len([p for p in pieces if p]) >= 2, "the reply came in one piece, not streamed"
    assert "".join(pieces).strip() == answer


def test_session_reset_and_quit(tiny_dir, adapters):
    model, tokenizer = load_with_adapter(adapters[0])
    lines = iter(["Hello!", "/reset", "Convert the date", "/quit", "never read"])
    out = io.StringIO()
    conversation = chat_loop(model, tokenizer, read=lambda prompt: next(lines), out=out, max_new_tokens=4)
    assert [m["content"] for m in conversation if m["role"] == "user"] == ["Convert the date"]
    assert "(conversation reset)" in out.getvalue()
    assert next(lines) == "never read"
    # the end of input ends the session too
    assert chat_loop(model, tokenizer, read=lambda prompt: (_ for _ in ()).throw(EOFError), out=io.StringIO()) == []


def test_adapter_set_switches_on_one_base(tiny_dir, adapters):
    base, tokenizer = load_model(str(tiny_dir))
    from qlora_lab.qlora import quantize_model

    quantize_model(base)
    packed = {n: b.data_ptr() for n, b in base.named_buffers() if n.endswith(".weight")}
    plain = logits(base)
    bank = AdapterSet(base)
    bank.add("a", adapters[0])
    bank.add("b", adapters[1])
    assert bank.active is None and not lora_modules(base)
    assert torch.equal(logits(base), plain)
    for name, path in (("a", adapters[0]), ("b", adapters[1]), ("a", adapters[0])):
        bank.use(name)
        alone, _ = load_with_adapter(path)
        assert torch.equal(logits(base), logits(alone)), name
    assert not torch.equal(logits(bank.use("a")), logits(bank.use("b")))
    bank.use(None)
    assert torch.equal(logits(base), plain)
    # the 4-bit weights were never copied or reloaded
    assert {n: b.data_ptr() for n, b in base.named_buffers() if n.endswith(".weight")
            and "lora" not in n} == packed
    assert bank.adapter_bytes("a") > bank.adapter_bytes("b") > 0
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        bank.use("c")


def test_adapter_set_equals_peft_multi_adapter(tiny_dir, adapters):
    from peft import PeftModel

    base, _ = load_model(str(tiny_dir))
    peft_model = PeftModel.from_pretrained(load_model(str(tiny_dir), with_tokenizer=False), str(adapters[0]),
                                           adapter_name="a")
    peft_model.load_adapter(str(adapters[1]), adapter_name="b")
    bank = AdapterSet(base)
    bank.add("a", adapters[0])
    bank.add("b", adapters[1])
    for name in ("b", "a", "b"):
        peft_model.set_adapter(name)
        bank.use(name)
        assert torch.equal(logits(base), logits(peft_model)), name


def test_adapter_for_another_base_is_refused(tiny_dir, adapters, narrower_base, capsys):
    other_dir = narrower_base
    with pytest.raises(ValueError, match="does not fit this base model.*shape"):
        load_with_adapter(adapters[0], str(other_dir))
    other, tok = load_model(str(other_dir))
    with pytest.raises(ValueError, match="does not fit this base model"):
        AdapterSet(other).add("a", adapters[0])
    assert not lora_modules(other)  # nothing was changed
    assert cli.main(["chat", "--adapter", str(adapters[0]), "--model", str(other_dir), "--prompt", "hi"]) == 2
    assert "does not fit this base model" in capsys.readouterr().err


def test_model_directory_without_tokenizer_is_refused(tiny_dir, adapters, tmp_path, capsys):
    bare = tmp_path / "bare"
    load_model(str(tiny_dir), with_tokenizer=False).save_pretrained(bare)
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_with_adapter(adapters[0], str(bare))
    assert cli.main(["chat", "--adapter", str(adapters[0]), "--model", str(bare), "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_a_directory_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="not an adapter directory"):
        load_with_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter directory"):
        load_with_adapter(tmp_path / "missing")


def test_generation_speed_counts_exactly_the_new_tokens(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir))
    speed = generation_speed(model, tokenizer, "Hello!", new_tokens=5)
    assert speed > 0


def test_cpu_name_names_the_processor_and_torch_s_kernels():
    name = cpu_name()
    assert name.endswith(f"(torch kernels {torch.backends.cpu.get_cpu_capability()})")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        model_name = next(line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                          if line.startswith("model name"))
        assert name.startswith(model_name)


def test_the_gpu_s_loader_quantizes_with_bitsandbytes_and_agrees_with_peft(tiny_dir, adapters):
    """On a GPU the base is quantized by transformers + bitsandbytes while it
    loads (a 7B base never exists in 16 bits on the device); forced here on the
    CPU, where bitsandbytes' layers run too. The course's adapter layers around
    bitsandbytes' Linear4bit give peft's logits on the same base."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from qlora_lab.finetune.backends import bitsandbytes_config
    from qlora_lab.lora import lora_modules

    model, tokenizer = load_with_adapter(adapters[0], quantizer="bitsandbytes")
    wrapped = lora_modules(model)
    assert len(wrapped) == 14 and all(isinstance(m.base, bnb.nn.Linear4bit) for m in wrapped.values())
    base = load_model(str(tiny_dir), dtype=torch.float32, with_tokenizer=False,
                      quantization_config=bitsandbytes_config("nf4", True, torch.float32))
    theirs = PeftModel.from_pretrained(base, adapters[0]).eval()
    ours = logits(model)
    assert (ours - logits(theirs)).abs().max() <= 64 * torch.finfo(torch.float32).eps * ours.abs().max()
    assert reply(model, tokenizer, "Hello! How are you?", max_new_tokens=6)
    with pytest.raises(ValueError, match="quantizer must be auto, qlora_lab or bitsandbytes"):
        load_with_adapter(adapters[0], quantizer="gguf")

"""Chapter 09's "after QLoRA": the course's DoRA layer against peft's, LoftQ's initialisation error."""

import copy

import pytest
import torch
from torch import nn

from qlora_lab.beyond.dora import DoRALinear, add_dora
from qlora_lab.beyond.loftq import initialisation_error, loftq_init
from qlora_lab.models import tiny_llama
from qlora_lab.qlora import LinearNF4, quantize_model
from qlora_lab.quant.nf4 import dequantize_4bit


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_dora_layer_equals_peft_use_dora():
    from peft import LoraConfig, get_peft_model

    model = _One()
    ours = DoRALinear(copy.deepcopy(model.proj), r=4, alpha=8)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B.default.weight.normal_()
        ours.lora_A.copy_(layer.lora_A.default.weight)
        ours.lora_B.copy_(layer.lora_B.default.weight)
    torch.testing.assert_close(ours.magnitude, layer.lora_magnitude_vector.default.weight)
    x = torch.randn(5, 64)
    a, b = peft_model(x), ours(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(ours.magnitude.grad, layer.lora_magnitude_vector.default.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A.default.weight.grad, rtol=1e-4, atol=1e-5)


def test_dora_merge_equals_peft_merge_and_unload_and_unmerge_restores():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _One()
    original = model.proj.weight.detach().clone()
    ours = DoRALinear(copy.deepcopy(model.proj), r=4, alpha=8)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B.default.weight.normal_()
        layer.lora_magnitude_vector.default.weight.mul_(1.5)
        ours.lora_A.copy_(layer.lora_A.default.weight)
        ours.lora_B.copy_(layer.lora_B.default.weight)
        ours.magnitude.copy_(layer.lora_magnitude_vector.default.weight)
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = ours(x)
        ours.merge()
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload().proj.weight
        torch.testing.assert_close(ours.base.weight, merged, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="already merged"):
            ours.merge()
        ours.unmerge()
        torch.testing.assert_close(ours.base.weight, original, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="not merged"):
            ours.unmerge()
    quantized = DoRALinear(LinearNF4.from_linear(nn.Linear(64, 32, bias=False)), r=4, alpha=8)
    with pytest.raises(TypeError, match="dequantize a 4-bit base first"):
        quantized.merge()


def test_qdora_on_the_4bit_layer_starts_as_the_base_and_trains():
    model = tiny_llama()
    quantize_model(model)
    x = torch.randint(0, 512, (2, 8))
    before = model(x).logits
    assert add_dora(model, r=4, alpha=8) == 14
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoRALinear) and isinstance(layer.base, LinearNF4)
    assert torch.equal(model(x).logits, before)  # B = 0 and m = ||W|| by the same norm: scale exactly 1, update exactly 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "magnitude")) for n in trainable)
    model(x, labels=x).loss.backward()
    assert layer.magnitude.grad is not None and layer.magnitude.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no linear layer"):
        add_dora(tiny_llama(), target_modules=("nope",))


def test_loftq_starts_closer_to_the_weight_than_zero_init():
    torch.manual_seed(0)
    # A weight with a low-rank part that NF4 alone cannot capture well.
    weight = torch.randn(128, 8) @ torch.randn(8, 192) * 0.1 + torch.randn(128, 192) * 0.02
    errors = initialisation_error(weight, r=8, num_iter=3)
    assert errors["loftq"] < 0.9 * errors["qlora_zero_init"]
    packed, state, A, B = loftq_init(weight, 8, num_iter=1)
    assert A.shape == (8, 192) and B.shape == (128, 8)
    one = (weight - dequantize_4bit(packed, state) - B @ A).norm()
    assert one < (weight - dequantize_4bit(*loftq_init(weight, 8, num_iter=1)[:2])).norm()
    with pytest.raises(ValueError, match="r must be an integer"):
        loftq_init(weight, 0)
    with pytest.raises(ValueError, match="2-D weight"):
        loftq_init(weight[0], 4)

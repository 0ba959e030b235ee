"""The QLoRA layer against bitsandbytes' Linear4bit, and whole models against
transformers' BitsAndBytesConfig + peft."""

import copy
import os

import pytest
import torch
from torch import nn

import qlora_lab  # noqa: F401  (before bitsandbytes)
import bitsandbytes as bnb
from qlora_lab.lora import LoRALinear, add_lora
from qlora_lab.qlora import LinearNF4, memory_footprint, quantize_model
from qlora_lab.quant.nf4 import QuantState, dequantize_4bit, quantize_4bit
from qlora_lab.support.checks import assert_close_to_rounding


def bnb_linear4bit(linear: nn.Linear, quant_type: str, double_quant: bool) -> bnb.nn.Linear4bit:
    """bitsandbytes' layer holding the same weights (quantized by bitsandbytes)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, blocksize=64)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")  # quantizes
    # On CPUs with AVX512-BF16, Linear4bit switches to a bfloat16 kernel in eval
    # mode without gradients; the comparison is about the training path.
    layer.train()
    return layer


def forward_backward(layer, x, grad):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_nf4_equals_bitsandbytes_linear4bit(quant_type, double_quant, bias):
    torch.manual_seed(1)
    linear = nn.Linear(320, 192, bias=bias)
    theirs = bnb_linear4bit(linear, quant_type, double_quant)
    # The same 4-bit weight: bitsandbytes' own state, read into our layer.
    state = QuantState.from_bnb(theirs.weight.quant_state)
    ours = LinearNF4(320, 192, theirs.weight.data, state, linear.bias, compute_dtype=torch.float32)
    x, grad = torch.randn(3, 5, 320), torch.randn(3, 5, 192)
    y_ours, gx_ours = forward_backward(ours, x, grad)
    y_theirs, gx_theirs = forward_backward(theirs, x, grad)
    assert torch.equal(y_ours, y_theirs)
    assert torch.equal(gx_ours, gx_theirs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_our_quantization_gives_the_same_layer_as_bitsandbytes(quant_type):
    """Without double quantization our quantizer is bit-exact, so the whole
    layer, quantization included, computes exactly what bitsandbytes' does."""
    torch.manual_seed(2)
    linear = nn.Linear(576, 1536)
    ours = LinearNF4.from_linear(linear, quant_type=quant_type, double_quant=False, compute_dtype=torch.float32)
    theirs = bnb_linear4bit(linear, quant_type, double_quant=False)
    assert torch.equal(ours.weight, theirs.weight.data)
    x, grad = torch.randn(2, 7, 576), torch.randn(2, 7, 1536)
    for a, b in zip(forward_backward(ours, x, grad), forward_backward(theirs, x, grad)):
        assert torch.equal(a, b)


def test_double_quantized_layer_is_as_close_to_the_weights_as_bitsandbytes():
    """With double quantization our exact-nearest 8-bit codes may differ from
    bitsandbytes' CPU kernel on a few blocks; the layer's outputs then differ
    by a little, and ours is no further from the full-precision layer."""
    torch.manual_seed(3)
    linear = nn.Linear(576, 1536, bias=False)
    ours = LinearNF4.from_linear(linear, double_quant=True, compute_dtype=torch.float32)
    theirs = bnb_linear4bit(linear, "nf4", double_quant=True)
    assert torch.equal(ours.weight, theirs.weight.data)  # the 4-bit codes themselves are identical
    x = torch.randn(16, 576)
    with torch.no_grad():
        exact, y_ours, y_theirs = linear(x), ours(x), theirs(x)
    assert (y_ours - exact).norm() <= (y_theirs - exact).norm() * 1.0001
    assert torch.allclose(y_ours, y_theirs, rtol=0, atol=1e-3 * exact.abs().max().item())


def test_no_weight_gradient_and_no_dequantized_weight_saved():
    torch.manual_seed(4)
    layer = LinearNF4.from_linear(nn.Linear(256, 512, bias=False))
    x = torch.randn(8, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert [t.dtype for t in saved] == [torch.uint8], "only the packed 4-bit weight may be saved"
    assert saved[0].data_ptr() == layer.weight.data_ptr(), "and it is the layer's own buffer, not a copy"
    y.sum().backward()
    assert x.grad is not None
    assert not any(t.requires_grad for t in layer.buffers())
    assert list(layer.parameters()) == []


def test_input_gradient_is_through_the_dequantized_weight():
    torch.manual_seed(5)
    layer = LinearNF4.from_linear(nn.Linear(128, 64, bias=True), compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 128, requires_grad=True)
    grad = torch.randn(4, 64)
    layer(x).backward(grad)
    w = layer.dequantized_weight()
    assert torch.equal(x.grad, grad @ w)
    assert_close_to_rounding(layer.bias.grad, grad.sum(0), terms=4, magnitude=grad.abs().sum(0),
                             why="autograd may sum the 4 rows in another order")


def test_parameter_count_of_a_quantized_model_includes_the_4bit_weights(tiny):
    from qlora_lab.lora import trainable_parameters

    before = trainable_parameters(tiny).total
    quantize_model(tiny)
    counted = add_lora(tiny, r=4, alpha=8, target_modules="all-linear")
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in tiny.modules() if isinstance(m, LoRALinear))
    assert counted.total == before + lora and counted.trainable == lora


def test_lora_stacks_on_the_4bit_layer_and_gets_the_only_gradients():
    torch.manual_seed(6)
    layer = LoRALinear(LinearNF4.from_linear(nn.Linear(64, 32)), r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_equation_5_of_the_paper():
    """Y = X doubleDequant(c1, c2, W) + X L1 L2 (QLoRA Eq. 5), with L1 = A^T and
    L2 = (alpha / r) B^T in LoRALinear's terms."""
    torch.manual_seed(7)
    layer = LoRALinear(LinearNF4.from_linear(nn.Linear(192, 96, bias=False)), r=8, alpha=16)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(10, 192)
    packed, state = layer.base.weight, layer.base.quant_state
    assert state.nested is not None  # double quantization is the default
    w = dequantize_4bit(packed, state)
    l1, l2 = layer.lora_A.t(), layer.scaling * layer.lora_B.t()
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ w.t() + x @ l1 @ l2, rtol=1e-5, atol=1e-5)


def test_compute_dtype_bfloat16_keeps_the_input_dtype():
    torch.manual_seed(8)
    layer = LinearNF4.from_linear(nn.Linear(64, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    exact = nn.functional.linear(x.to(torch.bfloat16), layer.dequantized_weight(), layer.bias.to(torch.bfloat16))
    assert layer.dequantized_weight().dtype == torch.bfloat16
    assert torch.equal(y, exact.float())


def test_layer_errors():
    packed, state = quantize_4bit(torch.randn(32, 64))
    with pytest.raises(ValueError, match=r"needs \(16, 64\)"):
        LinearNF4(64, 16, packed, state)
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        LinearNF4.from_linear(nn.Conv1d(3, 3, 1))


def test_layer_follows_to_and_state_dict():
    layer = LinearNF4.from_linear(nn.Linear(64, 32))
    names = set(layer.state_dict())
    assert {"weight", "absmax_indices", "code", "nested_absmax", "nested_offset", "nested_code", "bias"} <= names
    assert "absmax" not in names  # double-quantized: the float32 constants are not stored
    assert {"weight", "absmax", "code", "bias"} == set(LinearNF4.from_linear(nn.Linear(64, 32),
                                                                            double_quant=False).state_dict())
    clone = copy.deepcopy(layer)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(clone(x), layer(x))


# --------------------------------------------------------------------------- #
# torch.compile traces the readable definition
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                    reason="inductor's C++ code uses at::vec, which PyTorch leaves undeclared when "
                           "ATEN_CPU_CAPABILITY=default; the eager kernels under test run in every other test")
def test_compiled_readable_dequantize_and_layer_equal_eager():
    """``torch.compile(fullgraph=True)`` traces nf4.dequantize_4bit and a
    LinearNF4's forward and backward (the layer switches to the readable
    definition while compiling), with the eager results."""
    torch._dynamo.reset()
    torch.manual_seed(12)
    packed, state = quantize_4bit(torch.randn(24, 40), double_quant=True)
    compiled = torch.compile(dequantize_4bit, fullgraph=True)
    assert torch.equal(compiled(packed, state), dequantize_4bit(packed, state))

    layer = LinearNF4.from_linear(nn.Linear(40, 24), compute_dtype=torch.float32)
    x = torch.randn(3, 40, requires_grad=True)
    x_compiled = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    y_compiled = torch.compile(layer, fullgraph=True)(x_compiled)
    y_compiled.backward(torch.ones_like(y_compiled))
    w = layer.dequantized_weight()
    assert_close_to_rounding(y_compiled, y, terms=40, magnitude=x.detach().abs() @ w.abs().t() + layer.bias.abs(),
                             why="inductor may fuse or reorder the matmul")
    assert_close_to_rounding(x_compiled.grad, x.grad, terms=24, magnitude=w.abs().sum(0),
                             why="inductor may reorder the sum over the 24 outputs")


# --------------------------------------------------------------------------- #
# Whole models
# --------------------------------------------------------------------------- #
def test_quantize_model_replaces_linear_layers_but_the_head(tiny):
    reference = copy.deepcopy(tiny)
    report = quantize_model(tiny, double_quant=False)
    kinds = {name: type(m).__name__ for name, m in tiny.named_modules()}
    assert kinds["lm_head"] == "Linear"
    assert kinds["model.layers.0.mlp.down_proj"] == "LinearNF4"
    assert report.layers == 14 and report.bytes_after < report.bytes_before
    assert "quantized 14 linear layers" in str(report)
    # The quantized model computes exactly what the fake-quantized one does
    # (nn.Linear holding the dequantized weights).
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            packed, state = quantize_4bit(module.weight.data, double_quant=False)
            module.weight.data = dequantize_4bit(packed, state)
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, reference(ids).logits)


def test_quantized_layers_keep_the_models_mode(tiny):
    # New modules start in training mode; a quantized eval model must stay in eval,
    # or an adapter wrapped around its layers later would apply dropout.
    training = copy.deepcopy(tiny).train()
    quantize_model(tiny.eval())
    assert not any(m.training for m in tiny.modules())
    quantize_model(training)
    assert all(m.training for m in training.modules())


def test_quantize_model_errors(tiny):
    with pytest.raises(TypeError, match="needs a torch model"):
        quantize_model("model")
    quantize_model(tiny)
    with pytest.raises(ValueError, match="already LinearNF4"):
        quantize_model(tiny)


def test_gradient_checkpointing_same_numbers_less_memory(tiny):
    quantize_model(tiny)
    add_lora(tiny, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(9)
    for p in tiny.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 512, (4, 64))

    def run(checkpointing):
        model = copy.deepcopy(tiny)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        saved_bytes = []

        def pack(t):
            saved_bytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, sum(saved_bytes)

    loss_plain, grads_plain, saved_plain = run(False)
    loss_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert torch.equal(loss_plain, loss_ckpt)
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_ckpt[name]), name  # recomputation re-runs the same kernels
    assert saved_ckpt < saved_plain / 2


# --------------------------------------------------------------------------- #
# SmolLM2 against transformers' BitsAndBytesConfig + peft
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def bnb_smollm2():
    """SmolLM2 loaded by transformers with QLoRA's quantization config (NF4,
    double quantization, float32 compute on CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_lab.models import smollm2_cache_path
    from qlora_lab.support.loading import quiet_loading as _quiet_loading

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    with _quiet_loading():
        return AutoModelForCausalLM.from_pretrained(smollm2_cache_path(), quantization_config=config,
                                                    dtype=torch.float32)


@pytest.fixture(scope="module")
def our_smollm2(smollm2):
    model = copy.deepcopy(smollm2[0])
    report = quantize_model(model)
    return model, report


def _our_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearNF4)}


def test_smollm2_quantized_like_transformers(our_smollm2, bnb_smollm2):
    ours, report = our_smollm2
    layers = _our_layers(ours)
    assert report.layers == len(layers) == 210
    codes_equal = codes_total = 0
    for name, layer in layers.items():
        theirs = bnb_smollm2.get_submodule(name).weight
        state = theirs.quant_state
        # The 4-bit codes, the mean offset and the second-level constants are identical ...
        assert torch.equal(layer.weight, theirs.data), name
        assert torch.equal(layer.nested_offset, state.offset.reshape(())), name
        assert torch.equal(layer.nested_absmax, state.state2.absmax), name
        # ... and the 8-bit codes of the first-level constants agree wherever
        # bitsandbytes' CPU kernel rounds to the nearest code (chapter 03).
        codes_equal += (layer.absmax_indices == state.absmax).sum().item()
        codes_total += layer.absmax_indices.numel()
    assert codes_equal / codes_total > 0.995
    # Memory: counted the same way, the two models hold exactly the same bytes.
    assert memory_footprint(ours) == memory_footprint(bnb_smollm2)
    # transformers' get_memory_footprint counts parameters and buffers only.
    # Our constants are buffers, bitsandbytes' are neither, so on our model it
    # counts them and on theirs it does not (a 1.1% difference); without them
    # the two agree to the byte.
    quant_constants = sum(b.numel() * b.element_size() for n, b in ours.named_buffers()
                          if n.rsplit(".", 1)[-1] in {"absmax_indices", "code", "nested_absmax", "nested_offset",
                                                       "nested_code"})
    assert ours.get_memory_footprint() - quant_constants == bnb_smollm2.get_memory_footprint()
    assert quant_constants / bnb_smollm2.get_memory_footprint() < 0.012


def _with_same_adapters(ours, theirs_base, r=8):
    from peft import LoraConfig, get_peft_model

    from qlora_lab.lora import lora_modules

    add_lora(ours, r=r, alpha=2 * r, dropout=0.0, target_modules="all-linear")
    theirs = get_peft_model(theirs_base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    for name, module in lora_modules(ours).items():
        module.lora_B.data.normal_(0, 0.01, generator=generator)
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_layer.lora_A["default"].weight.data.copy_(module.lora_A.data)
        peft_layer.lora_B["default"].weight.data.copy_(module.lora_B.data)
    ours.train()
    theirs.train()  # the training path of Linear4bit (see bnb_linear4bit)
    return ours, theirs


def _logits_and_lora_grads(model, ids, names):
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {}
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, LoRALinear):
            grads[name] = (layer.lora_A.grad, layer.lora_B.grad)
        else:
            grads[name] = (layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    return out.logits.detach(), grads


def test_smollm2_with_bitsandbytes_states_equals_transformers_plus_peft(our_smollm2, bnb_smollm2, smollm2):
    """The same 4-bit states in our layers (QuantState.from_bnb) and the same
    adapters: logits and every LoRA gradient are bit-identical."""
    ours = copy.deepcopy(our_smollm2[0])
    for name, layer in _our_layers(ours).items():
        theirs = bnb_smollm2.get_submodule(name).weight
        parent, _, child = name.rpartition(".")
        setattr(ours.get_submodule(parent), child,
                LinearNF4(layer.in_features, layer.out_features, theirs.data, QuantState.from_bnb(theirs.quant_state),
                          compute_dtype=torch.float32))
    ours, theirs = _with_same_adapters(ours, copy.deepcopy(bnb_smollm2))
    names = list(_our_layers(our_smollm2[0]))
    ids = smollm2[1](["The lighthouse keeper counted ships.", "Bread rises because yeast makes gas."],
                     return_tensors="pt", padding=True).input_ids
    logits_ours, grads_ours = _logits_and_lora_grads(ours, ids, names)
    logits_theirs, grads_theirs = _logits_and_lora_grads(theirs.base_model.model, ids, names)
    assert torch.equal(logits_ours, logits_theirs)
    for name in names:
        for a, b in zip(grads_ours[name], grads_theirs[name]):
            assert torch.equal(a, b), name


def test_smollm2_quantized_by_us_is_as_close_as_transformers(our_smollm2, bnb_smollm2, smollm2):
    """With our own double quantization (exact-nearest codes) the logits and
    gradients differ from transformers + peft only through the ~0.2% of
    first-level constants whose 8-bit code differs; the difference is small."""
    ours, theirs = _with_same_adapters(copy.deepcopy(our_smollm2[0]), copy.deepcopy(bnb_smollm2))
    names = [n for n in _our_layers(our_smollm2[0])]
    ids = smollm2[1](["The lighthouse keeper counted ships."], return_tensors="pt").input_ids
    logits_ours, grads_ours = _logits_and_lora_grads(ours, ids, names)
    logits_theirs, grads_theirs = _logits_and_lora_grads(theirs.base_model.model, ids, names)
    assert (logits_ours - logits_theirs).abs().max() < 0.02 * logits_theirs.abs().max()
    for name in names:
        for a, b in zip(grads_ours[name], grads_theirs[name]):
            assert (a - b).norm() < 0.05 * b.norm(), name


def test_the_training_path_runs_the_fast_functions(monkeypatch):
    """LinearNF4 quantizes and (eagerly) dequantizes with qlora_lab.fast.nf4,
    which tests/fast/test_fast.py proves equal to the readable definitions."""
    from qlora_lab.fast import nf4 as fast_nf4

    calls = []
    for name in ("quantize_4bit", "dequantize_4bit"):
        real = getattr(fast_nf4, name)
        monkeypatch.setattr(fast_nf4, name,
                            lambda *args, _real=real, _name=name, **kwargs: (calls.append(_name), _real(*args, **kwargs))[1])
    layer = LinearNF4.from_linear(nn.Linear(64, 32))
    layer(torch.randn(2, 64))
    assert calls == ["quantize_4bit", "dequantize_4bit"]

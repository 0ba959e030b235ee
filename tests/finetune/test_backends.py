"""The two backends of `finetune` (qlora_lab.finetune.backends): the course's layers and
transformers + bitsandbytes + peft train to the same losses on the CPU, their
adapters load in stock peft, bad settings are explained; the dry run's table
(the GPU smoke test that compares them is in tests/runs/test_smoke.py)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab.__main__ import main
from qlora_lab.finetune.backends import resolve_backend
from qlora_lab.finetune.train import TrainConfig, build_optimizer, preset, train

BACKENDS = ("qlora_lab", "bitsandbytes")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These trainings take many small steps (SmolLM2 at batch 2 x 64 tokens).
    On two cores shared with another busy process, two OpenMP threads wait on
    each other at every operation: the SmolLM2 test took 158 s with two
    threads and 14 s with one. The two backends run under the same setting,
    so the comparisons do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(data_dir, backend: str, **overrides) -> TrainConfig:
    """tiny-llama without double quantization: the course's quantize_4bit then
    gives bitsandbytes' bytes exactly (chapter 02), so the backends compute the
    same thing and must train to the same numbers. Dropout and gradient
    checkpointing on: the random streams must agree too."""
    settings = dict(model="tiny-llama", backend=backend, data=str(data_dir), double_quant=False, max_steps=3,
                    batch_size=4, gradient_accumulation_steps=2, max_length=64, lora_dropout=0.1, eval_every=3,
                    save_every=2, eval_examples=8, eval_batch_size=8, gradient_checkpointing=True)
    settings.update(overrides)
    return preset("smollm2-cpu", **settings)


@pytest.fixture(scope="module")
def tiny_runs(small_data, tmp_path_factory):
    runs = {}
    for backend in BACKENDS:
        out = tmp_path_factory.mktemp(backend)
        runs[backend] = (out, train(tiny_config(small_data, backend), out, progress="none"))
    return runs


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_auto_is_bitsandbytes_on_cuda_and_qlora_lab_elsewhere():
    assert resolve_backend("auto", torch.device("cuda")) == "bitsandbytes"
    assert resolve_backend("auto", torch.device("cpu")) == "qlora_lab"
    # A model passed in memory is quantized in place by the course's layers.
    assert resolve_backend("auto", torch.device("cuda"), model_given=True) == "qlora_lab"
    assert resolve_backend("bitsandbytes", torch.device("cpu")) == "bitsandbytes"
    assert preset("llama-7b-gpu").backend == preset("smollm2-cpu").backend == "auto"


def test_tiny_llama_trains_to_the_same_numbers_on_both_backends(tiny_runs):
    (_, ours), (_, theirs) = tiny_runs["qlora_lab"], tiny_runs["bitsandbytes"]
    assert (ours.backend, theirs.backend) == BACKENDS
    assert ours.losses() == theirs.losses()  # bit for bit, every step
    assert ours.evaluations == theirs.evaluations
    assert ours.losses()[-1] != ours.losses()[0]


def test_the_adapters_of_both_backends_are_identical_and_load_in_stock_peft(tiny_runs):
    from peft import PeftModel

    from qlora_lab.models import load_model

    files = {backend: adapter(out) for backend, (out, _) in tiny_runs.items()}
    assert files["qlora_lab"].keys() == files["bitsandbytes"].keys()
    for key in files["qlora_lab"]:
        assert torch.equal(files["qlora_lab"][key], files["bitsandbytes"][key]), key
    ids = torch.tensor([[1, 17, 230, 4000, 9]])
    logits = {}
    for backend, (out, _) in tiny_runs.items():
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tiny-llama" and config["r"] == 16
        peft_model = PeftModel.from_pretrained(load_model("tiny-llama", with_tokenizer=False), out / "adapter")
        loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
        assert loaded.keys() == files[backend].keys()
        assert all(torch.equal(loaded[k], files[backend][k]) for k in loaded)
        logits[backend] = peft_model(ids).logits
    assert torch.equal(logits["qlora_lab"], logits["bitsandbytes"])


def test_the_bitsandbytes_backend_resumes_to_the_same_adapter(tiny_runs, small_data, tmp_path):
    out, _ = tiny_runs["bitsandbytes"]
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    resumed = train(tiny_config(small_data, "bitsandbytes"), tmp_path, progress="none", resume=True)
    assert resumed.resumed_from == 2
    ours, theirs = adapter(tmp_path), adapter(out)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_smollm2_losses_agree_within_the_stated_tolerance(small_data, tmp_path):
    """The recipe (double quantization on) on the real model, two steps. The
    course's double quantization picks the nearest 8-bit code; bitsandbytes'
    CPU kernel picks another for 0.22% of SmolLM2's block constants (chapter
    03), so the losses differ slightly: at most 4.5e-4 relative over three
    steps when measured. The tolerance, 2e-3, is nine times smaller than what
    swapping NF4 for FP4 does to SmolLM2's loss (perplexity 42.32 against 45.32,
    1.8% of the loss)."""
    losses = {}
    for backend in BACKENDS:
        config = preset("smollm2-cpu", model="smollm2", backend=backend, data=str(small_data), max_steps=2,
                        batch_size=2, gradient_accumulation_steps=1, max_length=64, eval_examples=0,
                        save_every=10, eval_every=10)
        losses[backend] = train(config, tmp_path / backend, progress="none").losses()
    for ours, theirs in zip(losses["qlora_lab"], losses["bitsandbytes"]):
        # Modelling tolerance, not rounding: the 0.22% differing 8-bit codes (measured 4.5e-4), 9x under NF4 -> FP4.
        assert math.isfinite(ours) and abs(ours - theirs) <= 2e-3 * abs(theirs), losses
    assert losses["qlora_lab"] != losses["bitsandbytes"]  # the 8-bit codes do differ


# --------------------------------------------------------------------------- #
# What a backend cannot do
# --------------------------------------------------------------------------- #
def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be auto, qlora_lab or bitsandbytes, got 'tensorrt'"):
        preset("smollm2-cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        resolve_backend("tensorrt", torch.device("cpu"))


@pytest.mark.parametrize("setting, message", [
    ({"quant_type": "int4"}, "bitsandbytes' 4-bit types are nf4 and fp4; quant_type='int4'"),
    ({"blocksize": 128}, "blocks of 64 and has no setting for another size; blocksize=128 needs --backend qlora_lab"),
])
def test_bitsandbytes_refuses_what_it_cannot_do_before_loading(small_data, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(small_data, "bitsandbytes", **setting), tmp_path / "run", progress="none")
    assert not (tmp_path / "run").exists()


def test_bitsandbytes_on_the_cpu_refuses_layers_its_kernel_gets_wrong(small_data, tmp_path):
    from qlora_lab.models import load_model, tiny_llama

    _, tokenizer = load_model("tiny-llama")
    narrow = tiny_llama(vocab_size=len(tokenizer))  # 96 wide: rows end inside a block of 64
    with pytest.raises(ValueError, match=r"96 wide, not a multiple of 64: bitsandbytes 0\.50\.2's CPU kernel"):
        train(tiny_config(small_data, "bitsandbytes"), tmp_path, model=narrow, tokenizer=tokenizer, progress="none")


def test_paged_adamw_32bit_is_refused_on_the_cpu():
    param = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="pages through CUDA unified memory; on a CPU choose adamw"):
        build_optimizer(preset("smollm2-cpu", optimizer="paged_adamw_32bit"), [param], torch.device("cpu"))


# --------------------------------------------------------------------------- #
# The dry run
# --------------------------------------------------------------------------- #
def dry_run(capsys, *args):
    assert main(["finetune", "--preset", "llama-7b-gpu", "--dry-run", *args]) == 0
    return capsys.readouterr().out


def test_dry_run_prints_each_backend_s_needs_and_the_gpus_that_fit(capsys):
    out = dry_run(capsys)
    table = out[out.index("what each backend needs for llama-7b on cuda:"):].splitlines()
    assert table[1].split() == ["backend", "step", "peak", "host", "for", "the", "load",
                                "12", "GB", "16", "GB", "24", "GB", "40", "GB", "48", "GB", "80", "GB"]
    readme = (Path(__file__).resolve().parents[2] / "docs" / "gpu.md").read_text()
    assert "\n".join("  " + line for line in table[1:4]) in readme, "docs/gpu.md's dry-run table is not the output"
    rows = {line.split()[0]: line.split() for line in table[2:4]}
    assert rows["bitsandbytes"][1] == "(default)"
    for backend, row in rows.items():
        gpu, host = float(row[-10]), float(row[-8])
        assert 6.0 < gpu < 7.5 and row[-6:] == ["fits"] * 6, row
        # qlora_lab streams (runtime + one tensor); transformers maps the whole 13.5 GB checkpoint.
        assert (host < 1.0) if backend == "qlora_lab" else (host > 13.5), row
    out = dry_run(capsys, "--set", "memory_config=llama-33b", "--backend", "qlora_lab")
    row = next(line.split() for line in out.splitlines() if line.startswith("qlora_lab"))
    # LLaMA-33B: a 25.2 GB peak with float32 adapters and dropout's activations, just inside a 24 GB card
    # (25.77e9 bytes); the five parts added up (25.9 GB) would not be.
    assert float(row[-10]) > 25.0 and row[-6:] == ["no", "no", "fits", "fits", "fits", "fits"], row


@pytest.mark.parametrize("hub_id, name, parameters", [
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b", 8_030_261_248),
    ("mistralai/Mistral-7B-v0.3", "mistral-7b-v0.3", 7_248_023_552),
    ("Qwen/Qwen2.5-7B", "qwen2.5-7b", 7_615_616_512),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b", 7_615_616_512),
])
def test_dry_run_of_today_s_7b_models_reads_their_shipped_configs_offline(capsys, hub_id, name, parameters):
    """The three models the 7B path offers: each hub id (an instruct model has
    its base's shapes) is read from qlora_lab/configs without a download. The
    parameter counts are the ones their model cards give (8.03B, 7.25B, 7.62B),
    counted here on the meta device; their large vocabularies are in them."""
    from qlora_lab.support.model_config import count_parameters

    assert count_parameters(hub_id).total == parameters
    out = dry_run(capsys, "--model", hub_id)
    assert '"memory_config": null' in out  # the preset's LLaMA-7B stand-in is dropped for another model
    table = out[out.index(f"what each backend needs for {name} on cuda:"):].splitlines()
    row = table[3].split()
    assert row[0] == "qlora_lab" and 6.0 < float(row[-10]) < 10.0, row
    assert row[-6:] == ["fits"] * 6, row  # the recipe's batch 1 x 512 fits a 12 GB card
    readme = (Path(__file__).resolve().parents[2] / "docs" / "gpu.md").read_text()
    assert f"{hub_id.split('/')[1].removesuffix('-Instruct')} {row[-10]} GB" in " ".join(readme.split())


def test_a_resumed_paged_optimizer_pages_its_large_states_again(monkeypatch):
    """bitsandbytes' load_state_dict brings paged states back as ordinary device
    tensors; load_optimizer_state puts each of 100,000 elements or more back in
    paged memory. No GPU here: the parameters live on the meta device (a device
    that is not the CPU, with no memory) and get_paged is bitsandbytes' allocator
    stood in for by one that marks its tensor paged, as the real one does."""
    import bitsandbytes.functional as F

    from qlora_lab.finetune.step import load_optimizer_state

    def get_paged(*shape, dtype, device):
        buffer = torch.empty(shape, dtype=dtype, device=device)
        buffer.is_paged = True
        return buffer

    monkeypatch.setattr(F, "get_paged", get_paged)
    big, small = torch.nn.Parameter(torch.empty(400, 400, device="meta")), torch.nn.Parameter(torch.empty(8, device="meta"))

    class Paged(torch.optim.Optimizer):  # the two attributes of bitsandbytes' paged optimizers that matter here
        is_paged = True
        page_mng = type("PageManager", (), {"paged_tensors": []})()

    optimizer = Paged([big, small], {})
    state = {"state": {0: {"state1": torch.zeros(400, 400, device="meta"), "step": torch.tensor(3.0)},
                       1: {"state1": torch.zeros(8, device="meta")}},
             "param_groups": [{"params": [0, 1]}]}
    assert load_optimizer_state(optimizer, state) == 1
    assert getattr(optimizer.state[big]["state1"], "is_paged", False) and optimizer.page_mng.paged_tensors
    assert not getattr(optimizer.state[small]["state1"], "is_paged", False)  # below bitsandbytes' threshold
    # torch's AdamW (the CPU's optimizer) is loaded as it always was
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert load_optimizer_state(adamw, adamw.state_dict()) == 0

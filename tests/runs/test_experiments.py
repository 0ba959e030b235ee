"""`make experiments` (qlora_lab.runs.experiments): QLoRA against 16-bit LoRA, run
end to end on the tiny model, and the committed results chapter 07 plots."""

import json

import pytest

from qlora_lab.runs import experiments


def test_a_short_run_of_both_methods_writes_every_field(tiny_smollm2, tmp_path):
    results = tmp_path / "experiments.json"
    summary = experiments.run(steps=2, out_dir=tmp_path / "runs", results=results, per_task=1)
    assert json.loads(results.read_text()) == json.loads(json.dumps(summary))
    assert set(summary["runs"]) == {"qlora", "lora16"}
    for method, run in summary["runs"].items():
        assert len(run["train_loss"]) == 2 and all(loss > 0 for loss in run["train_loss"])
        assert run["config"]["method"] == method and run["config"]["max_steps"] == 2
        assert run["test"]["total"] == summary["before"]["total"] > 0
        assert run["seconds"] > 0 and run["evaluations"]
    assert summary["steps"] == 2 and summary["threads"] >= 1
    assert all(run["config"]["data"] == "datasets/qlora_lab_instruct" for run in summary["runs"].values())
    assert len(list((tmp_path / "runs").iterdir())) == 2  # one run directory per method


def test_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="steps must be positive"):
        experiments.run(steps=0, out_dir=tmp_path, results=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_the_committed_results_hold_both_methods_trained_as_long():
    summary = experiments.committed_results()
    assert set(summary["runs"]) == {"qlora", "lora16"}
    for run in summary["runs"].values():
        assert len(run["train_loss"]) == summary["steps"] == run["config"]["max_steps"]
        assert run["test"]["total"] == summary["before"]["total"]


def test_the_committed_results_come_from_the_current_recipe():
    """Written by today's layout: the recipe's field names (``r``, not the
    older ``lora_r``) and a data path that does not name the machine it ran on."""
    from qlora_lab.finetune.recipe import preset
    fields = set(experiments.portable_config(preset("smollm2-cpu", method="qlora")))
    for run in experiments.committed_results()["runs"].values():
        assert set(run["config"]) == fields
        assert run["config"]["data"] == "datasets/qlora_lab_instruct"

"""`make after-finetuning` (qlora_lab.runs.after_finetuning): two task adapters
trained, committed and scored, run end to end on the tiny model with the adapters'
folder moved to a temporary one (the committed adapters are never touched)."""

import json

import pytest
import torch

from qlora_lab.lora import CONFIG_NAME, WEIGHTS_NAME
from qlora_lab.runs import after_finetuning


@pytest.fixture
def adapters_dir(tmp_path, monkeypatch):
    directory = tmp_path / "adapters"
    monkeypatch.setattr(after_finetuning, "ADAPTERS_DIR", directory)
    return directory


def test_task_splits_keep_one_task_and_refuse_another():
    splits = after_finetuning.task_splits("date_iso")
    assert splits["train"] and all(r["task"] == "date_iso" for records in splits.values() for r in records)
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        after_finetuning.task_splits("poetry")


def test_scores_and_speed_of_two_fresh_adapters(tiny_smollm2, adapters_dir, tmp_path):
    results = tmp_path / "after.json"
    results.write_text(json.dumps({"gguf": {"kept": True}}))  # another part's results stay
    threads = torch.get_num_threads()
    summary = after_finetuning.run(steps=1, out_dir=tmp_path / "runs", results=results, retrain=True,
                                   per_task=2, speed_tokens=2, parts=("scores", "speed"))
    assert json.loads(results.read_text()) == summary and summary["gguf"] == {"kept": True}
    for task in after_finetuning.TASKS:
        committed = json.loads((adapters_dir / task / CONFIG_NAME).read_text())
        assert committed["base_model_name_or_path"] == "smollm2"
        assert (adapters_dir / task / WEIGHTS_NAME).is_file()
        scores = summary["scores"][task]
        assert set(scores) == {"float base", "NF4 base + adapter", "merged (float32)",
                               "merged into NF4, re-quantized"}
        assert all(s["total"] == 2 and len(s["predictions"]) == 2 for s in scores.values())
        assert summary["train_seconds"][task] > 0
    assert torch.get_num_threads() == threads  # measured with two threads, the caller's count restored
    assert set(summary["speed"]) == {"float base", "NF4 base + adapter", "merged (float32)",
                                     "merged into NF4, re-quantized"}


def test_an_unknown_part_is_refused_before_anything_runs(adapters_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['plots'\]"):
        after_finetuning.run(results=tmp_path / "x.json", parts=("scores", "plots"))
    assert not adapters_dir.exists() and not (tmp_path / "x.json").exists()

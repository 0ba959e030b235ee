"""`make gpu-smoke` (qlora_lab.runs.smoke): both backends through the finetune
command line, their losses compared step by step, a resumed run redoing a step.
Without a GPU it refuses in one line; with --cpu it runs the whole path here."""

import contextlib
import io
import subprocess

import pytest
import torch

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab.__main__ import main
from qlora_lab.runs import smoke


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_smoke_without_a_gpu_says_so_in_one_line(capsys):
    assert main(["gpu-smoke"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("gpu-smoke needs a CUDA GPU and this machine has none")


def test_compare_losses():
    assert smoke.compare_losses([2.0, 1.9], [2.0, 1.9005], 0.01) is None
    assert "step 2 differ by 5.26%" in smoke.compare_losses([2.0, 2.0], [2.0, 1.9], 0.01)
    assert "not finite" in smoke.compare_losses([float("nan")], [2.0], 0.01)
    assert "took 1 and 2 steps" in smoke.compare_losses([2.0], [2.0, 1.9], 0.01)


def in_process(command):
    """smoke.execute, but in this process (no second import of torch): the same command line."""
    assert command[1:3] == ["-m", "qlora_lab"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(command[3:])
    return subprocess.CompletedProcess(command, code, out.getvalue(), "")


def test_gpu_smoke_compares_the_backends_on_the_cpu(small_data, tmp_path, monkeypatch, capsys):
    """The smoke test's whole path with --cpu: both backends through the
    finetune command line, the table, the comparison, the resumed run.
    tiny-llama with double quantization (the recipe): the losses differ by
    about 1e-6, relative."""
    monkeypatch.setattr(smoke, "execute", in_process)
    code = main(["gpu-smoke", "--cpu", "--model", "tiny-llama", "--data", str(small_data), "--steps", "2",
                 "--tolerance", "1e-4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[bitsandbytes] trained 2 steps with the bitsandbytes backend" in out
    assert "[qlora_lab] trained 2 steps with the qlora_lab backend" in out
    losses = [line.split()[-2:] for line in out.splitlines() if line.startswith("loss at step")]
    # The command checked |a - b| <= 1e-4 |b|; the table prints 5 decimals, each off by at most 0.5e-5.
    assert len(losses) == 2 and all(abs(float(a) - float(b)) <= 1e-4 * abs(float(b)) + 1e-5 for a, b in losses)
    redone = next(line for line in out.splitlines() if line.startswith("resumed bitsandbytes at step 1"))
    assert redone.split()[8].rstrip(",") == redone.split()[9]  # on the CPU, the very same loss
    assert "OK: both backends ran 2 steps and their losses agree within 0.01%; a resumed run redid step 2 alike." in out


def test_gpu_smoke_fails_loudly_when_a_run_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smoke, "execute", lambda command: subprocess.CompletedProcess(
        command, 1, "", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"))
    assert main(["gpu-smoke", "--cpu", "--model", "tiny-llama", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED: the bitsandbytes run failed (exit code 1)" in err and "CUDA out of memory" in err

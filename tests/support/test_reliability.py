"""Runs that survive faults, each tried with a real process and real files.

A training run killed with SIGKILL at a random step, or in the middle of
writing a checkpoint, resumes to the same final adapter bit for bit. A
checkpoint damaged on disk (overwritten, truncated, a flipped byte) is named,
and the run resumes from the newest intact one. A full disk leaves the
previous checkpoint intact. An adapter or GGUF file cut short gives a one-line
error that names the file, never a traceback from inside torch.

The kill points are drawn from a seeded generator (``KILL_SEED``), so a
failure can be replayed; change the seed to try other points.
"""

import errno
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lab.finetune.train import preset, train
from qlora_lab.support import resume as resume_lib

ROOT = Path(__file__).resolve().parents[2]
KILL_SEED = 27
MAX_STEPS, SAVE_EVERY = 6, 2  # checkpoints 2 and 4 (none at the last step: the final adapter is written instead)
RUN_SETTINGS = dict(model="tiny-llama", max_steps=MAX_STEPS, batch_size=4, gradient_accumulation_steps=2,
                    max_length=64, lora_dropout=0.1, eval_every=4, save_every=SAVE_EVERY, eval_examples=8,
                    eval_batch_size=8)


def config(data):
    return preset("smollm2-cpu", data=str(data), **RUN_SETTINGS)


def cli(data, out) -> list[str]:
    """The same run, typed at the command line."""
    command = [sys.executable, "-m", "qlora_lab", "finetune", "--preset", "smollm2-cpu", "--model", "tiny-llama",
               "--data", str(data), "--out", str(out), "--progress", "none", "--max-steps", str(MAX_STEPS)]
    for name, value in RUN_SETTINGS.items():
        if name not in ("model", "max_steps"):
            command += ["--set", f"{name}={value}"]
    return command


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(ours: Path, reference: Path) -> None:
    a, b = adapter(ours), adapter(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # resuming replays the same steps: bit for bit, no tolerance


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> Path:
    """The run without any fault."""
    out = tmp_path_factory.mktemp("reference")
    train(config(small_data), out, progress="none")
    return out


@pytest.fixture(scope="module")
def interrupted(small_data, tmp_path_factory) -> Path:
    """A run stopped after step 5: checkpoints 2 and 4 on disk, no final adapter (an exception, not a kill: the
    killed runs are below)."""
    out = tmp_path_factory.mktemp("interrupted")

    def stop(entry):
        if entry["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(small_data), out, progress="none", on_step=stop)
    assert [step for step, _ in resume_lib.checkpoints(out)] == [2, 4]
    return out


# A process that kills itself at a chosen moment: after a chosen step, or once a
# chosen checkpoint's training_state.pt is on disk in the staging directory (so
# the checkpoint is half written: no trainer state yet, not renamed into place).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import qlora_lab.finetune.train

    kind, at = sys.argv[1], int(sys.argv[2])
    real_save, real_train = torch.save, qlora_lab.finetune.train.train

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if kind == "write" and os.path.basename(os.path.dirname(str(path))).startswith(f".checkpoint-{at}."):
            os.kill(os.getpid(), signal.SIGKILL)

    def train(*args, **kwargs):
        if kind == "step":
            kwargs["on_step"] = lambda entry: entry["step"] == at and os.kill(os.getpid(), signal.SIGKILL)
        return real_train(*args, **kwargs)

    torch.save, qlora_lab.finetune.train.train = save, train
    from qlora_lab.__main__ import main
    sys.argv = ["qlora_lab"] + sys.argv[3:]
    sys.exit(main())
""")

_draw = random.Random(KILL_SEED)
KILL_POINTS = [("step", _draw.choice([3, 5])), ("write", 4)]  # (checkpoint-2 being written: nothing to resume)


@pytest.mark.parametrize("kind, at", KILL_POINTS, ids=[f"{k}-{a}" for k, a in KILL_POINTS])
def test_sigkill_then_resume_gives_the_same_adapter(small_data, reference, tmp_path, kind, at):
    killed = subprocess.run([sys.executable, "-c", KILLER, kind, str(at)] + cli(small_data, tmp_path)[3:],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "adapter").exists()
    newest = max(step for step, _ in resume_lib.checkpoints(tmp_path))
    assert newest == (at - 1 if kind == "step" else at - SAVE_EVERY)
    if kind == "write":  # the half-written checkpoint is left as a hidden staging directory, never a checkpoint
        assert [p.name for p in tmp_path.glob(f".checkpoint-{at}.*")] and not (tmp_path / f"checkpoint-{at}").exists()
    resumed = subprocess.run(cli(small_data, tmp_path) + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {newest}" in resumed.stdout
    assert_same_adapter(tmp_path, reference)


def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(
        small_data, reference, interrupted, tmp_path):
    """The new user's case: checkpoint-4/training_state.pt overwritten by a line of text."""
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    (run / "checkpoint-4" / "training_state.pt").write_text("this line replaced the optimizer state\n")
    resumed = subprocess.run(cli(small_data, run) + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-4/training_state.pt is damaged: its contents changed after it was written" in resumed.stderr
    assert "Resuming from checkpoint-2, the newest intact checkpoint" in resumed.stderr
    assert "resumed at step 2" in resumed.stdout
    assert "Traceback" not in resumed.stderr and "Unsupported operand" not in resumed.stderr
    assert_same_adapter(run, reference)


def _overwrite(path: Path) -> None:
    path.write_text("not what was written\n")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:  # in the middle of the tensor data: torch.load alone would not notice
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "state-overwritten": ("training_state.pt", _overwrite, "its contents changed after it was written"),
    "state-truncated": ("training_state.pt", _truncate, "its contents changed after it was written"),
    "state-byte-flipped": ("training_state.pt", _flip_a_byte, "its contents changed after it was written"),
    "adapter-truncated": ("adapter/adapter_model.safetensors", _truncate, "its contents changed after it was written"),
    "trainer-state-truncated": ("trainer_state.json", _truncate, "it is not readable JSON"),
    "state-deleted": ("training_state.pt", Path.unlink, "the file is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_kind_of_damage_is_found_before_the_run_trusts_the_checkpoint(interrupted, tmp_path, damage):
    name, spoil, said = DAMAGES[damage]
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    spoil(run / "checkpoint-4" / name)
    with pytest.warns(UserWarning) as caught:
        checkpoint, saved, state = resume_lib.newest_intact_checkpoint(run)
    assert checkpoint.name == "checkpoint-2" and state["step"] == 2 and "files" not in state
    message = str(caught[0].message)
    assert f"checkpoint-4/{name} is damaged: {said}" in message, message
    assert "Resuming from checkpoint-2" in message
    shutil.rmtree(run / "checkpoint-2")  # now no intact checkpoint is left: the error names the damaged file
    with pytest.raises(resume_lib.DamagedCheckpointError, match=f"checkpoint-4/{name} is damaged"):
        resume_lib.newest_intact_checkpoint(run)


def test_checkpoints_without_digests_still_catch_a_truncated_archive(interrupted, tmp_path):
    """A checkpoint written before the SHA-256 digests: torch's own zip reader
    finds the truncation, and the error says so, not torch's."""
    state = tmp_path / "training_state.pt"
    shutil.copy(interrupted / "checkpoint-4" / "training_state.pt", state)
    _truncate(state)
    with pytest.raises(resume_lib.DamagedCheckpointError, match=r"is damaged: the archive is incomplete or corrupted"):
        resume_lib.load_training_state(state)


def test_resume_with_only_damaged_checkpoints_is_one_clear_line(small_data, interrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    for _, checkpoint in resume_lib.checkpoints(run):
        _overwrite(checkpoint / "training_state.pt")
    resumed = subprocess.run(cli(small_data, run) + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 2
    assert "error: " in resumed.stderr and "checkpoint-4/training_state.pt is damaged" in resumed.stderr
    assert "new --out directory" in resumed.stderr and "Traceback" not in resumed.stderr


def test_a_full_disk_leaves_the_previous_checkpoint_intact(small_data, reference, tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if Path(path).parent.name.startswith(".checkpoint-4."):
            with open(path, "wb") as f:  # half the file reaches the disk, then the disk is full
                f.write(b"PK\x03\x04" + bytes(1000))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match=r"could not write checkpoint-4 .*No space left on device.*checkpoint-2, is "
                                      r"intact.*--resume") as raised:
        train(config(small_data), tmp_path, progress="none")
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the half-written copy is gone
    assert resume_lib.newest_intact_checkpoint(tmp_path)[0].name == "checkpoint-2"
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    resumed = train(config(small_data), tmp_path, progress="none", resume=True)
    assert resumed.resumed_from == 2
    assert_same_adapter(tmp_path, reference)


def test_a_new_run_into_a_finished_run_is_refused_and_overwrites_nothing(small_data, reference, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(reference, finished)
    for _, checkpoint in resume_lib.checkpoints(finished):
        shutil.rmtree(checkpoint)  # a run kept only its final adapter (keep_checkpoints, or deleted by hand)
    before = (finished / "adapter" / "adapter_model.safetensors").read_bytes()
    started = subprocess.run(cli(small_data, finished), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert started.returncode == 2
    assert "already holds a run (checkpoints or a final adapter)" in started.stderr
    assert "Traceback" not in started.stderr
    assert (finished / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_a_damaged_adapter_is_named(reference, tmp_path):
    from qlora_lab import lora
    from qlora_lab.models import load_model

    damaged = tmp_path / "adapter"
    shutil.copytree(reference / "adapter", damaged)
    _truncate(damaged / "adapter_model.safetensors")
    model = load_model("tiny-llama", with_tokenizer=False)
    lora.add_lora(model, r=16, alpha=16)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        lora.load_adapter(model, damaged)


@pytest.mark.parametrize("spoil, said", [(_overwrite, "is not a GGUF file"),
                                         (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(8)),
                                          "is not a complete GGUF file")])
def test_a_damaged_gguf_file_is_named(tmp_path, spoil, said):
    from qlora_lab.after.gguf import load_gguf

    path = tmp_path / "model.gguf"
    spoil(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=f"model.gguf {said}.*export it again"):
            load_gguf(path)


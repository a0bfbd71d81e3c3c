"""Faults during training: SIGKILL at random moments (some in the middle of a checkpoint write), SIGINT and
SIGTERM, a NaN or inf loss, non-finite weights, a full disk and an unwritable run directory. After each
the last good checkpoint is intact, and a resumed run ends where an uninterrupted one does."""

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from run_fixtures import environment, final_weights, max_difference, metrics, train_command, write_recipe
from test_trainer import CopyTask, recipe
from vaswani.cli import main
from vaswani.training import checkpoint as checkpoint_module
from vaswani.training.checkpoint import FAULT_DELAY_ENV, latest_checkpoint, load_weights, verify_checkpoint
from vaswani.training.faults import rewind_metrics
from vaswani.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# How many SIGKILLs the random-kill test sends (more for a report: VASWANI_FAULT_KILLS=20 pytest ...).
KILLS = int(os.environ.get("VASWANI_FAULT_KILLS", "3"))


def wait_for(condition, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll `condition` every 10 ms until it holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the training process made no progress")


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.is_file() else 0


def writing_checkpoint(run_dir: Path) -> bool:
    """A checkpoint is being written: its temporary directory exists (held open by the fault delay)."""
    return any(run_dir.glob("checkpoints/.step_*.tmp")) or any(run_dir.glob(".best.*.tmp"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    steps = 16 * (KILLS + 1)  # room for every kill to land before the end
    path = write_recipe(tmp_path / "data", max_steps=steps, save_every=3, eval_every=6, keep_checkpoints=3)
    assert main(["train", str(path), "--run-dir", str(tmp_path / "whole")]) == 0

    run = tmp_path / "killed"
    rng = random.Random(0)
    # Every other kill waits for a checkpoint write (the fault delay holds each write open 1 s) and lands
    # inside it; the others, with no delay, land after a random number of logged steps plus a random
    # fraction of a second (some of them inside a write too).
    kills = during_write = 0
    while True:
        resume = latest_checkpoint(run / "checkpoints") is not None
        command = train_command(path, run, resume=resume)
        env = environment(**({FAULT_DELAY_ENV: "1.0"} if kills % 2 == 0 and kills < KILLS else {}))
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills == KILLS:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr.decode()[-2000:]
            break
        target = logged_steps(run) + (1 if kills % 2 == 0 else rng.randint(1, 4))
        if kills % 2 == 0:
            landed = wait_for(lambda t=target: writing_checkpoint(run) and logged_steps(run) >= t, process)
        else:
            landed = wait_for(lambda t=target: logged_steps(run) >= t, process)
            time.sleep(rng.uniform(0.0, 0.2))
        assert landed, "the run ended before the kill"
        in_write = writing_checkpoint(run)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stderr.close()
        kills += 1
        during_write += in_write
    print(f"{kills} SIGKILLs, {during_write} of them inside a checkpoint write")  # for docs/RELIABILITY.md
    assert during_write >= (KILLS + 1) // 2

    # The final checkpoint is complete and equal to the uninterrupted run's; no debris is left.
    verify_checkpoint(latest_checkpoint(run / "checkpoints"), need_state=True)
    assert max_difference(final_weights(tmp_path / "whole"), final_weights(run)) == 0.0
    assert not list(run.glob("**/.*.tmp")) and not list(run.glob("**/.*.old"))
    # The loss curve has every step once, with the uninterrupted run's values.
    whole = [(r["step"], r["loss"]) for r in metrics(tmp_path / "whole")]
    assert [(r["step"], r["loss"]) for r in metrics(run)] == whole
    assert [r["step"] for r in metrics(run, "valid")] == [
        r["step"] for r in metrics(tmp_path / "whole", "valid")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_checkpoint_and_exit_with_one_line(tmp_path, signum):
    path = write_recipe(tmp_path / "data", max_steps=10_000, save_every=10_000, eval_every=10_000)
    run = tmp_path / "run"
    process = subprocess.Popen(
        train_command(path, run),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_for(lambda: logged_steps(run) >= 3, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    last_line = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert last_line.startswith(f"stopped by {signal.Signals(signum).name} at step ")
    step = int(last_line.split(" at step ")[1].split(":")[0])
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint.name == f"step_{step:07d}" and f"checkpoint {checkpoint.name} saved" in last_line
    verify_checkpoint(checkpoint, need_state=True)
    # It resumes where it stopped, each step logged once.
    args = ["train", str(path), "--run-dir", str(run), "--resume", "--set", f"train.max_steps={step + 2}"]
    assert main(args) == 0
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 3))


class FaultyCopyTask(CopyTask):
    """CopyTask whose loss is `bad` on the given loss calls, or whose gradient is made infinite on one call
    (the loss stays finite; Adam then turns the weights to NaN)."""

    def __init__(self, bad_calls=(), bad=float("nan"), spoil_weights_at=None) -> None:
        super().__init__(batch_size=16)
        self.bad_calls, self.bad, self.spoil_weights_at = set(bad_calls), bad, spoil_weights_at
        self.hook = None

    def loss(self, model, batch, label_smoothing):
        out = super().loss(model, batch, label_smoothing)
        if self.calls in self.bad_calls:
            out.loss = out.loss * self.bad
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.calls == self.spoil_weights_at:
            self.hook = next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))
        return out


def is_finite(run_dir, task) -> bool:
    model = task.build_model()
    load_weights(latest_checkpoint(run_dir / "checkpoints"), model)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_loss_skips_its_step_and_training_goes_on(tmp_path, bad, capsys):
    task = FaultyCopyTask(bad_calls={4, 5}, bad=bad)
    state = Trainer(recipe(max_steps=8, average_last=0, max_nonfinite_skips=2), task, tmp_path / "run").fit()
    assert state.step == 8 and state.skipped_steps == 2
    out = capsys.readouterr().out
    assert f"loss is {bad} at step 4 (epoch 0 batch 3): step skipped (1 in a row" in out
    assert f"loss is {bad} at step 4 (epoch 1 batch 0): step skipped (2 in a row" in out
    logged = metrics(tmp_path / "run")
    assert [r["step"] for r in logged] == list(range(1, 9))  # a skipped step leaves no gap in the curve
    assert all(r["loss"] == r["loss"] for r in logged) and logged[-1]["skipped_steps"] == 2
    assert is_finite(tmp_path / "run", task)


def test_too_many_nonfinite_losses_in_a_row_stop_the_run_saying_where(tmp_path):
    task = FaultyCopyTask(bad_calls=set(range(5, 100)))
    with pytest.raises(
        FloatingPointError, match=r"loss is nan at step 5 \(epoch 1 batch 2\), 3 steps in a row"
    ):
        Trainer(recipe(max_steps=10, average_last=0, max_nonfinite_skips=2), task, tmp_path / "run").fit()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000003"
    assert is_finite(tmp_path / "run", task)


def test_nonfinite_weights_are_never_written_over_a_good_checkpoint(tmp_path):
    task = FaultyCopyTask(spoil_weights_at=6)  # the loss of step 6 is finite, the weights after it are not
    with pytest.raises(
        FloatingPointError, match=r"weights are not finite at step 6 .*step_0000003\) is kept"
    ):
        Trainer(recipe(max_steps=10, average_last=0, eval_every=100), task, tmp_path / "run").fit()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000003"
    assert is_finite(tmp_path / "run", task)


def test_a_full_disk_at_a_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, capsys
):
    path = write_recipe(tmp_path / "data", max_steps=9, save_every=3, eval_every=100)
    save_model, calls = checkpoint_module.save_model, []

    def disk_fills_up(model, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save_model(model, filename)

    monkeypatch.setattr(checkpoint_module, "save_model", disk_fills_up)
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: cannot write checkpoint ")
    assert error[-1].endswith(
        "step_0000006: No space left on device; the last good checkpoint (step_0000003) is kept"
    )
    verify_checkpoint(latest_checkpoint(run / "checkpoints"), need_state=True)
    assert not list(run.glob("**/.*.tmp"))  # the half-written one is gone
    # With space again, the run resumes from it.
    monkeypatch.setattr(checkpoint_module, "save_model", save_model)
    assert main(["train", str(path), "--run-dir", str(run), "--resume"]) == 0
    assert [r["step"] for r in metrics(run)] == list(range(1, 10))


def test_an_unwritable_run_directory_fails_before_training(tmp_path, monkeypatch, capsys):
    path = write_recipe(tmp_path / "data")
    run = tmp_path / "run"
    write_text = Path.write_text

    def refuse(self, *args, **kwargs):
        if self.name == ".write-test":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse)
    assert main(["train", str(path), "--run-dir", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: run directory {run} is not writable: Permission denied"
    )
    assert not (run / "metrics.jsonl").exists()


def test_a_read_only_run_directory_fails_before_training(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip(
            "running as root: chmod does not stop root from writing (the monkeypatched test covers it)"
        )
    path = write_recipe(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        assert main(["train", str(path), "--run-dir", str(run)]) == 2
    finally:
        run.chmod(0o700)
    assert "is not writable: Permission denied" in capsys.readouterr().err


def test_rewinding_metrics_drops_later_steps_and_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    path.write_text("\n".join(lines))
    assert rewind_metrics(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        rewind_metrics(path, 5)


def test_a_checkpoint_moved_aside_for_a_replacement_that_never_came_is_restored(tmp_path):
    model = CopyTask(batch_size=4).build_model()
    best = checkpoint_module.save_checkpoint(tmp_path / "best", model, meta={"step": 1})
    os.rename(best, tmp_path / ".best.old")  # killed between the two renames of a replacement
    (tmp_path / ".step_0000009.abc.tmp").mkdir()  # killed while writing
    done = checkpoint_module.recover_interrupted_writes(tmp_path)
    assert len(done) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    load_weights(tmp_path / "best", model)

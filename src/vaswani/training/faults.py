"""What the training loop does when something goes wrong: a stop signal, a non-finite loss or weights.

SIGINT and SIGTERM do not kill the loop in the middle of a step: the first one asks it to stop after the
current step, save a checkpoint and exit with status 128 + the signal number (130, 143), as a shell reports
a process killed by that signal. A second one of the same kind interrupts at once (KeyboardInterrupt), for
a run that does not stop soon enough. SIGKILL cannot be caught; what protects a run from it is that
checkpoints are written atomically (vaswani.training.checkpoint) and a resumed run rewinds metrics.jsonl
to its checkpoint (`rewind_metrics`).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType

import torch

from vaswani.files import atomic_write_text

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """A context in which SIGINT / SIGTERM set `received` instead of ending the process.

    Handlers can only be installed from the main thread; elsewhere (a server thread, say) the context
    leaves signals alone and `received` stays None.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:
            raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point tensors of `model` (parameters and buffers) holding NaN or inf."""
    return [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def rewind_metrics(path: Path, step: int) -> int:
    """Drop the records of metrics.jsonl logged after `step` (the checkpoint a run resumes from), so that
    the resumed run logs each later step once, and a last line cut short by a kill. Returns how many lines
    were dropped. A damaged line before the end is an error, not something to drop quietly."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept: list[str] = []
    dropped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the write a kill interrupted
                dropped += 1
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON; cannot resume the metrics") from None
        logged_at = record.get("step") if isinstance(record, dict) else None
        if isinstance(logged_at, (int, float)) and logged_at > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped

"""Checkpoints that survive interruption: written atomically, verified on load, never overwritten by a
broken one.

A checkpoint is a directory:
    model.safetensors     the weights (safetensors: no code runs on load)
    training_state.pt     optimizer, scheduler, RNG and data position (torch.save, loaded weights_only=True)
    meta.json             step, metrics, and the sha256 of both files above

It is written into a temporary directory beside its final place, each file flushed to disk, and only then
renamed into place; a pointer file (`LATEST`) is replaced atomically afterwards. A crash at any moment leaves
either the old checkpoint or the new one, never a half-written one under a real name. Loading checks the
checksums, so a truncated or tampered file is refused with a one-line error instead of being used.

A kill can still leave debris under hidden names: a `.NAME.*.tmp` directory (a write that did not finish),
a `.NAME.old` (an existing checkpoint moved aside for its replacement), a `.NAME.trash` (an old checkpoint
being deleted). `recover_interrupted_writes` clears them and puts a `.NAME.old` back when nothing replaced
it; a resumed run calls it first.

Fault tests set VASWANI_FAULT_CHECKPOINT_DELAY_S to hold every write for that many seconds between
writing the files and renaming them into place, so that a kill can be aimed at the middle of a write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from vaswani.files import atomic_write_text

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
LATEST = "LATEST"
FAULT_DELAY_ENV = "VASWANI_FAULT_CHECKPOINT_DELAY_S"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or of another model; one-line message."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    training_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; an existing checkpoint of that name is replaced only once
    the new one is complete."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_model(model, str(tmp / MODEL_FILE))
        files = [MODEL_FILE]
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
            files.append(STATE_FILE)
        for name in files:
            _fsync(tmp / name)
        record = dict(meta or {})
        record["sha256"] = {name: sha256_file(tmp / name) for name in files}
        atomic_write_text(tmp / META_FILE, json.dumps(record, indent=2, sort_keys=True))
        delay = os.environ.get(FAULT_DELAY_ENV)
        if delay:
            time.sleep(float(delay))
        if directory.exists():
            # Move the old one aside first: at every moment one complete checkpoint has a real name.
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def discard_checkpoint(directory: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half-deleted one under its real name: it is
    renamed to a hidden name first (one atomic step), then removed."""
    directory = Path(directory)
    trash = directory.with_name(f".{directory.name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover_interrupted_writes(parent: Path) -> list[str]:
    """Clear what interrupted writes and deletions left in `parent` (see the module docstring); a
    checkpoint moved aside for a replacement that never arrived gets its name back. Returns what was
    done, one line per item."""
    parent = Path(parent)
    done: list[str] = []
    if not parent.is_dir():
        return done
    for path in sorted(parent.iterdir()):
        name = path.name
        if not name.startswith("."):
            continue
        if name.endswith(".old") and path.is_dir():
            original = parent / name[1:-4]
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {name} (replaced by {original.name})")
            else:
                os.rename(path, original)
                done.append(f"restored {original.name} from {name} (its replacement was never completed)")
        elif name.endswith(".trash") or (name.endswith(".tmp") and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {name} (an interrupted write or deletion)")
        elif name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
            done.append(f"removed {name} (an interrupted write)")
    return done


def read_meta(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt (not valid JSON)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise CheckpointError(f"{path}: corrupt (no checksums)")
    for name in meta["sha256"]:
        # meta.json comes with the checkpoint (a downloaded run, a resumed one): the files it names must
        # stay inside the checkpoint, checked before any of them is opened.
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: file name {name!r} points outside the checkpoint")
    return meta


def verify_checkpoint(directory: Path, need_state: bool = False) -> dict[str, Any]:
    """Check that every file of a checkpoint is present and matches its recorded sha256."""
    directory = Path(directory)
    meta = read_meta(directory)
    names = list(meta["sha256"])
    if MODEL_FILE not in names or (need_state and STATE_FILE not in names):
        raise CheckpointError(f"{directory}: incomplete checkpoint (missing {MODEL_FILE} or {STATE_FILE})")
    for name in names:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if sha256_file(path) != meta["sha256"][name]:
            raise CheckpointError(f"{path}: corrupt or truncated (sha256 does not match meta.json)")
    return meta


def load_weights(directory: Path, model: nn.Module) -> dict[str, Any]:
    """Verify a checkpoint and load its weights into `model` (strict: every tensor must match)."""
    meta = verify_checkpoint(directory)
    try:
        missing, unexpected = load_model(model, str(Path(directory) / MODEL_FILE), strict=False)
    except (SafetensorError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{directory}: weights do not fit this model: {first_line}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    return meta


def load_training_state(directory: Path) -> dict[str, Any]:
    verify_checkpoint(directory, need_state=True)
    try:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to unpickle safely means the same thing here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{directory / STATE_FILE}: cannot be loaded safely: {reason}") from None


def set_latest(checkpoints_dir: Path, name: str) -> None:
    atomic_write_text(Path(checkpoints_dir) / LATEST, name + "\n")


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint the LATEST pointer names, or None when there is none yet."""
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"{pointer}: corrupt pointer {name!r}")
    return Path(checkpoints_dir) / name


def step_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete step checkpoints (step_NNNNNNN), oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.glob("step_*") if p.is_dir() and (p / META_FILE).is_file())


def average_checkpoints(directories: list[Path], model: nn.Module) -> nn.Module:
    """Load the element-wise mean of the weights of several checkpoints into `model` (§6.1: "averaging the
    last 5 checkpoints, which were written at 10-minute intervals")."""
    if not directories:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] | None = None
    for directory in directories:
        load_weights(directory, model)
        state = {
            k: v.detach().double().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }
        if total is None:
            total = state
        else:
            for key, value in state.items():
                total[key] += value
    averaged = {k: (v / len(directories)) for k, v in total.items()}
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key in averaged:
                tensor.copy_(averaged[key].to(tensor.dtype))
    return model

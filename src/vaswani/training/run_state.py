"""What a run directory's checkpoints hold and how the loop writes and resumes them.

A step checkpoint holds everything an uninterrupted run would still have in memory: the weights (as one
process holds them, whatever wrapped them in training), the optimizer, scheduler and grad-scaler state, each
rank's RNG state and the data position (`TrainState`). Rank 0 writes; under FSDP every rank first takes part
in gathering the full weights and optimizer state. Before anything is written the weights are checked to
be finite, and a failed write names what failed and which checkpoint is still the last good one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaswani.recipes import Recipe
from vaswani.training import distributed
from vaswani.training.checkpoint import (
    discard_checkpoint,
    latest_checkpoint,
    load_training_state,
    recover_interrupted_writes,
    save_checkpoint,
    set_latest,
    step_checkpoints,
)
from vaswani.training.faults import nonfinite_parameters, rewind_metrics


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    tokens: int = 0
    best_value: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0
    skipped_steps: int = 0  # steps skipped for a non-finite loss

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RunCheckpoints:
    """The checkpoints of one run directory, as one rank of the training job sees them."""

    def __init__(
        self,
        run_dir: Path,
        recipe: Recipe,
        build_model: Callable[[], nn.Module],
        context: distributed.Distributed,
        say: Callable[[str], None],
        metrics_path: Path,
    ) -> None:
        self.run_dir, self.recipe, self.context, self.say = Path(run_dir), recipe, context, say
        self.directory = self.run_dir / "checkpoints"
        self.metrics_path = metrics_path
        self._build_model = build_model
        self.shadow: nn.Module | None = None  # FSDP: rank 0's unsharded copy, for writing checkpoints

    def plain_model(self, model: nn.Module) -> nn.Module:
        """The model as a single process holds it, on rank 0 (FSDP: the shards gathered into a copy on the
        CPU; every rank must call this then)."""
        if not (self.context.active and self.context.mode == "fsdp"):
            return model
        full = distributed.full_model_state(model, self.context)
        if not self.context.is_main:
            return model  # not written from here
        if self.shadow is None:
            self.shadow = self._build_model()
        self.shadow.load_state_dict(full)
        return self.shadow

    def write(self, directory: Path, model: nn.Module, training_state, meta: dict[str, Any]) -> None:
        """save_checkpoint, refusing weights that are not finite and naming what failed and what is kept."""
        last = latest_checkpoint(self.directory)
        kept = f"the last good checkpoint ({last.name if last else 'none yet'}) is kept"
        bad = nonfinite_parameters(model)
        if bad:
            raise FloatingPointError(
                f"weights are not finite at step {meta['step']} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): {directory.name} not written; {kept}"
            )
        try:
            save_checkpoint(directory, model, training_state, meta=meta)
        except OSError as error:
            reason = error.strerror or str(error)
            raise OSError(f"cannot write checkpoint {directory}: {reason}; {kept}") from None

    def save_best(self, model: nn.Module, meta: dict[str, Any]) -> None:
        """Write RUN_DIR/best (all ranks call this; rank 0 writes)."""
        plain = self.plain_model(model)
        self.context.on_main(lambda: self.write(self.run_dir / "best", plain, None, meta))

    def save(self, model, optimizer, scheduler, scaler, state: TrainState) -> None:
        """Write step_NNNNNNN, point LATEST at it and discard the oldest beyond keep_checkpoints (all ranks
        call this; rank 0 writes, the others wait and see its error if it fails)."""
        ctx = self.context
        plain = self.plain_model(model)
        optimizer_state = distributed.full_optimizer_state(model, optimizer, ctx)
        rng_ranks = ctx.gather_to_main(torch.get_rng_state())

        def write() -> None:
            training_state = {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cpu_ranks": rng_ranks,
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "state": state.as_dict(),
                "world_size": ctx.world_size,
            }
            name = f"step_{state.step:07d}"
            meta = {"step": state.step, "epoch": state.epoch}
            self.write(self.directory / name, plain, training_state, meta)
            set_latest(self.directory, name)
            keep = max(self.recipe.train.keep_checkpoints, self.recipe.train.average_last, 1)
            for old in step_checkpoints(self.directory)[:-keep]:
                discard_checkpoint(old)

        ctx.on_main(write)

    def to_resume(self) -> Path:
        """The checkpoint LATEST names, after clearing what a kill may have left behind (rank 0)."""

        def recover() -> None:
            for line in recover_interrupted_writes(self.directory) + recover_interrupted_writes(self.run_dir):
                self.say(f"{self.run_dir}: {line}")

        self.context.on_main(recover)
        checkpoint = latest_checkpoint(self.directory)
        if checkpoint is None:
            raise ValueError(f"--resume: {self.run_dir} has no checkpoint to resume from")
        return checkpoint

    def restore(self, checkpoint: Path, model, optimizer, scheduler, scaler) -> TrainState:
        """Optimizer, schedule, RNG and data position from `checkpoint` (its weights are already loaded);
        metrics.jsonl loses what was logged after it, which the resumed run logs again."""
        ctx = self.context
        saved = load_training_state(checkpoint)
        distributed.load_optimizer_state(model, optimizer, saved["optimizer"], ctx)
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["state"])
        ranks = saved.get("rng_cpu_ranks") or [saved["rng_cpu"]]
        if len(ranks) == ctx.world_size:
            torch.set_rng_state(ranks[ctx.rank])
        else:
            # Another number of processes: the data order carries over (it is global), but per-rank random
            # streams (dropout) cannot; they restart from (seed, step, rank).
            torch.manual_seed((self.recipe.train.seed * 1_000_003 + state.step) * 1_000_033 + ctx.rank)
            self.say(
                f"saved by {len(ranks)} process(es), resumed by {ctx.world_size}: random streams restart "
                f"from (seed, step, rank)"
            )
        if saved["rng_cuda"] and torch.cuda.is_available() and not ctx.active:
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        dropped = ctx.on_main(lambda: rewind_metrics(self.metrics_path, state.step))
        self.say(
            f"resuming {self.run_dir} from {checkpoint.name} (step {state.step}, epoch {state.epoch})"
            + (f"; {dropped} metrics line(s) logged after it dropped" if dropped else "")
        )
        return state

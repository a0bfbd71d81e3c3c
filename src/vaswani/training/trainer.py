"""The training loop: the paper's optimiser and schedule (§5.3), label smoothing (§5.4), gradient
accumulation, clipping, mixed precision, periodic validation, checkpoints that resume exactly, keep-best
and the average of the last checkpoints (§6.1).

The loop knows nothing of translation or classification: a `Task` (vaswani.tasks) builds the model, lists
each epoch's batches, computes the loss of one batch and validates. What the loop owns is the order of
events, so that a resumed run replays exactly what an uninterrupted one would have done: data position
(epoch, batch), optimizer and scheduler state and every RNG are part of each checkpoint.

Under torchrun the same loop runs on every rank, data-parallel (vaswani.training.distributed). Faults are
handled in the loop (vaswani.training.faults): SIGINT/SIGTERM stop after the step with a checkpoint, a
non-finite loss skips its step (up to [train] max_nonfinite_skips in a row) and non-finite weights are
never written.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from vaswani.evaluation import plot_training_curves, read_metrics
from vaswani.files import atomic_write_text
from vaswani.recipes import Recipe, TrainSection, recipe_to_toml
from vaswani.training import distributed
from vaswani.training.checkpoint import (
    average_checkpoints,
    latest_checkpoint,
    load_weights,
    step_checkpoints,
)
from vaswani.training.faults import (
    STOP_SIGNALS,
    StopSignals,
    TrainingInterrupted,
    rewind_metrics,
)
from vaswani.training.losses import LossOutput
from vaswani.training.run_state import RunCheckpoints, TrainState
from vaswani.training.schedules import cosine_lr, inverse_sqrt_lr, noam_lr

METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.toml"


class Task(Protocol):
    """What the training loop needs from a task (see vaswani.tasks)."""

    #: validation metric used to keep the best checkpoint, and whether higher is better
    best_metric: tuple[str, bool]

    def build_model(self) -> nn.Module: ...

    def epoch_batches(self, epoch: int) -> list[Any]:
        """The global batches of an epoch, the same on every rank. A batch is a sequence of examples (a list
        or 1-D tensor of indices, window starts...), or a tuple whose last item is one; under torchrun each
        rank takes its share of it (vaswani.training.distributed.shard)."""
        ...

    def make_batch(self, spec: Any, device: torch.device) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, label_smoothing: float) -> LossOutput: ...

    def batch_tokens(self, batch: Any) -> int:
        """Real (non-pad) tokens in the batch, source and target: what tokens/s counts."""
        ...

    def loss_denominator(self, batch: Any) -> int:
        """What the loss is averaged over (target tokens, or examples), known before the forward pass."""
        ...

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...

    def initialize(self, model: nn.Module) -> list[str]:
        """Load the recipe's init_from weights into a new model; return the tensors that stay new (called
        only for recipes with [model] init_from)."""
        ...


def freeze(model: nn.Module, embeddings: bool, layers: int) -> int:
    """Stop training the embeddings and/or the first `layers` layers of each stack (fine-tuning); returns
    how many parameters were frozen."""
    modules: list[nn.Module] = []
    if embeddings:
        modules += [m for name, m in model.named_children() if name.endswith("embed")]
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if layers and stack is not None:
            if layers > len(stack.layers):
                raise ValueError(
                    f"[train] freeze_layers = {layers}: the model has {len(stack.layers)} layers"
                )
            modules += list(stack.layers[:layers])
    frozen = 0
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                frozen += parameter.numel()
    return frozen


def resolve_device(name: str) -> torch.device:
    """The one place that picks the device: "auto" is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"[train] device = {name!r}: CUDA is not available on this machine")
    return device


def learning_rate_function(recipe: Recipe, d_model: int):
    """step (1-based) -> learning rate, for the schedule the recipe names."""
    t = recipe.train
    if t.lr_schedule == "noam":
        return lambda step: noam_lr(step, d_model, max(t.warmup_steps, 1), t.lr_scale)
    if t.lr_schedule == "inverse_sqrt":
        return lambda step: inverse_sqrt_lr(step, t.lr, max(t.warmup_steps, 1))
    if t.lr_schedule == "cosine":
        return lambda step: cosine_lr(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr)
    return lambda step: t.lr * min(1.0, step / max(t.warmup_steps, 1))


def make_optimizer(model: nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    """Adam as in §5.3 (its weight decay is L2 added to the gradient), or AdamW whose decoupled decay
    touches only matrices: decaying biases and LayerNorm gains pulls them towards 0, which nothing asks for
    (as nanoGPT does). The learning rate is 1.0 here; the schedule multiplies it."""
    betas = (t.beta1, t.beta2)
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers (fine-tuning) stay out
    implementation = adam_implementation(params)
    if t.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=1.0, betas=betas, eps=t.eps, weight_decay=t.weight_decay, **implementation
        )
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=1.0, betas=betas, eps=t.eps, **implementation)


FUSED_ADAM_DEVICES = ("cpu", "cuda")


def adam_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """`fused=True` where PyTorch has a fused Adam kernel (CPU and CUDA floating-point parameters), else
    `foreach=True`. The same update either way; the fused kernel does it in one pass over each tensor
    instead of about ten elementwise ops per parameter, which is most of an optimizer step's time for a
    small model (docs/PERFORMANCE.md). torch.optim's own default on CPU is the slowest, per-tensor loop."""
    if params and all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


@dataclass
class StepResult:
    """What one optimizer step did, summed over every rank."""

    loss: float  # smoothed loss per target (NaN or inf when the step was skipped for it)
    nll: float
    targets: int  # what the loss averages over, all ranks
    tokens: int  # real source and target tokens, all ranks
    skipped: bool
    stop_signal: int  # a SIGINT/SIGTERM received by any rank (0: none)
    out_of_time: bool  # max_minutes reached (rank 0's clock decides for all)


class Trainer:
    """Trains a task's model into a run directory, resuming from its last checkpoint on request.

    Under torchrun it is one rank of a data-parallel job (vaswani.training.distributed): every rank runs
    the same loop on its share of each global batch; rank 0 alone writes metrics, progress and
    checkpoints, and the others wait for it.
    """

    def __init__(self, recipe: Recipe, task: Task, run_dir: Path, resume: bool = False) -> None:
        self.recipe, self.task, self.run_dir = recipe, task, Path(run_dir)
        self.resume = resume
        self.device = resolve_device(recipe.train.device)
        self.checkpoints_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / METRICS_FILE
        self.context = distributed.Distributed(mode=recipe.train.distributed)

    # ------------------------------------------------------------------ set-up
    def _prepare_run_dir(self) -> None:
        if not self.resume and latest_checkpoint(self.checkpoints_dir) is not None:
            raise ValueError(
                f"{self.run_dir} already holds a training run: pass --resume to continue it, "
                "or choose another --run-dir"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        probe = self.run_dir / ".write-test"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ValueError(f"run directory {self.run_dir} is not writable: {error.strerror}") from None
        (self.run_dir / RECIPE_FILE).write_text(recipe_to_toml(self.recipe), encoding="utf-8")
        if not self.resume:
            # A run killed before its first checkpoint starts over, and so do its metrics.
            dropped = rewind_metrics(self.metrics_path, 0)
            if dropped:
                self._say(f"{self.metrics_path}: {dropped} line(s) of a run with no checkpoint dropped")

    def _autocast(self):
        precision = self.recipe.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _say(self, message: str) -> None:
        if self.context.is_main:
            tqdm.write(message)

    def _build_model(self) -> nn.Module:
        """Rank 0 builds first: building may train and save the tokenizer (or the labels, model.json) into
        the run directory, which the other ranks then read instead of racing to write it."""
        built: list[nn.Module] = []
        self.context.on_main(lambda: built.append(self.task.build_model()))
        return built[0] if built else self.task.build_model()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        self.context, self.device = distributed.setup(self.recipe.train.distributed, self.device)
        self.checkpoints = RunCheckpoints(
            self.run_dir, self.recipe, self.task.build_model, self.context, self._say, self.metrics_path
        )
        try:
            with StopSignals() as signals:
                return self._fit(signals)
        finally:
            distributed.teardown(self.context)

    def _fit(self, signals: StopSignals) -> TrainState:
        recipe, t, ctx = self.recipe, self.recipe.train, self.context
        ctx.on_main(self._prepare_run_dir)
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        model = self._build_model()
        if recipe.init_from is not None and not self.resume:  # a resumed run has its own weights
            fresh = self.task.initialize(model)
            self._say(
                f"initialised from {recipe.init_from}"
                + (f"; trained from scratch: {', '.join(fresh)}" if fresh else "")
            )
        frozen = freeze(model, t.freeze_embeddings, t.freeze_layers)
        if frozen:
            self._say(f"frozen: {frozen:,} parameters")
        checkpoint = self.checkpoints.to_resume() if self.resume else None
        if checkpoint is not None:
            load_weights(checkpoint, model)  # before FSDP shards the parameters
        if ctx.rank > 0:
            # Every rank built the same initial model from the seed; from here each needs its own random
            # stream, or all ranks would drop out the same units of different examples.
            torch.manual_seed(t.seed * 1_000_003 + ctx.rank)
        model.to(self.device)
        step_model = distributed.wrap(model, ctx, self.device)
        optimizer = make_optimizer(model, t)
        lr_at = learning_rate_function(recipe, model.config.d_model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_at(i + 1))
        scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        state = TrainState()
        if checkpoint is not None:
            state = self.checkpoints.restore(checkpoint, model, optimizer, scheduler, scaler)
        if t.compile:
            step_model = torch.compile(step_model)

        batches = self.task.epoch_batches(state.epoch)
        bar = tqdm(
            total=t.max_steps,
            initial=state.step,
            disable=not (t.progress and ctx.is_main),
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file needs no 10 updates a second
            desc=recipe.name,
            unit="step",
        )
        started = time.perf_counter() - state.elapsed
        window_tokens, window_start = 0, time.perf_counter()
        window_loss = window_nll = 0.0
        window_targets = 0
        saved_at = state.step
        skipped_in_a_row = 0
        out_of_time = False
        model.train()
        while state.step < t.max_steps and not out_of_time:
            if t.max_epochs is not None and state.epoch >= t.max_epochs:
                break
            specs, places = [], []
            while len(specs) < t.grad_accum:
                if state.batch_in_epoch >= len(batches):
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    batches = self.task.epoch_batches(state.epoch)
                specs.append(distributed.shard(batches[state.batch_in_epoch], ctx.rank, ctx.world_size))
                places.append(f"epoch {state.epoch} batch {state.batch_in_epoch}")
                state.batch_in_epoch += 1
            micro = [(self.task.make_batch(spec, self.device), stand_in) for spec, stand_in in specs]
            timed_out = t.max_minutes is not None and (time.perf_counter() - started) / 60 >= t.max_minutes
            result = self._step(step_model, micro, optimizer, scaler, signals.received or 0, timed_out)
            out_of_time = result.out_of_time
            if result.skipped:
                skipped_in_a_row += 1
                state.skipped_steps += 1
                where = f"step {state.step + 1} ({', '.join(places)})"
                if skipped_in_a_row > t.max_nonfinite_skips:
                    raise FloatingPointError(
                        f"loss is {result.loss} at {where}"
                        + (f", {skipped_in_a_row} steps in a row" if skipped_in_a_row > 1 else "")
                        + "; the last good checkpoint is kept"
                    )
                self._say(
                    f"loss is {result.loss} at {where}: step skipped "
                    f"({skipped_in_a_row} in a row; more than {t.max_nonfinite_skips} stop the run)"
                )
            else:
                skipped_in_a_row = 0
                scheduler.step()
                state.step += 1
                state.tokens += result.tokens
                window_tokens += result.tokens
                window_loss += result.loss * result.targets
                window_nll += result.nll * result.targets
                window_targets += result.targets
                bar.update(1)
                if state.step % t.log_every == 0 or state.step == 1:
                    # Loss and NLL are averaged over the steps since the last line (per target), as fairseq
                    # logs them: one step's loss alone is too noisy to read a curve from.
                    now = time.perf_counter()
                    record = {
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": round(window_loss / max(window_targets, 1), 6),
                        "nll": round(window_nll / max(window_targets, 1), 6),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1),
                        "targets": window_targets,  # what the losses average over: target tokens, or examples
                    }
                    if state.skipped_steps:
                        record["skipped_steps"] = state.skipped_steps
                    self._log(record)
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                    )
                    window_tokens, window_start = 0, now
                    window_loss = window_nll = 0.0
                    window_targets = 0
                last_step = state.step >= t.max_steps
                if state.step % t.eval_every == 0 or last_step:
                    self._validate(model, state)
                    model.train()
                if state.step % t.save_every == 0 or last_step:
                    state.elapsed = time.perf_counter() - started
                    self.checkpoints.save(model, optimizer, scheduler, scaler, state)
                    saved_at = state.step
            if result.stop_signal:
                if saved_at != state.step:
                    state.elapsed = time.perf_counter() - started
                    self.checkpoints.save(model, optimizer, scheduler, scaler, state)
                bar.close()
                name = signal.Signals(result.stop_signal).name
                raise TrainingInterrupted(
                    f"stopped by {name} at step {state.step}: checkpoint step_{state.step:07d} saved; "
                    f"continue with --resume",
                    result.stop_signal,
                )
        if saved_at != state.step:
            # Stopped by max_epochs or max_minutes between checkpoints: validate and save where we are.
            self._validate(model, state)
            state.elapsed = time.perf_counter() - started
            self.checkpoints.save(model, optimizer, scheduler, scaler, state)
        bar.close()
        self._finish(model, state)
        return state

    def _step(self, model, micro, optimizer, scaler, stop_signal: int, timed_out: bool) -> StepResult:
        """One optimizer step over the micro-batches of `micro`, equivalent to one step on their union
        over all ranks: each micro-batch's summed loss is divided by the target tokens of the whole global
        step. Only the last micro-batch reduces gradients across ranks. A non-finite loss on any rank skips
        the step (no weight changes) on every rank."""
        t, ctx = self.recipe.train, self.context
        local = sum(int(self.task.loss_denominator(b)) for b, stand_in in micro if not stand_in)
        (total,) = ctx.all_reduce_sum([local], self.device)
        # DDP and FSDP average the gradients of the ranks; multiplying by the number of ranks turns that
        # average into the sum over ranks divided by the global token count: one process's gradient on
        # the whole batch.
        scale = ctx.world_size / max(total, 1.0)
        loss_sum = nll_sum = 0.0
        tokens = 0
        for i, (batch, stand_in) in enumerate(micro):
            with distributed.gradient_sync(model, ctx, sync=i == len(micro) - 1):
                with self._autocast():
                    out = self.task.loss(model, batch, t.label_smoothing)
                weight = 0.0 if stand_in else float(out.n_tokens) * scale
                scaler.scale(out.loss * weight).backward()
            if not stand_in:
                loss_sum += out.loss.item() * float(out.n_tokens)
                nll_sum += out.nll.item() * float(out.n_tokens)
                tokens += self.task.batch_tokens(batch)
        got = [float(stop_signal == s) for s in STOP_SIGNALS]
        loss_sum, nll_sum, tokens_sum, time_up, *received = ctx.all_reduce_sum(
            [loss_sum, nll_sum, tokens, float(timed_out and ctx.is_main), *got], self.device
        )
        loss, nll = loss_sum / max(total, 1.0), nll_sum / max(total, 1.0)
        # A signal received by any rank stops them all (torchrun passes a SIGTERM on to every worker, but
        # a scheduler may signal only one); each names the signal it got itself, if any.
        signum = stop_signal or next((int(s) for s, n in zip(STOP_SIGNALS, received, strict=True) if n), 0)
        skipped = not (math.isfinite(loss) and math.isfinite(nll))
        if not skipped:
            if t.clip_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, nll, int(total), int(tokens_sum), skipped, signum, time_up > 0)

    # ------------------------------------------------------------------ validation, logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.context.is_main:
            return
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            last = latest_checkpoint(self.checkpoints_dir)
            raise OSError(
                f"cannot write {self.metrics_path}: {error.strerror or error}; "
                f"the last good checkpoint ({last.name if last else 'none yet'}) is kept"
            ) from None

    def _improves(self, value: float, state: TrainState) -> bool:
        """Whether a validation value beats the best so far, in the task's direction."""
        if state.best_value is None:
            return True
        higher_is_better = self.task.best_metric[1]
        return value > state.best_value if higher_is_better else value < state.best_value

    def _validate(self, model: nn.Module, state: TrainState) -> None:
        # Every rank validates (an FSDP model needs them all to gather its weights); rank 0's numbers
        # decide, so that all ranks agree on the best checkpoint.
        model.eval()
        with torch.no_grad():
            metrics = self.context.broadcast_from_main(self.task.validate(model, self.device))
        self._log({"step": state.step, "split": "valid", **{k: round(v, 6) for k, v in metrics.items()}})
        name = self.task.best_metric[0]
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            return
        better = self._improves(value, state)
        if better:
            state.best_value, state.best_step = value, state.step
            self.checkpoints.save_best(model, {"step": state.step, name: value})
        self._say(
            f"step {state.step}: "
            + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            + ("  (best so far)" if better else "")
        )

    def _finish(self, model: nn.Module, state: TrainState) -> None:
        """Average the last checkpoints (§6.1), choose the final weights, draw the curves (rank 0; under
        FSDP on a CPU copy of the model)."""
        plain = self.checkpoints.plain_model(model)
        device = torch.device("cpu") if plain is self.checkpoints.shadow else self.device
        self.context.on_main(lambda: self._finish_on_main(plain, device, state))

    def _finish_on_main(self, model: nn.Module, device: torch.device, state: TrainState) -> None:
        n = self.recipe.train.average_last
        final = "best" if (self.run_dir / "best").is_dir() else None
        checkpoints = step_checkpoints(self.checkpoints_dir)
        if final is None and checkpoints:
            final = f"checkpoints/{checkpoints[-1].name}"
        if n > 1 and len(checkpoints) >= 2:
            chosen = checkpoints[-n:]
            average_checkpoints(chosen, model)
            meta = {"step": state.step, "averaged": [p.name for p in chosen]}
            self.checkpoints.write(self.run_dir / "averaged", model, None, meta)
            model.eval()
            with torch.no_grad():
                metrics = self.task.validate(model, device)
            self._log({"step": state.step, "split": "valid", "checkpoint": "averaged", **metrics})
            value = metrics.get(self.task.best_metric[0])
            if value is not None and math.isfinite(value) and self._improves(value, state):
                final = "averaged"
            tqdm.write(
                f"averaged {len(chosen)} checkpoints: "
                + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                + f"  -> final weights: {final}"
            )
        if final is not None:
            atomic_write_text(self.run_dir / "FINAL", final + "\n")
        plot_training_curves(read_metrics(self.metrics_path), self.run_dir / "plots")

"""The training loop: accumulation equals the full batch, a resumed run equals an uninterrupted one,
and a broken loss never reaches a checkpoint."""

import copy
import json

import pytest
import torch

import vaswani
from vaswani.copy_task import make_copy_batch
from vaswani.recipes import recipe_from_dict
from vaswani.training import label_smoothed_cross_entropy
from vaswani.training.checkpoint import latest_checkpoint, load_weights
from vaswani.training.trainer import Trainer, make_optimizer


class CopyTask:
    """A tiny synthetic task implementing the trainer's Task protocol."""

    best_metric = ("valid_nll", False)

    def __init__(self, batch_size: int, dropout: float = 0.0, examples: int = 64) -> None:
        self.cfg = vaswani.TransformerConfig.tiny(vocab_size=13, dropout=dropout, max_len=32)
        self.data = make_copy_batch(examples, 13, 3, 8, torch.Generator().manual_seed(0))
        self.valid = make_copy_batch(16, 13, 3, 8, torch.Generator().manual_seed(1))
        self.batch_size, self.examples = batch_size, examples
        self.nan_at_step: int | None = None
        self.calls = 0

    def build_model(self):
        return vaswani.Transformer(self.cfg)

    def epoch_batches(self, epoch):
        order = torch.randperm(self.examples, generator=torch.Generator().manual_seed(epoch)).tolist()
        return [order[i : i + self.batch_size] for i in range(0, self.examples, self.batch_size)]

    def make_batch(self, indices, device):
        return tuple(t[indices].to(device) for t in (self.data.src, self.data.tgt_in, self.data.tgt_out))

    def loss(self, model, batch, label_smoothing):
        self.calls += 1
        src, tgt_in, tgt_out = batch
        out = label_smoothed_cross_entropy(model(src, tgt_in), tgt_out, label_smoothing, 0)
        if self.nan_at_step is not None and self.calls >= self.nan_at_step:
            out.loss = out.loss * float("nan")
        return out

    def batch_tokens(self, batch):
        return int((batch[0] != 0).sum() + (batch[2] != 0).sum())

    def loss_denominator(self, batch):
        return int((batch[2] != 0).sum())

    def validate(self, model, device):
        logits = model(self.valid.src, self.valid.tgt_in)
        return {"valid_nll": label_smoothed_cross_entropy(logits, self.valid.tgt_out, 0.0, 0).nll.item()}


def recipe(**train):
    values = {"log_every": 1, "eval_every": 3, "save_every": 3, "progress": False, "warmup_steps": 4}
    values.update(train)
    return recipe_from_dict({"model": {"preset": "tiny"}, "train": {"lr_scale": 1.0, **values}})


def records(run_dir, split=None):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("split") == split]


def final_weights(run_dir, task):
    model = task.build_model()
    load_weights(latest_checkpoint(run_dir / "checkpoints"), model)
    return model.state_dict()


def test_accumulated_micro_batches_equal_the_full_batch(tmp_path):
    full_task, micro_task = CopyTask(batch_size=16), CopyTask(batch_size=8)
    # Adam divides by sqrt(v) + eps: with eps = 1e-9 a gradient that is zero up to rounding (the key bias,
    # which softmax ignores) becomes a full-size step of noise. A larger eps keeps the comparison about
    # the gradients, which is what accumulation must get right.
    Trainer(recipe(max_steps=4, average_last=0, eps=1e-3), full_task, tmp_path / "full").fit()
    Trainer(recipe(max_steps=4, grad_accum=2, average_last=0, eps=1e-3), micro_task, tmp_path / "micro").fit()
    full, micro = final_weights(tmp_path / "full", full_task), final_weights(tmp_path / "micro", micro_task)
    for name in full:
        torch.testing.assert_close(micro[name], full[name], atol=2e-6, rtol=1e-5, msg=name)
    losses = [r["loss"] for r in records(tmp_path / "full")]
    assert [r["loss"] for r in records(tmp_path / "micro")] == pytest.approx(losses, rel=1e-5)


def test_resumed_training_equals_uninterrupted(tmp_path):
    # Dropout on: the RNG state must be restored too, not only weights and optimizer.
    whole = CopyTask(batch_size=16, dropout=0.1)
    Trainer(recipe(max_steps=8, average_last=0), whole, tmp_path / "whole").fit()
    first = CopyTask(batch_size=16, dropout=0.1)
    Trainer(recipe(max_steps=3, average_last=0), first, tmp_path / "parts").fit()
    with pytest.raises(ValueError, match="already holds a training run"):
        Trainer(recipe(max_steps=8, average_last=0), first, tmp_path / "parts").fit()
    rest = CopyTask(batch_size=16, dropout=0.1)
    Trainer(recipe(max_steps=8, average_last=0), rest, tmp_path / "parts", resume=True).fit()
    uninterrupted = [(r["step"], r["loss"], r["lr"]) for r in records(tmp_path / "whole")]
    resumed = [(r["step"], r["loss"], r["lr"]) for r in records(tmp_path / "parts")]
    assert resumed == uninterrupted
    a, b = final_weights(tmp_path / "whole", whole), final_weights(tmp_path / "parts", rest)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_loss_falls_and_metrics_are_well_formed(tmp_path):
    task = CopyTask(batch_size=16)
    options = {"eval_every": 10, "save_every": 10, "lr_scale": 0.2, "warmup_steps": 10}
    Trainer(recipe(max_steps=30, **options), task, tmp_path / "run").fit()
    train = records(tmp_path / "run")
    assert {"step", "loss", "nll", "lr", "tokens_per_s"} <= set(train[0])
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    valid = records(tmp_path / "run", "valid")
    assert [r["step"] for r in valid if "checkpoint" not in r] == [10, 20, 30]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "averaged" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "FINAL").read_text().strip() in ("best", "averaged")
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == ["loss.png", "lr.png"]


def test_a_nan_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
    task = CopyTask(batch_size=16)
    task.nan_at_step = 5
    with pytest.raises(FloatingPointError, match="loss is nan at step 5"):
        Trainer(recipe(max_steps=10, average_last=0), task, tmp_path / "run").fit()
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.name == "step_0000003"
    model = task.build_model()
    load_weights(checkpoint, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_runs_and_follows_fp32(tmp_path, precision):
    results = {}
    for p in ("fp32", precision):
        task = CopyTask(batch_size=16)
        options = {"lr_scale": 0.2, "warmup_steps": 10, "precision": p, "average_last": 0}
        Trainer(recipe(max_steps=12, **options), task, tmp_path / p).fit()
        results[p] = [r["loss"] for r in records(tmp_path / p)]
    assert all(map(lambda x: x == x, results[precision]))  # no NaN
    # Low precision changes the numbers a little, not the course of training.
    assert results[precision] == pytest.approx(results["fp32"], rel=0.05)


@pytest.mark.slow
def test_compiled_training_step_computes_the_same_losses(tmp_path):
    losses = {}
    for compile_step in (False, True):
        task = CopyTask(batch_size=16)
        options = {"average_last": 0, "compile": compile_step, "eval_every": 100, "save_every": 100}
        Trainer(recipe(max_steps=3, **options), task, tmp_path / str(compile_step)).fit()
        losses[compile_step] = [r["loss"] for r in records(tmp_path / str(compile_step))]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_adamw_decays_matrices_only_and_adam_keeps_the_papers_optimizer():
    model = vaswani.Transformer(vaswani.TransformerConfig.tiny(vocab_size=13))
    adam = make_optimizer(model, recipe(weight_decay=0.1).train)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 0.1
    adamw = make_optimizer(model, recipe(optimizer="adamw", weight_decay=0.1).train)
    assert type(adamw) is torch.optim.AdamW
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    # Decoupled decay with a zero gradient shrinks a matrix by exactly lr * wd and leaves a bias alone.
    weight, bias = decayed["params"][0], plain["params"][0]
    before_w, before_b = weight.detach().clone(), bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in adamw.param_groups:
        group["lr"] = 0.5
    adamw.step()
    torch.testing.assert_close(weight.detach(), before_w * (1 - 0.5 * 0.1))
    torch.testing.assert_close(bias.detach(), before_b)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_the_fused_optimizer_makes_the_same_updates_as_the_per_tensor_loop(kind):
    torch.manual_seed(0)
    fused_model = vaswani.Transformer(vaswani.TransformerConfig.tiny(vocab_size=13))
    loop_model, initial = copy.deepcopy(fused_model), copy.deepcopy(fused_model)
    section = recipe(optimizer=kind, weight_decay=0.01).train
    fused, loop = make_optimizer(fused_model, section), make_optimizer(loop_model, section)
    assert all(group["fused"] for group in fused.param_groups)  # CPU parameters: the fused kernel
    for group in loop.param_groups:  # torch's plain per-tensor implementation, as the reference
        group.update(fused=None, foreach=False)
    for step in range(5):
        grads = [torch.randn_like(p) for p in fused_model.parameters()]
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * (step + 1)
            optimizer.step()
    assert any(
        not torch.equal(a, b) for a, b in zip(fused_model.parameters(), initial.parameters(), strict=True)
    )
    for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

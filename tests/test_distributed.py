"""Data-parallel training under torchrun on the CPU (gloo): two processes with half of each batch train
exactly like one process with all of it, with DDP and with FSDP, and a run resumes on another number of
processes as if it had never stopped."""

import socket

import pytest
import torch

from run_fixtures import final_weights, max_difference, metrics, run_sequence, write_recipe
from test_trainer import CopyTask, recipe
from vaswani.cli import main
from vaswani.recipes import RecipeError, recipe_from_dict
from vaswani.training import distributed
from vaswani.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_rank_takes_its_share_of_every_global_batch(world_size):
    batch = [7, 3, 9, 1, 4]
    shares = [distributed.shard(batch, rank, world_size) for rank in range(world_size)]
    assert sorted(i for share, _ in shares for i in share) == sorted(batch)  # each example exactly once
    assert not any(stand_in for _, stand_in in shares)
    sizes = [len(share) for share, _ in shares]
    assert max(sizes) - min(sizes) <= 1
    # Image batches keep their (epoch, number) identity, which seeds their augmentation.
    last = world_size - 1
    (epoch, number, indices), _ = distributed.shard((2, 5, batch), last, world_size)
    assert (epoch, number) == (2, 5) and indices == shares[last][0]


def test_a_rank_left_without_examples_gets_a_stand_in_weighted_zero():
    assert distributed.shard([8], 0, 2) == ([8], False)
    assert distributed.shard([8], 1, 2) == ([8], True)
    share, stand_in = distributed.shard(torch.tensor([5, 6, 7]), 1, 2)  # language-model window starts
    assert share.tolist() == [6] and not stand_in


def test_recipes_name_a_known_engine_and_no_fp16_with_fsdp():
    unknown = r"\[train\] distributed = 'horovod': must be one of \('ddp', 'fsdp'\)"
    with pytest.raises(RecipeError, match=unknown):
        recipe_from_dict({"train": {"distributed": "horovod"}})
    with pytest.raises(RecipeError, match="not supported with FSDP here: use bf16"):
        recipe_from_dict({"train": {"distributed": "fsdp", "precision": "fp16"}})
    with pytest.raises(RecipeError, match="max_nonfinite_skips = -1"):
        recipe_from_dict({"train": {"max_nonfinite_skips": -1}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accumulation_reduces_gradients_once_per_optimizer_step(tmp_path, monkeypatch):
    """With grad_accum = 2 the non-final micro-step skips the all-reduce (no_sync): as many reductions
    as with grad_accum = 1, not twice as many."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    wrap = distributed.wrap
    reductions = {}

    def counting_wrap(model, context, device):
        ddp = wrap(model, context, device)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)

        def hook(state, bucket):
            reductions[key] += 1
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, hook)
        return ddp

    monkeypatch.setattr(distributed, "wrap", counting_wrap)
    for key in (1, 2):
        reductions[key] = 0
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        task = CopyTask(batch_size=16 // key)
        Trainer(recipe(max_steps=4, grad_accum=key, average_last=0), task, tmp_path / str(key)).fit()
    assert reductions[1] > 0 and reductions[2] == reductions[1]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_across_process_counts(tmp_path):
    # grad_accum = 2 also exercises no_sync; max_tokens = 120 gives global batches of 5-20 sentences.
    path = write_recipe(tmp_path / "data", grad_accum=2)
    r = str(path)

    def run(name, *extra):
        return ["train", r, "--run-dir", str(tmp_path / name), *extra]

    half = ["--set", "train.max_steps=3"]
    # FSDP validation also decodes (generate() on a sharded model) a few sentences for BLEU.
    fsdp = ["--set", 'train.distributed="fsdp"', "--set", "train.eval_bleu_sentences=4"]
    assert main(run("one")) == 0  # the reference: one process, whole batches, 6 steps
    assert main(run("one_half", *half)) == 0  # one process, 3 steps, to resume on two
    # Batches of one sentence: the second rank only ever has a stand-in, weighted 0.
    single = ["--set", "data.max_sentences=1"]
    assert main(run("one_single", *single)) == 0
    run_sequence(
        [
            run("ddp"),
            run("ddp_half", *half),
            ["copy", str(tmp_path / "ddp_half"), str(tmp_path / "ddp_half_to_one")],
            ["copy", str(tmp_path / "ddp_half"), str(tmp_path / "ddp_half_to_fsdp")],
            run("ddp_half", "--resume"),  # 2 -> 2
            ["copy", str(tmp_path / "one_half"), str(tmp_path / "one_to_two")],
            run("one_to_two", "--resume"),  # 1 -> 2
            run("fsdp", *fsdp),
            run("ddp_half_to_fsdp", "--resume", *fsdp),  # a DDP checkpoint continued by FSDP
            run("ddp_single", *single),
        ],
        processes=2,
    )
    assert main(run("ddp_half_to_one", "--resume")) == 0  # 2 -> 1

    reference = final_weights(tmp_path / "one")
    differences = {
        name: max_difference(reference, final_weights(tmp_path / name))
        for name in ("ddp", "ddp_half", "one_to_two", "ddp_half_to_one", "fsdp", "ddp_half_to_fsdp")
    }
    single_ranks = final_weights(tmp_path / "ddp_single")
    differences["ddp_single"] = max_difference(final_weights(tmp_path / "one_single"), single_ranks)
    print("max abs parameter difference from one process:", differences)  # for docs/RELIABILITY.md
    assert all(d < 1e-5 for d in differences.values()), differences
    # Same losses step for step, logged once per step by rank 0 alone, none twice after a resume.
    losses = [(r["step"], r["loss"]) for r in metrics(tmp_path / "one")]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert "valid_bleu" in metrics(tmp_path / "fsdp", "valid")[-1]
    assert [r["loss"] for r in metrics(tmp_path / "ddp_single")] == pytest.approx(
        [r["loss"] for r in metrics(tmp_path / "one_single")], rel=1e-5
    )
    for name in ("ddp", "ddp_half", "one_to_two", "ddp_half_to_one", "fsdp"):
        logged = [(r["step"], r["loss"]) for r in metrics(tmp_path / name)]
        assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6], name
        assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-5), name

"""Checkpoints: exact round trip, refusal of corrupt ones, atomic replacement, averaging."""

import json

import pytest
import torch

import vaswani
from vaswani.training import checkpoint as ckpt
from vaswani.training.checkpoint import (
    CheckpointError,
    average_checkpoints,
    latest_checkpoint,
    load_training_state,
    load_weights,
    save_checkpoint,
    set_latest,
)


def model(seed=0):
    torch.manual_seed(seed)
    return vaswani.Transformer(vaswani.TransformerConfig.tiny(vocab_size=30))


def test_weights_and_state_round_trip_exactly(tmp_path):
    original, restored = model(0), model(1)
    state = {"step": 7, "rng": torch.get_rng_state(), "optimizer": {"lr": 0.1, "moments": [torch.ones(3)]}}
    save_checkpoint(tmp_path / "c", original, state, meta={"step": 7})
    meta = load_weights(tmp_path / "c", restored)
    assert meta["step"] == 7
    for (name, a), (_, b) in zip(original.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The tied embedding / output matrix is still one tensor after loading.
    assert restored.output_projection.weight is restored.src_embed.tokens.weight
    loaded = load_training_state(tmp_path / "c")
    assert loaded["step"] == 7 and torch.equal(loaded["rng"], state["rng"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta"])
def test_corrupt_or_truncated_checkpoints_are_refused(tmp_path, damage):
    save_checkpoint(tmp_path / "c", model(), {"step": 1})
    weights = tmp_path / "c" / ckpt.MODEL_FILE
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete":
        weights.unlink()
    else:
        (tmp_path / "c" / ckpt.META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        load_weights(tmp_path / "c", model())
    assert "\n" not in str(info.value) and str(tmp_path / "c") in str(info.value)


def test_weights_of_another_model_are_refused(tmp_path):
    save_checkpoint(tmp_path / "c", model())
    other = vaswani.TransformerLM(vaswani.TransformerConfig.tiny(vocab_size=30))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_weights(tmp_path / "c", other)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = model(0)
    save_checkpoint(tmp_path / "c", good, {"step": 1}, meta={"step": 1})

    def broken_save(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path / "c", model(1), {"step": 2}, meta={"step": 2})
    monkeypatch.undo()
    restored = model(2)
    assert load_weights(tmp_path / "c", restored)["step"] == 1
    assert torch.equal(restored.output_projection.weight, good.output_projection.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directory left behind


def test_latest_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    set_latest(tmp_path, "step_0000010")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000010"
    (tmp_path / ckpt.LATEST).write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="corrupt pointer"):
        latest_checkpoint(tmp_path)


def test_averaging_is_the_elementwise_mean(tmp_path):
    models = [model(seed) for seed in range(3)]
    for i, m in enumerate(models):
        save_checkpoint(tmp_path / f"step_{i}", m)
    averaged = average_checkpoints([tmp_path / f"step_{i}" for i in range(3)], model(9))
    for name, tensor in averaged.state_dict().items():
        expected = sum(m.state_dict()[name] for m in models) / 3
        torch.testing.assert_close(tensor, expected, msg=name)


def test_meta_records_checksums(tmp_path):
    save_checkpoint(tmp_path / "c", model(), {"x": 1})
    meta = json.loads((tmp_path / "c" / ckpt.META_FILE).read_text())
    assert set(meta["sha256"]) == {ckpt.MODEL_FILE, ckpt.STATE_FILE}

"""k-fold cross-validation (`vaswani crossvalidate`): folds are a stratified partition of train + valid,
each fold's score is its own held-out data scored by the weights it names, the test split is never read,
and finished folds are kept. After the settings are chosen, a final model may train on train + valid
(`data.train_split = "train+valid"`), never on the test split."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vaswani.vision_task
from vaswani.cli import main
from vaswani.crossvalidation import FOLD_FILE, RESULT_FILE, crossvalidate, stratified_folds
from vaswani.data.datasets import LabeledTexts
from vaswani.data.images import load_digits
from vaswani.recipes import RecipeError, load_recipe
from vaswani.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = [
    "train.max_steps=24",
    "train.eval_every=12",
    "train.save_every=12",
    "train.average_last=2",
    "train.warmup_steps=4",
    "train.lr_schedule='constant'",
    "train.lr=3e-3",
    "train.progress=false",
    "train.threads=1",
    "model.n_encoder_layers=1",
    "model.d_model=16",
    "model.d_ff=32",
]


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=6, max_size=80), k=st.integers(2, 6), seed=st.integers(0, 9)
)
def test_folds_partition_the_examples_and_share_every_class_evenly(labels, k, seed):
    if len(labels) < k:
        with pytest.raises(ValueError, match="cannot make"):
            stratified_folds(labels, k, seed)
        return
    folds = stratified_folds(labels, k, seed)
    assert len(folds) == k
    assert sorted(i for f in folds for i in f) == list(range(len(labels)))
    for label, count in Counter(labels).items():
        per_fold = [sum(labels[i] == label for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    assert folds == stratified_folds(labels, k, seed)  # seeded: the same folds every time


def test_fewer_than_two_folds_is_refused():
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds([0, 1, 0, 1], 1, 0)


def test_digits_folds_score_their_own_held_out_images_and_never_read_the_test_split(
    tmp_path, monkeypatch, capsys
):
    pytest.importorskip("sklearn")
    read = []
    real_load = vaswani.vision_task.load_images

    def recording_load(name, split, data_dir=None):
        read.append(split)
        return real_load(name, split, data_dir=data_dir)

    monkeypatch.setattr(vaswani.vision_task, "load_images", recording_load)
    recipe = functools.partial(load_recipe, ROOT / "configs" / "digits_vit.toml", TINY_VIT)
    out = tmp_path / "cv"
    cv = crossvalidate(recipe, out, k=3, only=[0, 1], say=lambda _: None)
    assert "test" not in read and set(read) == {"train", "valid"}
    assert [f.fold for f in cv.folds] == [0, 1]

    train, valid = real_load("digits", "train"), real_load("digits", "valid")
    pool_images = torch.cat([train.unit_tensor(), valid.unit_tensor()])
    pool_labels = torch.tensor(train.labels + valid.labels)
    folds = stratified_folds(pool_labels.tolist(), 3, 123)
    for result in cv.folds:
        assert result.n_held_out == len(folds[result.fold]) and result.n_train + result.n_held_out == 1438
        assert result.step == 24
        # The recorded score is the held-out fold scored by the last step's weights, recomputed here.
        run = load_run(out / f"fold_{result.fold}", f"step_{24:07d}")
        held = torch.tensor(folds[result.fold])
        probs = run.task.predict(run.model, pool_images[held], torch.device("cpu"))
        accuracy = (probs.argmax(-1) == pool_labels[held]).float().mean().item()
        assert result.accuracy == pytest.approx(accuracy, abs=1e-6)
        assert result.averaged_accuracy is not None and 0.0 <= result.averaged_accuracy <= 1.0

    # Finished folds are kept, the missing one is trained, and the summary covers all three.
    before = (out / "fold_0" / FOLD_FILE).stat().st_mtime_ns
    command = ["crossvalidate", str(ROOT / "configs" / "digits_vit.toml"), "--out", str(out), "--folds", "3"]
    command += [a for s in TINY_VIT for a in ("--set", s)]
    assert main(command) == 0
    assert (out / "fold_0" / FOLD_FILE).stat().st_mtime_ns == before
    # Folds of another setting, fold count or seed are never mixed in: the directory is refused in one line.
    capsys.readouterr()
    for other, what in [
        (["--set", "model.dropout=0.3"], "recipe"),
        (["--seed", "7"], "seed"),
        (["--folds", "4"], "k"),
    ]:
        assert main(command + other) == 2
        error = f"error: {out} holds the folds of another {what}: give this one its own --out"
        assert capsys.readouterr().err.strip() == error
    assert main([*command, "--set", "train.threads=2", "--set", "train.progress=true"]) == 0  # how, not what
    summary = json.loads((out / RESULT_FILE).read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    accuracies = [f["accuracy"] for f in summary["folds"]]
    assert summary["summary"]["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 3)


def test_a_final_model_can_train_on_train_plus_valid(tmp_path):
    pytest.importorskip("sklearn")
    recipe = load_recipe(ROOT / "configs" / "digits_vit.toml", ["data.train_split='train+valid'"])
    task = vaswani.vision_task.ImageClassificationTask(recipe, tmp_path / "run")
    train, valid = load_digits("train"), load_digits("valid")
    joined = task.train_data
    assert len(joined) == len(train) + len(valid) == 1438
    assert joined.labels == train.labels + valid.labels
    assert np.array_equal(joined.images, np.concatenate([train.images, valid.images]))
    assert len(task.valid_data) == len(valid)  # validation still reads its own split


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("train+test", "holds the test split 'test'"),
        ("train+train", "must name each split once"),
        ("train+", "must name each split once"),
    ],
)
def test_train_split_that_repeats_a_split_or_holds_the_test_split_is_refused(split, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "configs" / "trec.toml", [f"data.train_split='{split}'"])


def test_labeled_texts_join_and_subset():
    a = LabeledTexts(["x", "y"], [0, 1], ["neg", "pos"])
    b = LabeledTexts(["z"], [1], ["neg", "pos"])
    joined = LabeledTexts.join([a, b])
    assert (joined.texts, joined.labels, joined.label_names) == (["x", "y", "z"], [0, 1, 1], ["neg", "pos"])
    assert LabeledTexts.join([a]) is a
    part = joined.subset([2, 0])
    assert (part.texts, part.labels) == (["z", "x"], [1, 0])


def test_the_pool_is_train_plus_valid_once_whether_or_not_the_recipe_already_trains_on_both(tmp_path):
    pytest.importorskip("sklearn")
    quick = [*TINY_VIT, "train.max_steps=1", "train.eval_every=1", "train.save_every=1"]
    sizes = {}
    for split in ("train", "train+valid"):
        overrides = [*quick, f"data.train_split='{split}'"]
        recipe = functools.partial(load_recipe, ROOT / "configs" / "digits_vit.toml", overrides)
        (result,) = crossvalidate(recipe, tmp_path / split, k=2, only=[1], say=lambda _: None).folds
        sizes[split] = (result.n_train, result.n_held_out)
    assert sizes["train"] == sizes["train+valid"] and sum(sizes["train"]) == 1438

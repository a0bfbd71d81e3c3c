"""Fine-tuning from pretrained weights: `[model] init_from` ("hf:DIR" or a vaswani run directory), freezing,
and the runs it leaves behind working with the command line."""

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytest.importorskip("sentencepiece", reason="the hf extra (sentencepiece) is not installed")

from hf_fixtures import MARIAN_TEXTS, write_bert, write_marian
from vaswani import load_hf
from vaswani.cli import main
from vaswani.recipes import RecipeError, load_recipe, recipe_from_dict
from vaswani.runs import load_run
from vaswani.tasks import make_task

TEXTS = [
    ("the dog runs fast", "pos"),
    ("a bad film", "neg"),
    ("really good movie", "pos"),
    ("not good", "neg"),
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_bert(tmp_path_factory.mktemp("bert"), seed=5)


def classification_recipe(tmp_path, init_from, train_extra=""):
    data = tmp_path / "data.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in TEXTS * 4))
    path = tmp_path / "recipe.toml"
    path.write_text(
        f"""
[model]
init_from = "{init_from}"
pooling = "mean"
dropout = 0.0
attention_dropout = 0.0

[data]
task = "classification"
dataset = "files"
train_file = "{data}"
valid_file = "{data}"
test_file = "{data}"
max_tokens = 256
max_sentences = 8

[train]
max_steps = 3
lr_schedule = "constant"
lr = 1e-3
warmup_steps = 1
label_smoothing = 0.0
eval_every = 3
save_every = 3
average_last = 0
progress = false
{train_extra}
"""
    )
    return path


def test_initialize_copies_every_pretrained_tensor_and_only_the_head_is_new(bert_dir, tmp_path, one_thread):
    recipe = load_recipe(classification_recipe(tmp_path, f"hf:{bert_dir}"))
    task = make_task(recipe, tmp_path / "run")
    model = task.build_model()
    assert task.initialize(model) == ["head.bias", "head.weight"]
    encoder, _ = load_hf(bert_dir)
    for key, tensor in encoder.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], tensor, rtol=0, atol=0)
    cfg = model.config
    assert (cfg.n_classes, cfg.pooling, cfg.dropout, cfg.cls_id) == (2, "mean", 0.0, task.tokenizer.cls_id)
    assert task.encode(["the dog"])[0][-1] == task.tokenizer.sep_id  # BERT inputs end with [SEP]


def test_fine_tune_freezes_what_it_is_told_and_the_run_serves_the_cli(bert_dir, tmp_path, capsys, one_thread):
    path = classification_recipe(tmp_path, f"hf:{bert_dir}", "freeze_embeddings = true\nfreeze_layers = 1")
    run_dir = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run_dir)]) == 0
    assert "trained from scratch: head.bias, head.weight" in capsys.readouterr().out
    before, _ = load_hf(bert_dir)
    after = load_run(run_dir, device="cpu").model.state_dict()
    for key, tensor in before.state_dict().items():
        frozen = key.startswith(("embed.", "encoder.layers.0."))
        assert torch.equal(after[key], tensor) == frozen, key
    assert main(["classify", str(run_dir), "the dog runs fast"]) == 0
    label, probability, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("pos", "neg") and 0.5 <= float(probability) <= 1.0 and text == "the dog runs fast"
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    assert "accuracy =" in capsys.readouterr().out

    # A vaswani run directory is a starting point too: same classes, so its head comes along.
    again = tmp_path / "again"
    again.mkdir()
    task = make_task(load_recipe(classification_recipe(again, str(run_dir))), tmp_path / "run2")
    model = task.build_model()
    assert task.initialize(model) == []
    for key, tensor in after.items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_init_from_refuses_what_does_not_fit(bert_dir, tmp_path):
    with pytest.raises(RecipeError, match=r"\[model\] d_model: fixed by init_from"):
        load_recipe(classification_recipe(tmp_path, f"hf:{bert_dir}"), ["model.d_model=64"])
    with pytest.raises(RecipeError, match=r"only with \[model\] init_from"):
        recipe_from_dict({"train": {"freeze_layers": 1}})
    recipe = load_recipe(classification_recipe(tmp_path, f"hf:{bert_dir}"), ["data.task=translation"])
    with pytest.raises(
        RecipeError, match="is a TransformerEncoder; a translation run starts from Transformer"
    ):
        make_task(recipe, tmp_path / "run").build_model()
    recipe = load_recipe(classification_recipe(tmp_path, f"hf:{bert_dir}"), ["train.freeze_layers=5"])
    task = make_task(recipe, tmp_path / "run5")
    from vaswani.training.trainer import Trainer

    with pytest.raises(ValueError, match="freeze_layers = 5: the model has 2 layers"):
        Trainer(recipe, task, tmp_path / "run5").fit()


def test_marian_fine_tunes_and_translates(tmp_path, capsys, one_thread):
    directory = write_marian(tmp_path / "marian")
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("\n".join(MARIAN_TEXTS[:3]) + "\n")
    tgt.write_text("\n".join(MARIAN_TEXTS[3:6]) + "\n")
    path = tmp_path / "mt.toml"
    path.write_text(
        f"""
[model]
init_from = "hf:{directory}"

[data]
task = "translation"
dataset = "files"
train_src = "{src}"
train_tgt = "{tgt}"
valid_src = "{src}"
valid_tgt = "{tgt}"
max_tokens = 512

[train]
max_steps = 2
lr_schedule = "constant"
lr = 1e-3
warmup_steps = 1
eval_every = 2
save_every = 2
average_last = 0
progress = false

[decode]
beam_size = 2
max_new_tokens = 6
"""
    )
    run_dir = tmp_path / "run"
    task = make_task(load_recipe(path), run_dir)
    src_ids, _ = task.train_ids
    pad, eos = task.tokenizer.pad_id, task.tokenizer.eos_id
    assert all(ids[-1] == eos for ids in src_ids)  # Marian sources end with </s>
    batch = task.make_batch([0, 1], torch.device("cpu"))
    assert batch.tgt_in[:, 0].tolist() == [pad, pad]  # decoding starts from the pad token
    assert main(["train", str(path), "--run-dir", str(run_dir)]) == 0
    assert main(["translate", str(run_dir), "a man rides a bike"]) == 0
    assert capsys.readouterr().out.strip()  # some text, from the fine-tuned weights

"""Recipe files: every shipped recipe loads, and a wrong key or value is a one-line error naming it."""

from pathlib import Path

import pytest

from vaswani.data.images import IMAGE_DATASETS
from vaswani.recipes import RecipeError, load_recipe, recipe_from_dict, recipe_to_toml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_there_are_recipes():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "multi30k_en_de_cpu"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_recipe_is_valid_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    copy = tmp_path / "copy.toml"
    copy.write_text(recipe_to_toml(recipe))
    assert load_recipe(copy) == recipe
    if recipe.init_from is not None:  # the architecture is the pretrained checkpoint's, not the recipe's
        with pytest.raises(RecipeError, match="init_from"):
            recipe.model_config(vocab_size=1000)
        return
    if recipe.data.task == "image_classification":
        spec = IMAGE_DATASETS[recipe.data.dataset]
        cfg = recipe.vision_config(image_size=spec.image_size, channels=spec.channels, n_classes=10)
        assert cfg.image_size == spec.image_size and cfg.n_classes == 10
        assert cfg.n_patches == (spec.image_size // cfg.patch_size) ** 2
        return
    cfg = recipe.model_config(vocab_size=1000, n_classes=4 if recipe.data.task == "classification" else None)
    assert cfg.vocab_size == 1000


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[train]\nwarmup_step = 10\n",
            r"\[train\] warmup_step: unknown key \(did you mean warmup_steps\?\)",
        ),
        ("[train]\nmax_steps = 'many'\n", r"\[train\] max_steps = 'many': expected int"),
        ("[train]\nmax_steps = 0\n", r"\[train\] max_steps = 0: must be >= 1"),
        ("[train]\nprecision = 'fp8'\n", r"\[train\] precision = 'fp8': must be one of"),
        ("[data]\ntask = 'parsing'\n", r"\[data\] task = 'parsing': must be one of"),
        ("[model]\nd_modle = 128\n", r"\[model\] d_modle: unknown key \(did you mean d_model\?\)"),
        ("[model]\nvocab_size = 10\n", r"\[model\] vocab_size: set from the tokenizer"),
        ("[model]\nd_model = 100\nn_heads = 3\n", r"\[model\] TransformerConfig.d_model=100"),
        ("[model]\npreset = 'huge'\n", r"\[model\] preset = 'huge'"),
        ("[trian]\nmax_steps = 1\n", r"unknown top-level key 'trian' \(did you mean train\?\)"),
        ("[train\n", r"not valid TOML"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_are_read_as_toml_values(tmp_path):
    path = write(tmp_path, "[train]\nmax_steps = 10\n")
    recipe = load_recipe(
        path,
        [
            "train.max_steps=20",
            "train.lr=3e-4",
            "train.compile=true",
            "data.dataset=trec",
            "model.d_model=128",
            "decode.top_k=none",
        ],
    )
    assert recipe.train.max_steps == 20 and recipe.train.lr == 3e-4 and recipe.train.compile is True
    assert recipe.data.dataset == "trec" and recipe.model["d_model"] == 128 and recipe.decode.top_k is None
    with pytest.raises(RecipeError, match=r"expected section\.key=value"):
        load_recipe(path, ["train.max_steps"])
    with pytest.raises(RecipeError, match=r"\[train\] max_step: unknown key"):
        load_recipe(path, ["train.max_step=3"])


def test_ints_are_accepted_for_floats_and_model_preset_applies():
    recipe = recipe_from_dict({"train": {"lr": 1}, "model": {"preset": "tiny", "dropout": 0.0}})
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    cfg = recipe.model_config(vocab_size=50)
    assert (cfg.d_model, cfg.n_encoder_layers, cfg.dropout) == (64, 2, 0.0)

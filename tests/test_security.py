"""Files from elsewhere run no code and name no file outside their place.

- Weights load only from safetensors or with `torch.load(..., weights_only=True)`, and nothing in src/
  imports pickle: checked on the source itself, through its syntax tree.
- A pickle that would run code (a `pytorch_model.bin`, a `training_state.pt`) is refused, and its code
  never runs.
- Names read from files (FINAL, LATEST, meta.json, a shard index, a recipe's name) never lead outside the
  directory they belong to. Paths a user writes in a recipe or on the command line are theirs to choose
  and are used as given (relative to the working directory); the bad-input matrix
  (tests/test_bad_input.py) checks the pointers through every command.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

import vaswani
from vaswani.hub import HFImportError
from vaswani.hub.convert import read_state_dict
from vaswani.recipes import RecipeError, recipe_from_dict
from vaswani.runs import checkpoint_path
from vaswani.training.checkpoint import (
    CheckpointError,
    load_training_state,
    save_checkpoint,
    sha256_file,
    verify_checkpoint,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "vaswani"
SOURCES = sorted(SRC.rglob("*.py"))


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls of `<anything>.load` whose receiver is spelled `name` (torch.load, np.load)."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == name
    ]


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_the_source_scan_sees_the_package():
    assert len(SOURCES) > 30 and SRC / "training" / "checkpoint.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(SRC)) for p in SOURCES])
def test_every_torch_load_is_weights_only_and_nothing_imports_pickle(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for call in _calls(tree, "torch"):
        assert _keyword(call, "weights_only") is True, (
            f"{path}:{call.lineno}: torch.load without weights_only=True"
        )
    for call in _calls(tree, "np") + _calls(tree, "numpy"):
        assert _keyword(call, "allow_pickle") is False, (
            f"{path}:{call.lineno}: np.load without allow_pickle=False"
        )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in ("pickle", "cPickle", "dill", "marshal", "shelve"), (
                f"{path}:{node.lineno}: imports {name}"
            )


def test_the_scan_catches_an_unsafe_load():
    """The check above can fail: a torch.load without weights_only=True is seen."""
    tree = ast.parse(
        "import torch\nstate = torch.load('x.pt')\nsafe = torch.load('y.pt', weights_only=True)\n"
    )
    found = [_keyword(call, "weights_only") for call in _calls(tree, "torch")]
    assert found == [None, True]


class RunsCode:
    """Unpickling this calls os.system: it would create the marker file if a loader ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pytorch_model_bin_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(HFImportError, match="cannot be loaded safely") as info:
        read_state_dict(tmp_path)
    assert "\n" not in str(info.value) and "weights_only` set to `False" not in str(info.value)
    assert not marker.exists()


def test_a_training_state_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    model = vaswani.Transformer(vaswani.TransformerConfig.tiny(vocab_size=16))
    save_checkpoint(tmp_path / "c", model, {"step": 1})
    state = tmp_path / "c" / "training_state.pt"
    torch.save({"step": RunsCode(marker)}, state)
    # A forger rewrites the checksum too: the refusal must come from weights_only, not from sha256.
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    meta["sha256"]["training_state.pt"] = sha256_file(state)
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as info:
        load_training_state(tmp_path / "c")
    assert not marker.exists()
    assert "\n" not in str(info.value)  # one line, without torch's advice to turn weights_only off


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "..", "sub/model.safetensors"])
def test_resuming_refuses_a_meta_json_naming_files_outside_the_checkpoint(tmp_path, name):
    # The resume path (load_training_state) reads meta.json itself, not through runs.load_run.
    model = vaswani.Transformer(vaswani.TransformerConfig.tiny(vocab_size=16))
    save_checkpoint(tmp_path / "c", model, {"step": 1})
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    meta["sha256"][name] = "0" * 64
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    for load in (load_training_state, verify_checkpoint):
        with pytest.raises(CheckpointError, match="points outside the checkpoint"):
            load(tmp_path / "c")


@pytest.mark.parametrize(
    ("pointer", "content"),
    [
        ("FINAL", "../../etc"),
        ("FINAL", "/etc"),
        ("FINAL", "best/../../../etc"),
        ("FINAL", ""),
        ("checkpoints/LATEST", "../../etc"),
        ("checkpoints/LATEST", ".."),
        ("checkpoints/LATEST", "/etc"),
    ],
)
def test_pointer_files_never_lead_outside_the_run(tmp_path, pointer, content):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / pointer).write_text(content + "\n")
    with pytest.raises(CheckpointError, match="corrupt pointer"):
        checkpoint_path(tmp_path, "final" if pointer == "FINAL" else "last")


@pytest.mark.parametrize("name", ["step_../../x", "step_1/../../x", "../best", "/etc"])
def test_checkpoint_names_never_lead_outside_the_run(tmp_path, name):
    with pytest.raises(CheckpointError, match="unknown checkpoint"):
        checkpoint_path(tmp_path, name)


@pytest.mark.parametrize("name", ["../../etc", "/tmp/x", "a/b", "..", "", "a\\..\\b"])
def test_a_recipe_name_cannot_steer_the_run_directory_outside_runs(name):
    """`vaswani train` writes to runs/<name> by default; a recipe from elsewhere must not pick the place."""
    with pytest.raises(RecipeError, match="plain name"):
        recipe_from_dict({"name": name})


def test_plain_recipe_names_are_accepted():
    assert recipe_from_dict({"name": "trec-minilm_s1.v2"}).name == "trec-minilm_s1.v2"

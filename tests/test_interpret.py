"""Attention maps, their pictures and page, the sanity plots, and the `attention` and `plot` commands.

The runs are tiny random models written straight into run directories (recipe, a tokenizer trained here on
a few sentences, a checkpoint, FINAL), so that `load_run` and the command line see real runs without any
training or data files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_runs import MAX_LEN, make_run
from vaswani.cli import main
from vaswani.interpret import (
    AttentionMaps,
    attention_maps,
    plot_cls_attention,
    plot_head,
    readable_token,
    smoothed_target_distribution,
    write_attention_html,
)
from vaswani.interpret.maps import axis_names
from vaswani.runs import load_run
from vaswani.tokenization import BOS_ID

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCE, TARGET = "A little girl is climbing.", "Ein kleines Mädchen klettert."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {task: make_run(root, task, task) for task in ("translation", "classification", "lm")}


@pytest.fixture(scope="module")
def translation_maps(runs) -> AttentionMaps:
    return attention_maps(load_run(runs["translation"]), SOURCE, TARGET)


def ids(values: list[int]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.long)


def assert_maps_equal(maps: dict[str, list[np.ndarray]], expected: dict[str, list[torch.Tensor]]) -> None:
    assert set(maps) == set(expected)
    for name, layers in expected.items():
        assert len(maps[name]) == len(layers)
        for ours, theirs in zip(maps[name], layers, strict=True):
            assert ours.dtype == np.float32
            np.testing.assert_array_equal(ours, theirs[0].numpy())


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()


# ------------------------------------------------------------------------------------------ the maps
def test_translation_maps_are_the_models_attention_probabilities(runs, translation_maps):
    run = load_run(runs["translation"])
    tokenizer = run.task.tokenizer
    src, tgt_in = tokenizer.encode(SOURCE), [BOS_ID, *tokenizer.encode(TARGET)]
    with torch.no_grad():
        _, expected = run.model(ids(src), ids(tgt_in), return_attention=True)
    maps = translation_maps
    assert_maps_equal(maps.maps, expected)
    assert maps.kind == "translation" and maps.target == TARGET
    assert maps.source_tokens == [t.replace("▁", "_") for t in tokenizer.tokens(SOURCE)]
    assert maps.target_tokens == ["<s>", *(t.replace("▁", "_") for t in tokenizer.tokens(TARGET))]
    heads = run.model.config.n_heads
    assert maps.layer("cross", 1).shape == (heads, len(tgt_in), len(src))
    assert maps.layer("decoder", 2).shape == (heads, len(tgt_in), len(tgt_in))
    for layers in maps.maps.values():
        for layer in layers:
            np.testing.assert_allclose(layer.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(np.triu(maps.layer("decoder", 1), k=1) == 0)  # causal: nothing from later tokens


def test_without_a_target_the_decoder_reads_the_models_own_translation(runs):
    run = load_run(runs["translation"])
    maps = attention_maps(run, SOURCE)
    assert maps.target == run.task.translate(run.model, [SOURCE], run.device)[0]
    assert maps.target_ids == [BOS_ID, *run.task.tokenizer.encode(maps.target)]
    with torch.no_grad():
        _, expected = run.model(ids(maps.source_ids), ids(maps.target_ids), return_attention=True)
    assert_maps_equal(maps.maps, expected)


def test_classifier_maps_put_cls_first(runs):
    run = load_run(runs["classification"])
    text = "Who wrote Hamlet ?"
    token_ids = run.task.tokenizer.encode(text)
    with torch.no_grad():
        logits, expected = run.model(ids(token_ids), return_attention=True)
    maps = attention_maps(run, text)
    assert_maps_equal(maps.maps, expected)
    assert maps.source_tokens == ["[CLS]", *run.task.tokenizer.tokens(text)] and maps.target_tokens == []
    assert maps.layer("encoder", 1).shape[1:] == (len(token_ids) + 1, len(token_ids) + 1)
    assert maps.prediction.startswith(run.task.label_names[int(logits.argmax())])
    longest = attention_maps(run, "? " * (MAX_LEN - 1))  # [CLS] + 31 tokens: exactly max_len
    assert longest.layer("encoder", 1).shape[-1] == MAX_LEN


def test_language_model_maps_and_the_models_mode_is_left_alone(runs):
    run = load_run(runs["lm"])
    text = "Who wrote\nHamlet?"
    token_ids = run.task.tokenizer.encode(text)
    with torch.no_grad():
        _, expected = run.model(ids(token_ids), return_attention=True)
    run.model.train()  # dropout on: the maps must still be the eval-mode ones
    maps = attention_maps(run, text)
    assert run.model.training
    assert_maps_equal(maps.maps, expected)
    assert maps.kind == "lm" and maps.axes("decoder") == (maps.target_tokens, maps.target_tokens)
    assert maps.target_tokens[:4] == ["W", "h", "o", "_"] and "\\n" in maps.target_tokens
    assert maps.dropped == 0 and axis_names(maps, "decoder") == ("text", "text")


def test_language_model_maps_of_a_long_text_are_its_last_context_window(runs):
    # What the model reads when it predicts the next token: generation slides the same window.
    run = load_run(runs["lm"])
    text = "Who wrote Hamlet? " * 3
    token_ids = run.task.tokenizer.encode(text)
    assert len(token_ids) > MAX_LEN == run.task.context_window(run.model)
    with torch.no_grad():
        _, expected = run.model(ids(token_ids[-MAX_LEN:]), return_attention=True)
    maps = attention_maps(run, text)
    assert_maps_equal(maps.maps, expected)
    assert maps.dropped == len(token_ids) - MAX_LEN and maps.target_ids == token_ids[-MAX_LEN:]
    assert maps.text == run.task.tokenizer.decode(token_ids[-MAX_LEN:])
    assert axis_names(maps, "decoder") == (f"text (its last {MAX_LEN} tokens)",) * 2


def test_readable_tokens():
    assert readable_token("▁Ein") == "_Ein"
    assert readable_token("##let") == "##let"
    assert [readable_token(c) for c in (" ", "\n", "\t")] == ["_", "\\n", "\\t"]


@pytest.mark.parametrize(
    ("task", "text", "target", "message"),
    [
        ("translation", "", None, "the text is empty"),
        ("translation", "   ", None, "the text is empty"),
        ("translation", SOURCE, "", "the target is empty"),
        ("translation", "a " * 40, "Ein", f"the model takes at most {MAX_LEN}"),
        ("translation", SOURCE, "Ein " * 40, f"the model takes at most {MAX_LEN}"),
        (
            "classification",
            "? " * MAX_LEN,
            None,
            "the text with [CLS] has 33 tokens; the model takes at most 32",
        ),
        ("classification", "Who ?", "x", "a target is for translation runs"),
        ("lm", "  ", None, "the text is empty"),
    ],
)
def test_empty_or_over_long_input_is_refused(runs, task, text, target, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        attention_maps(load_run(runs[task]), text, target)


def test_layers_and_heads_count_from_one(translation_maps, tmp_path):
    maps = translation_maps
    assert maps.layer("encoder", 1) is maps.maps["encoder"][0]
    with pytest.raises(ValueError, match="layers 1 to 2"):
        maps.layer("encoder", 0)
    with pytest.raises(ValueError, match="heads 1 to 2"):
        plot_head(maps, "cross", 1, 3, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no 'encoder' attention"):
        dataclasses.replace(maps, maps={"decoder": maps.maps["decoder"]}).layer("encoder", 1)


def test_label_smoothing_distribution_read_from_the_loss_is_the_formula():
    vocab, epsilon = 7, 0.2
    expected = np.full(vocab, epsilon / (vocab - 2))
    expected[0], expected[3] = 0.0, 1.0 - epsilon
    np.testing.assert_allclose(smoothed_target_distribution(3, vocab, epsilon, pad_id=0), expected, atol=1e-6)
    assert not smoothed_target_distribution(0, vocab, epsilon, pad_id=0).any()


# ------------------------------------------------------------------------------------------ pictures
def test_cls_plot_needs_a_classifier(translation_maps, tmp_path):
    with pytest.raises(ValueError, match="needs a classification run"):
        plot_cls_attention(translation_maps, tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()


def embedded_data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.S)
    assert found, "no embedded data"
    return json.loads(found.group(1))


def test_html_page_holds_every_layer_and_head_and_loads_nothing(translation_maps, tmp_path):
    maps = dataclasses.replace(translation_maps, text=SOURCE + " </script><!-- & <b>")
    page = write_attention_html(maps, tmp_path / "a.html", title="a <title>").read_text(encoding="utf-8")
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    assert page.count("</script>") == 2 and "<title>a &lt;title&gt;</title>" in page
    data = embedded_data(page)
    assert data["text"] == maps.text and data["target"] == TARGET
    assert set(data["kinds"]) == {"encoder", "decoder", "cross"}
    for name, layers in maps.maps.items():
        kind = data["kinds"][name]
        assert (kind["queries"], kind["keys"]) == maps.axes(name)
        stored = np.array(kind["layers"])
        assert stored.shape == (len(layers), *layers[0].shape)
        np.testing.assert_allclose(stored, np.stack(layers), atol=5e-5)


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_html_page_renders_its_controls_in_a_headless_browser(translation_maps, tmp_path):
    path = write_attention_html(translation_maps, tmp_path / "page.html")
    result = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    dom = result.stdout
    assert 'data-ready="1"' in dom, f"the page's script did not finish: {result.stderr[-2000:]}"
    for control in ("kind-encoder", "kind-decoder", "kind-cross", "layer-1", "layer-2", "head-1", "head-2"):
        assert f'id="{control}"' in dom
    assert 'id="head-mean"' in dom and 'id="layer-3"' not in dom
    queries, keys = translation_maps.axes("cross")
    assert dom.count('class="cell"') == len(queries) * len(keys)  # the last layer's cross-attention


# ------------------------------------------------------------------------------------------ commands
def test_attention_command_writes_every_kind_and_prints_the_paths(runs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["attention", str(runs["translation"]), SOURCE, "--target", TARGET, "--out", str(out), "--html"]
    )
    assert code == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    names = sorted(path.name for path in printed)
    expected = [f"{kind}_layer{i}.png" for kind in ("cross", "decoder", "encoder") for i in (1, 2)]
    expected += [f"{kind}_layer2_head1.png" for kind in ("cross", "decoder", "encoder")] + ["attention.html"]
    assert names == sorted(expected)
    assert all(path.parent == out / "a-little-girl-is-climbing" for path in printed)
    for path in printed:
        if path.suffix == ".png":
            assert_png(path)


def test_attention_command_for_a_classifier_draws_the_cls_plot(runs, tmp_path, capsys):
    args = ["attention", str(runs["classification"]), "Who ?", "Who ?", "--layer", "1", "--head", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert {p.parent.name for p in printed} == {"who", "who-2"}
    assert sorted(p.name for p in printed if p.parent.name == "who") == sorted(
        ["encoder_layer1.png", "encoder_layer2.png", "encoder_layer1_head2.png", "cls.png"]
    )
    for path in printed:
        assert_png(path)


@pytest.mark.parametrize(
    ("run", "extra", "message"),
    [
        ("translation", [""], "the text is empty"),
        ("lm", [" "], "the text is empty"),
        ("translation", [SOURCE, "--layer", "3"], "layer 3: the encoder self-attention has layers 1 to 2"),
        ("translation", [SOURCE, "--head", "0"], "head 0"),
        ("translation", [SOURCE, "B", "--target", TARGET], "2 texts but 1 --target"),
        ("lm", ["Who", "--target", "x"], "a target is for translation runs"),
    ],
)
def test_attention_command_bad_input_gives_one_line_and_exit_2(runs, run, extra, message, tmp_path, capsys):
    assert main(["attention", str(runs[run]), *extra, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert captured.out == "" and not any(tmp_path.iterdir())


def test_plot_command_writes_the_sanity_plots(tmp_path, capsys):
    assert main(["plot", "all", "--out", str(tmp_path)]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert [p.name for p in printed] == [
        "positional_encoding.png",
        "masks.png",
        "lr_schedule.png",
        "label_smoothing.png",
    ]
    for path in printed:
        assert_png(path)


def test_new_commands_have_help(capsys):
    for command in ("attention", "plot"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0 and f"usage: vaswani {command}" in capsys.readouterr().out

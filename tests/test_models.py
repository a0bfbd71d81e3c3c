"""The three models and their blocks: causality, padding invariance, attention maps, presets, init."""

import json
import math

import pytest
import torch

import vaswani
from vaswani.layers import sinusoidal_table

V = 23


def tiny(**overrides) -> vaswani.TransformerConfig:
    return vaswani.TransformerConfig.tiny(vocab_size=V, dropout=0.0, **overrides)


def random_ids(batch, length, seed=0):
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


VARIANTS = [
    {},
    {"norm_first": True},
    {"activation": "gelu", "positional": "sinusoidal_concat"},
    {"positional": "learned", "share_embeddings": False, "tie_output": False},
    {"attention_impl": "explicit", "activation": "silu"},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_changing_a_future_target_token_never_changes_earlier_logits(overrides):
    torch.manual_seed(0)
    model = vaswani.Transformer(tiny(**overrides)).eval()
    src, tgt = random_ids(2, 7), random_ids(2, 6, seed=1)
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] + 1 - 3) % (V - 3) + 3
    before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(before[:, :4], after[:, :4], atol=1e-6, rtol=1e-5)
    assert (before[:, 4:] - after[:, 4:]).abs().max() > 1e-4


@pytest.mark.parametrize("overrides", VARIANTS)
def test_language_model_is_causal(overrides):
    torch.manual_seed(0)
    model = vaswani.TransformerLM(tiny(**overrides)).eval()
    ids = random_ids(2, 8)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1 - 3) % (V - 3) + 3
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=1e-6, rtol=1e-5)
    assert (before[:, 5:] - after[:, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("overrides", VARIANTS)
def test_padding_changes_no_real_logit(overrides):
    torch.manual_seed(0)
    model = vaswani.Transformer(tiny(**overrides)).eval()
    src, tgt = random_ids(2, 5), random_ids(2, 4, seed=1)
    src[1, 3:] = 0
    tgt[1, 3:] = 0
    padded_src = torch.cat((src, torch.zeros(2, 4, dtype=torch.long)), dim=1)
    padded_tgt = torch.cat((tgt, torch.zeros(2, 3, dtype=torch.long)), dim=1)
    plain = model(src, tgt)
    padded = model(padded_src, padded_tgt)
    torch.testing.assert_close(padded[0, :4], plain[0, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1, :3], plain[1, :3], atol=1e-5, rtol=1e-5)
    # And each row alone, unpadded, gives the same logits as in the padded batch.
    alone = model(src[1:, :3], tgt[1:, :3])
    torch.testing.assert_close(padded[1:, :3], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_classifier_is_padding_invariant(pooling):
    torch.manual_seed(0)
    model = vaswani.TransformerClassifier(tiny(n_classes=4, pooling=pooling)).eval()
    ids = random_ids(3, 6)
    ids[2, 2:] = 0
    logits = model(ids)
    assert logits.shape == (3, 4)
    padded = model(torch.cat((ids, torch.zeros(3, 5, dtype=torch.long)), dim=1))
    torch.testing.assert_close(padded, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids[2:, :2]), logits[2:], atol=1e-5, rtol=1e-5)


def test_language_model_is_padding_invariant_on_the_right():
    torch.manual_seed(0)
    model = vaswani.TransformerLM(tiny()).eval()
    ids = random_ids(2, 6)
    padded = torch.cat((ids, torch.zeros(2, 3, dtype=torch.long)), dim=1)
    torch.testing.assert_close(model(padded)[:, :6], model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_padding_source_gives_no_nan_in_forward_or_backward(dtype):
    torch.manual_seed(0)
    model = vaswani.Transformer(tiny()).to(dtype)
    src, tgt = random_ids(2, 5), random_ids(2, 4, seed=1)
    src[1] = 0  # an empty source sentence
    logits = model(src, tgt)
    assert torch.isfinite(logits).all()
    logits.float().logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    clf = vaswani.TransformerClassifier(tiny(n_classes=3, pooling="mean")).to(dtype)
    out = clf(torch.zeros(2, 4, dtype=torch.long))
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in clf.parameters() if p.grad is not None)


def test_sdpa_and_explicit_models_compute_the_same_function():
    torch.manual_seed(0)
    fast = vaswani.Transformer(tiny()).eval()
    explicit = vaswani.Transformer(tiny(attention_impl="explicit")).eval()
    explicit.load_state_dict(fast.state_dict())
    src, tgt = random_ids(2, 7), random_ids(2, 5, seed=1)
    src[1, 4:] = 0
    torch.testing.assert_close(fast(src, tgt), explicit(src, tgt), atol=1e-5, rtol=1e-5)


def test_return_attention_gives_distributions_per_layer_and_head():
    torch.manual_seed(0)
    cfg = tiny()
    model = vaswani.Transformer(cfg).eval()
    src, tgt = random_ids(2, 7), random_ids(2, 5, seed=1)
    src[1, 4:] = 0
    logits, attn = model(src, tgt, return_attention=True)
    torch.testing.assert_close(logits, model(src, tgt), atol=1e-5, rtol=1e-5)
    assert set(attn) == {"encoder", "decoder", "cross"}
    expected = {"encoder": (2, 4, 7, 7), "decoder": (2, 4, 5, 5), "cross": (2, 4, 5, 7)}
    for name, shape in expected.items():
        assert len(attn[name]) == 2
        for weights in attn[name]:
            assert weights.shape == shape
            torch.testing.assert_close(weights.sum(-1), torch.ones(shape[:3]))
    for weights in attn["encoder"] + attn["cross"]:
        assert weights[1, :, :, 4:].abs().max() == 0  # no mass on padded source keys
    for weights in attn["decoder"]:
        assert weights.triu(diagonal=1).abs().max() == 0  # none on the future

    lm = vaswani.TransformerLM(cfg)
    _, lm_attn = lm(random_ids(1, 4), return_attention=True)
    assert [w.shape for w in lm_attn["decoder"]] == [(1, 4, 4, 4)] * 2
    clf = vaswani.TransformerClassifier(cfg.replace(n_classes=2))
    _, clf_attn = clf(random_ids(1, 4), return_attention=True)
    assert [w.shape for w in clf_attn["encoder"]] == [(1, 4, 5, 5)] * 2  # [CLS] + 4 tokens


def test_sinusoidal_encoding_follows_section_3_5():
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    concat = sinusoidal_table(50, 16, layout="concat")
    torch.testing.assert_close(concat[:, :8], table[:, 0::2])
    torch.testing.assert_close(concat[:, 8:], table[:, 1::2])


def test_embeddings_are_scaled_by_sqrt_d_model_and_shared():
    torch.manual_seed(0)
    cfg = tiny()
    model = vaswani.Transformer(cfg).eval()
    assert model.src_embed.tokens is model.tgt_embed.tokens
    assert model.output_projection.weight is model.src_embed.tokens.weight
    ids = random_ids(1, 3)
    expected = model.src_embed.tokens(ids) * math.sqrt(cfg.d_model) + sinusoidal_table(3, cfg.d_model)
    torch.testing.assert_close(model.src_embed(ids, torch.arange(3)), expected)
    separate = vaswani.Transformer(tiny(share_embeddings=False, tie_output=False))
    assert separate.src_embed.tokens is not separate.tgt_embed.tokens
    assert separate.output_projection.weight is not separate.tgt_embed.tokens.weight


def test_weight_init_is_xavier_uniform_with_normal_embeddings():
    torch.manual_seed(0)
    cfg = vaswani.TransformerConfig.small(vocab_size=4000)
    model = vaswani.Transformer(cfg)
    emb = model.src_embed.tokens.weight
    assert emb[cfg.pad_id].abs().max() == 0
    assert emb[1:].std().item() == pytest.approx(cfg.d_model**-0.5, rel=0.02)
    layer = model.encoder.layers[0]
    blocks = [*layer.self_attn.in_proj_weight.chunk(3), layer.self_attn.out_proj.weight]
    blocks += [layer.feed_forward.linear1.weight, layer.feed_forward.linear2.weight]
    for weight in blocks:
        fan_out, fan_in = weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert weight.abs().max() <= bound
        assert weight.var().item() == pytest.approx(bound**2 / 3, rel=0.05)  # var of U(-b, b)
    assert layer.self_attn.in_proj_bias.abs().max() == 0
    assert layer.feed_forward.linear1.bias.abs().max() == 0
    norm = layer.attn_block.norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and norm.bias.abs().max() == 0
    assert isinstance(norm, torch.nn.LayerNorm)


def count(model):
    return sum(p.numel() for p in model.parameters())


def expected_transformer_parameters(vocab, d, ff, n_enc, n_dec):
    attention = 4 * d * d + 4 * d
    feed_forward = 2 * d * ff + ff + d
    norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * norm
    decoder_layer = 2 * attention + feed_forward + 3 * norm
    return vocab * d + n_enc * encoder_layer + n_dec * decoder_layer  # one shared embedding matrix


def test_preset_parameter_counts_match_table_3():
    base = vaswani.Transformer(vaswani.TransformerConfig.base(vocab_size=37000))
    big = vaswani.Transformer(vaswani.TransformerConfig.big(vocab_size=37000))
    assert count(base) == expected_transformer_parameters(37000, 512, 2048, 6, 6)
    assert count(big) == expected_transformer_parameters(37000, 1024, 4096, 6, 6)
    # The paper reports 65M and 213M (its vocabulary differs slightly per language pair).
    assert 62e6 < count(base) < 64e6
    assert 212e6 < count(big) < 216e6
    assert base.config.dropout == 0.1 and big.config.dropout == 0.3
    assert (big.config.d_model, big.config.n_heads, big.config.d_ff) == (1024, 16, 4096)


def test_pre_ln_adds_a_final_layer_norm():
    post, pre = vaswani.Transformer(tiny()), vaswani.Transformer(tiny(norm_first=True))
    assert post.encoder.final_norm is None and pre.encoder.final_norm is not None
    assert count(pre) - count(post) == 2 * 2 * 64


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 510, "n_heads": 4}, "d_model"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
        ({"pad_id": 23}, "pad_id"),
        ({"eos_id": -1}, "eos_id"),
        ({"eos_id": 0}, "eos_id"),
        ({"activation": "tanh"}, "activation"),
        ({"positional": "rotary"}, "positional"),
        ({"n_heads": 0}, "n_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_classes": 1}, "n_classes"),
        ({"tgt_vocab_size": 30}, "share_embeddings"),
        ({"pooling": "sum"}, "pooling"),
        ({"attention_impl": "flash"}, "attention_impl"),
        ({"n_classes": 2, "fine_to_class": (0, 0, 0)}, "fine_to_class"),  # class 1 under no fine class
        ({"n_classes": 2, "fine_to_class": (0, 2, 1)}, "fine_to_class"),
        ({"fine_to_class": (0, 1)}, "fine_to_class"),  # no n_classes
    ],
)
def test_config_validation_names_the_field(overrides, field):
    values = {"vocab_size": V, "d_model": 64, "n_heads": 4, **overrides}
    with pytest.raises(ValueError, match=rf"TransformerConfig\.{field}="):
        vaswani.TransformerConfig(**values)


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    cfg = vaswani.TransformerConfig.small(vocab_size=100, norm_first=True)
    assert vaswani.TransformerConfig.from_dict(cfg.to_dict()) == cfg
    fine = cfg.replace(n_classes=2, fine_to_class=(0, -1, 1))
    assert vaswani.TransformerConfig.from_dict(json.loads(json.dumps(fine.to_dict()))) == fine
    with pytest.raises(ValueError, match=r"unknown field.*d_modle"):
        vaswani.TransformerConfig.from_dict({"vocab_size": 10, "d_modle": 8})


def test_bad_inputs_get_clear_errors():
    model = vaswani.Transformer(tiny())
    with pytest.raises(ValueError, match="longer than max_len=256"):
        model(torch.ones(1, 300, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 3), V), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.ones(1, 3), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="n_classes must be set"):
        vaswani.TransformerClassifier(tiny())


def test_classifier_with_fine_classes_averages_the_two_heads_distributions():
    torch.manual_seed(0)
    fine_to_class = (0, 0, -1, 1, 2, 2)
    model = vaswani.TransformerClassifier(tiny(n_classes=3, fine_to_class=fine_to_class)).eval()
    ids = random_ids(4, 7)
    logits, fine_logits = model(ids, return_heads=True)
    assert logits.shape == (4, 3) and fine_logits.shape == (4, 6)
    fine = torch.softmax(fine_logits, -1)
    by_class = torch.stack([fine[:, [0, 1]].sum(-1), fine[:, 3], fine[:, [4, 5]].sum(-1)], dim=-1)
    expected = 0.5 * (torch.softmax(logits, -1) + by_class / by_class.sum(-1, keepdim=True))
    log_probs = model(ids)
    torch.testing.assert_close(log_probs.exp(), expected)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4))
    # The membership matrix is rebuilt from the config, never read from (or written to) a checkpoint.
    state = model.state_dict()
    assert "fine_membership" not in state and state["fine_head.weight"].shape == (6, 64)
    plain = vaswani.TransformerClassifier(tiny(n_classes=3))
    assert plain.fine_head is None and plain(ids, return_heads=True)[1] is None


def test_classifier_with_fine_classes_is_padding_invariant_without_nan_in_half_precision():
    torch.manual_seed(0)
    model = vaswani.TransformerClassifier(tiny(n_classes=2, fine_to_class=(0, 0, -1, 1, 1))).eval()
    ids = random_ids(2, 5)
    padded = torch.cat((ids, torch.zeros(2, 4, dtype=torch.long)), dim=1)
    torch.testing.assert_close(model(padded), model(ids), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(torch.zeros(2, 3, dtype=torch.long))  # rows of padding only
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_masked_lm_reads_what_the_classifier_reads_and_predicts_through_the_embeddings():
    torch.manual_seed(0)
    cfg = tiny(n_classes=3, cls_id=4)
    mlm = vaswani.TransformerMaskedLM(cfg.replace(n_classes=None)).eval()
    torch.nn.init.normal_(mlm.mlm_bias)
    classifier = vaswani.TransformerClassifier(cfg).eval()
    missing, unexpected = classifier.load_state_dict(mlm.state_dict(), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == ["mlm_bias"]
    ids = random_ids(3, 6)
    ids[2, 4:] = 0
    hidden, _, _ = classifier.encode(ids)  # [CLS] + ids through the same weights
    expected = hidden[:, 1:] @ mlm.embed.tokens.weight.T + mlm.mlm_bias
    logits = mlm(ids)
    assert logits.shape == (3, 6, V)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    padded = mlm(torch.cat((ids, torch.zeros(3, 2, dtype=torch.long)), dim=1))
    torch.testing.assert_close(padded[:, :6], logits, atol=1e-5, rtol=1e-5)
    _, attention = mlm(ids, return_attention=True)
    assert attention["encoder"][0].shape == (3, 4, 7, 7)

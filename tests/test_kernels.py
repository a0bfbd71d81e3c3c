"""Prepacked CPU linear layers (vaswani.kernels): the same function as F.linear, used only where it is."""

import pytest
import torch
import torch.nn.functional as F

import vaswani
from vaswani import kernels
from vaswani.benchmark.flops import count_flops

needs_fp32 = pytest.mark.skipif(
    not kernels.prepacking_available(torch.float32), reason="this torch has no oneMKL packed GEMM"
)
needs_bf16 = pytest.mark.skipif(
    not kernels.prepacking_available(torch.bfloat16), reason="no oneDNN bf16 on this CPU"
)


def weights(out_features=48, in_features=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g), torch.randn(out_features, generator=g)


@needs_fp32
@pytest.mark.parametrize("shape", [(8, 32), (8, 1, 32), (2, 4, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_packed_linear_equals_f_linear(shape, with_bias):
    weight, bias = weights()
    bias = bias if with_bias else None
    x = torch.randn(*shape)
    with torch.no_grad():
        packed = kernels.pack(weight, bias, rows=8)
        assert packed is not None and packed.dtype == torch.float32 and packed.applies_to(x)
        torch.testing.assert_close(packed(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_bf16
def test_bf16_packed_linear_equals_autocast_linear():
    weight, bias = weights()
    x = torch.randn(8, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = kernels.pack(weight, bias, rows=8)
        assert packed is not None and packed.dtype == torch.bfloat16 and packed.applies_to(x)
        out, expected = packed(x), F.linear(x, weight, bias)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)


@needs_bf16
def test_bf16_weights_pack_in_bf16():
    weight, bias = (t.bfloat16() for t in weights())
    x = torch.randn(8, 32).bfloat16()
    with torch.no_grad():
        packed = kernels.pack(weight, bias, rows=8)
        assert packed.dtype == torch.bfloat16 and packed.applies_to(x)
        torch.testing.assert_close(packed(x).float(), F.linear(x, weight, bias).float(), rtol=1e-2, atol=1e-2)
        # An fp32 input to bf16 weights is an error for F.linear: not a case for the packed kernel either.
        assert not packed.applies_to(x.float())


@needs_fp32
def test_a_pack_applies_only_where_it_computes_what_f_linear_would():
    weight, bias = weights()
    with torch.no_grad():
        packed = kernels.pack(weight, bias, rows=8)
        assert packed.applies_to(torch.randn(8, 32))
        assert not packed.applies_to(torch.randn(9, 32))  # another row count: the prompt, or the encoder
        assert not packed.applies_to(torch.randn(8, 32, dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear would multiply in bf16 here
            assert not packed.applies_to(torch.randn(8, 32))
    assert not packed.applies_to(torch.randn(8, 32))  # gradients enabled: the packed op has no backward
    assert kernels.pack(weight, bias, rows=kernels.MIN_ROWS - 1) is None
    assert kernels.pack(weight.double(), bias.double(), rows=8) is None


@needs_fp32
def test_a_weight_changed_in_place_after_packing_is_not_read_from_the_stale_copy():
    layer = kernels.Linear(32, 48)
    x = torch.randn(8, 32)
    with torch.no_grad(), kernels.prepacked([layer], rows=8):
        layer(x)  # packs the weight
        assert layer.packs.packed["weight"] is not None
        layer.weight.mul_(2.0)
        layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_fp32
def test_prepacked_packs_on_first_use_and_drops_the_copies_on_exit():
    torch.manual_seed(0)
    model = vaswani.Transformer(vaswani.TransformerConfig.tiny(vocab_size=40)).eval()
    src = torch.randint(4, 40, (5, 7))
    with torch.no_grad(), model.prepacked_decoder(rows=5):
        layer = model.decoder.layers[0]
        assert layer.self_attn.packs is not None and model.encoder.layers[0].self_attn.packs is None
        memory, mask, _ = model.encode(src)
        model.decode(torch.full((5, 1), model.config.bos_id), memory, mask)
        assert set(layer.self_attn.packs.packed) == {"qkv"}  # self-attention: one fused QKV matmul
        assert set(layer.cross_attn.packs.packed) == {"q"}  # keys and values: the memory, not 5 rows
        assert layer.feed_forward.linear1.packs.packed["weight"] is not None
        assert model.output_projection.packs.packed["weight"] is not None
    assert all(getattr(m, "packs", None) is None for m in model.modules())


def test_prepacked_with_too_few_rows_packs_nothing():
    layer = kernels.Linear(32, 48)
    with kernels.prepacked([layer], rows=kernels.MIN_ROWS - 1):
        assert layer.packs is None


def translation_model(seed=0):
    torch.manual_seed(seed)
    cfg = vaswani.TransformerConfig.tiny(vocab_size=50, dropout=0.0)
    return vaswani.Transformer(cfg).eval()


def count_packed_calls(monkeypatch) -> list:
    calls = []
    original = kernels.PackedLinear.__call__

    def counting(self, x):
        calls.append(self.dtype)
        return original(self, x)

    monkeypatch.setattr(kernels.PackedLinear, "__call__", counting)
    return calls


@needs_fp32
@pytest.mark.parametrize("beam_size", [1, 4])
def test_translation_with_prepacked_weights_decodes_the_same_tokens(monkeypatch, beam_size):
    model = translation_model()
    src = torch.randint(4, 50, (6, 9), generator=torch.Generator().manual_seed(1))
    src[2, 6:] = model.config.pad_id
    plain = model.generate(src, max_new_tokens=12, beam_size=beam_size, prepack=False)
    calls = count_packed_calls(monkeypatch)
    packed = model.generate(src, max_new_tokens=12, beam_size=beam_size)
    assert calls and set(calls) == {torch.float32}  # the packed path ran
    assert torch.equal(packed, plain)


@needs_bf16
@pytest.mark.parametrize("beam_size", [1, 4])
def test_translation_under_bf16_autocast_with_prepacked_weights_decodes_the_same_tokens(
    monkeypatch, beam_size
):
    model = translation_model(seed=2)
    src = torch.randint(4, 50, (6, 9), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model.generate(src, max_new_tokens=12, beam_size=beam_size, prepack=False)
        calls = count_packed_calls(monkeypatch)
        packed = model.generate(src, max_new_tokens=12, beam_size=beam_size)
    assert calls and set(calls) == {torch.bfloat16}
    assert torch.equal(packed, plain)


@needs_fp32
def test_language_model_sampling_with_prepacked_weights_draws_the_same_tokens(monkeypatch):
    torch.manual_seed(0)
    model = vaswani.TransformerLM(vaswani.TransformerConfig.tiny(vocab_size=30, dropout=0.0)).eval()
    prompts = torch.randint(4, 30, (5, 6), generator=torch.Generator().manual_seed(4))
    prompts[1, :2] = model.config.pad_id  # padded prompts: a masked first step of more rows than 5
    options = {"max_new_tokens": 10, "do_sample": True, "top_k": 8}
    plain = model.generate(prompts, prepack=False, generator=torch.Generator().manual_seed(5), **options)
    calls = count_packed_calls(monkeypatch)
    packed = model.generate(prompts, generator=torch.Generator().manual_seed(5), **options)
    assert calls
    assert torch.equal(packed, plain)


def test_without_the_kernels_generate_runs_on_f_linear(monkeypatch):
    monkeypatch.setattr(kernels, "prepacking_available", lambda dtype: False)
    calls = count_packed_calls(monkeypatch)
    model = translation_model()
    src = torch.randint(4, 50, (6, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        model.generate(src, max_new_tokens=8), model.generate(src, max_new_tokens=8, prepack=False)
    )
    assert calls == []


@needs_fp32
def test_flop_counter_counts_the_packed_kernel():
    layer = kernels.Linear(32, 48)
    x = torch.randn(8, 1, 32)
    with torch.no_grad(), kernels.prepacked([layer], rows=8):
        assert count_flops(lambda: layer(x)) == 2 * 8 * 32 * 48
        assert layer.packs.packed["weight"] is not None

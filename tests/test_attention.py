"""Scaled dot-product and multi-head attention: the two paths, masks, NaN safety, torch's reference."""

import pytest
import torch
from torch import nn

from vaswani.attention import (
    KVCache,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_qkv(batch=2, heads=3, q_len=5, k_len=7, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lambda n: (batch, heads, n, dim)  # noqa: E731
    return tuple(torch.randn(shape(n), generator=g).to(dtype) for n in (q_len, k_len, k_len))


def test_causal_mask_aligns_queries_to_the_end_of_the_keys():
    assert torch.equal(causal_mask(3, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # Two new queries after three cached keys: they sit at positions 3 and 4.
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)


def test_explicit_path_is_equation_one():
    q, k, v = random_qkv()
    out, weights = scaled_dot_product_attention(q, k, v, need_weights=True)
    expected_weights = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(out, expected_weights @ v)


@pytest.mark.parametrize("kind", ["none", "padding", "causal", "padding+causal", "fully_masked_row"])
def test_sdpa_path_equals_explicit_path(kind):
    q, k, v = random_qkv(q_len=7, k_len=7)
    mask, is_causal = None, False
    if kind in ("padding", "padding+causal"):
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)[:, None, None, :]
    if kind in ("causal", "padding+causal"):
        is_causal = True
    if kind == "fully_masked_row":
        mask = torch.tensor([[1] * 7, [0] * 7], dtype=torch.bool)[:, None, None, :]
    fast, _ = scaled_dot_product_attention(q, k, v, mask, is_causal, impl="sdpa")
    explicit, _ = scaled_dot_product_attention(q, k, v, mask, is_causal, impl="explicit")
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_weights_are_distributions_with_no_mass_on_padding_or_future():
    q, k, v = random_qkv(q_len=6, k_len=6)
    key_real = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    _, weights = scaled_dot_product_attention(
        q, k, v, key_real[:, None, None, :], is_causal=True, need_weights=True
    )
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 6))
    future = ~causal_mask(6, 6)
    assert weights[:, :, future].abs().max() == 0
    assert weights[1, :, :, 4:].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_fully_masked_rows_give_zeros_not_nan(dtype, impl):
    q, k, v = (t.requires_grad_() for t in random_qkv(dtype=dtype))
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[1] = False  # every query of the second example sees no key (a source that is all padding)
    mask[0, :, 2] = False  # and one query of the first
    out, weights = scaled_dot_product_attention(q, k, v, mask, impl=impl, need_weights=impl == "explicit")
    assert not out.isnan().any()
    assert out[1].abs().max() == 0 and out[0, :, 2].abs().max() == 0
    assert out[0, :, 0].abs().max() > 0
    if weights is not None:
        assert weights[1].abs().max() == 0
    (out.float().sum() + (weights.float().sum() if weights is not None else 0)).backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_head_attention_all_padding_source_has_no_nan(dtype):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    memory = torch.randn(2, 4, 16, dtype=dtype, requires_grad=True)
    src_ids = torch.tensor([[5, 6, 7, 0], [0, 0, 0, 0]])
    out, _ = mha(x, memory, mask=padding_mask(src_ids, pad_id=0))
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(memory.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mha.parameters())


def copy_into_torch(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    reference = nn.MultiheadAttention(mha.d_model, mha.n_heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(mha.in_proj_weight)
        reference.in_proj_bias.copy_(mha.in_proj_bias)
        reference.out_proj.weight.copy_(mha.out_proj.weight)
        reference.out_proj.bias.copy_(mha.out_proj.bias)
    return reference.eval()


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_self_attention_equals_torch_multihead_attention(impl):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, impl=impl).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()  # non-zero biases, so a misplaced bias would show
        mha.out_proj.bias.normal_()
    reference = copy_into_torch(mha)
    x = torch.randn(3, 6, 32)
    ids = torch.tensor([[4] * 6, [4] * 4 + [0] * 2, [4] * 2 + [0] * 4])
    causal = causal_mask(6, 6)
    ours, weights = mha(x, mask=padding_mask(ids, 0), is_causal=True, need_weights=True)
    # torch's convention is the opposite: True = may NOT attend.
    theirs, their_weights = reference(
        x, x, x, key_padding_mask=ids == 0, attn_mask=~causal, need_weights=True, average_attn_weights=False
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, their_weights, atol=1e-6, rtol=1e-5)


def test_cross_attention_equals_torch_multihead_attention():
    torch.manual_seed(1)
    mha = MultiHeadAttention(32, 8).eval()
    reference = copy_into_torch(mha)
    query, memory = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    ids = torch.tensor([[4] * 5, [4] * 3 + [0] * 2])
    ours, _ = mha(query, memory, mask=padding_mask(ids, 0))
    theirs, _ = reference(query, memory, memory, key_padding_mask=ids == 0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_torch_multihead_attention_itself_returns_nan_on_an_all_padding_row():
    # The reason for our own handling: the reference produces NaN where we produce zeros.
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    reference = copy_into_torch(mha)
    x = torch.randn(1, 3, 16)
    # (Its eval-mode fast path without weights happens to return zeros; the general path is NaN.)
    theirs, _ = reference(x, x, x, key_padding_mask=torch.ones(1, 3, dtype=torch.bool), need_weights=True)
    ours, _ = mha(x, mask=torch.zeros(1, 1, 1, 3, dtype=torch.bool))
    assert theirs.isnan().all()
    assert torch.isfinite(ours).all()


def test_incremental_self_attention_with_cache_equals_full_causal_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 6, 16)
    full, _ = mha(x, is_causal=True)
    cache = KVCache(capacity=6)
    first, _ = mha(x[:, :2], is_causal=True, cache=cache)  # a two-token prefill, then one at a time
    steps = [first] + [mha(x[:, t : t + 1], is_causal=True, cache=cache)[0] for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)
    assert cache.length == 6
    with pytest.raises(ValueError, match="KV cache holds 6 positions"):
        mha(x[:, :1], is_causal=True, cache=cache)


def test_cache_reorder_selects_rows():
    cache = KVCache(capacity=4)
    keys = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 1)
    cache.append(keys, keys)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.keys[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]


def test_repeated_reorders_and_appends_keep_every_rows_history():
    # Reference: per row, the list of (key, value) it holds; reorder and append on both, many times,
    # including a reorder that changes the number of rows (the spare buffer must follow).
    g = torch.Generator().manual_seed(0)
    cache, rows, history = KVCache(capacity=7), 4, None
    for step in range(7):
        if step:
            index = torch.randint(0, rows, (rows if step != 3 else rows + 2,), generator=g)
            cache.reorder(index)
            history = history.index_select(0, index)
            rows = index.numel()
        new = torch.randn(rows, 2, 1, 3, generator=g)
        keys, values = cache.append(new, -new)
        history = new if history is None else torch.cat((history, new), dim=2)
        assert torch.equal(keys, history) and torch.equal(values, -history)


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("query_len", [1, 3])
def test_cross_attention_over_shared_memory_equals_memory_repeated_per_beam(impl, query_len):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, impl=impl).eval()
    sentences, beams = 3, 4
    memory = torch.randn(sentences, 5, 16)
    mask = torch.ones(sentences, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False  # a padded source
    query = torch.randn(sentences * beams, query_len, 16)
    for need_weights in (False, True):
        shared, shared_w = mha(query, memory, mask=mask, need_weights=need_weights)
        repeated, repeated_w = mha(
            query,
            memory.repeat_interleave(beams, 0),
            mask=mask.repeat_interleave(beams, 0),
            need_weights=need_weights,
        )
        torch.testing.assert_close(shared, repeated)
        if need_weights:
            torch.testing.assert_close(shared_w, repeated_w)
    cache = KVCache()  # the decoding path: keys and values of the sentences projected once, kept
    mha(query, memory, mask=mask, cache=cache)
    assert cache.keys.size(0) == sentences
    torch.testing.assert_close(mha(query, memory, mask=mask, cache=cache)[0], repeated)
    with pytest.raises(ValueError, match="do not group"):
        mha(torch.randn(7, 1, 16), memory, mask=mask)


def test_attention_rejects_unknown_impl():
    with pytest.raises(ValueError, match="attention impl"):
        MultiHeadAttention(8, 2, impl="flash3")

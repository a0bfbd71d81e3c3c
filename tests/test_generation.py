"""Tests of decoding: greedy search, sampling and beam search, through `generate` and the search functions.

Every model here is a small random one (`TransformerConfig.tiny`, dropout 0, fixed seeds). A random model
is a perfectly good oracle for decoding: whatever distribution it defines, cached and uncached decoding must
agree, beam search must find what exhaustive enumeration finds, a sentence must decode the same alone and in
a batch, and so on. Where a test needs the model to behave in a certain way (finish early, never finish,
prefer padding) a forward hook adds a fixed bias to the logits of the output projection.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

import vaswani
from vaswani import Transformer, TransformerConfig, TransformerLM
from vaswani.generation import (
    BeamSearchOutput,
    beam_search,
    check_decoding_options,
    greedy_next_token,
    greedy_search,
    length_penalty,
    next_token_log_probs,
    sample_next_token,
    top_k,
    top_k_filter,
    top_p_filter,
)
from vaswani.models import EXTRA_OUTPUT_TOKENS, _EncoderDecoderStepper, _LMStepper

PAD, BOS, EOS = 0, 1, 2
VOCAB = 24


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- helpers
def make_transformer(seed: int, vocab_size: int = VOCAB, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.tiny(vocab_size=vocab_size, dropout=0.0, **overrides)).eval()


def make_lm(seed: int, vocab_size: int = VOCAB, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig.tiny(vocab_size=vocab_size, dropout=0.0, **overrides)).eval()


def add_logit_bias(model: torch.nn.Module, bias: dict[int, float]) -> None:
    """Add `bias[id]` to the logit of token `id` at every position (cached and uncached paths alike)."""
    vector = torch.zeros(model.config.target_vocab_size)
    for token, value in bias.items():
        vector[token] = value
    model.output_projection.register_forward_hook(lambda _module, _inputs, output: output + vector)


def make_eos_depend_on_context(model: torch.nn.Module, factor: float = 3.0) -> None:
    """Scale the EOS row of an untied output projection: EOS becomes likely after some prefixes and unlikely
    after others, so rows of a batch finish at different steps (a random init rarely does that)."""
    assert not model.config.tie_output
    with torch.no_grad():
        model.output_projection.weight[EOS] *= factor


def right_padded(rows: list[list[int]]) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def left_padded(rows: list[list[int]]) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[PAD] * (width - len(r)) + r for r in rows])


def random_rows(seed: int, lengths: list[int], low: int = 3, high: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lengths]


def content(row: Tensor) -> list[int]:
    """The generated tokens of one output row: up to and including the first EOS, else the non-pad prefix."""
    tokens = row.tolist()
    if EOS in tokens:
        return tokens[: tokens.index(EOS) + 1]
    while tokens and tokens[-1] == PAD:
        tokens.pop()
    return tokens


def assert_well_formed(output: Tensor, limits: list[int]) -> None:
    """Every row: tokens that are neither pad nor BOS, then either EOS followed only by pad, or (no EOS)
    exactly `limit` tokens followed only by pad. The output is no wider than its longest row."""
    assert output.dim() == 2 and output.size(0) == len(limits)
    lengths = []
    for row, limit in zip(output.tolist(), limits, strict=True):
        assert BOS not in row, f"BOS generated: {row}"
        if EOS in row:
            end = row.index(EOS) + 1
            body, tail = row[: end - 1], row[end:]
        else:
            end = limit
            body, tail = row[:limit], row[limit:]
            assert len(body) == limit, f"row stopped before its limit {limit} without EOS: {row}"
        assert end <= limit, f"row longer than its limit {limit}: {row}"
        assert PAD not in body, f"pad before the end of a row: {row}"
        assert all(t == PAD for t in tail), f"non-pad token after the end of a row: {row}"
        lengths.append(end)
    assert output.size(1) == max(lengths), "output wider than its longest row"


def transformer_beam(
    model: Transformer,
    src: Tensor,
    beam_size: int,
    max_new_tokens: int,
    alpha: float = 0.6,
    kind: str = "gnmt",
    use_cache: bool = True,
    stepper_wrapper=None,
) -> BeamSearchOutput:
    """What Transformer.generate does for beam search, returning the whole BeamSearchOutput."""
    cfg = model.config
    memory, memory_mask, _ = model.encode(src)
    stepper = _EncoderDecoderStepper(
        model,
        memory.repeat_interleave(beam_size, dim=0),
        memory_mask.repeat_interleave(beam_size, dim=0),
        capacity=max_new_tokens if use_cache else None,
    )
    if stepper_wrapper is not None:
        stepper = stepper_wrapper(stepper)
    bos = torch.full((src.size(0) * beam_size, 1), cfg.bos_id, dtype=torch.long)
    limits = torch.full((src.size(0),), max_new_tokens, dtype=torch.long)
    return beam_search(
        stepper, bos, src.size(0), beam_size, limits, cfg.eos_id, cfg.pad_id, (PAD, BOS), alpha, kind
    )


def lm_beam(
    model: TransformerLM,
    prompts: Tensor,
    beam_size: int,
    max_new_tokens: int,
    alpha: float = 0.6,
    kind: str = "gnmt",
    stepper_wrapper=None,
) -> BeamSearchOutput:
    """What TransformerLM.generate does for beam search on left-padded prompts, returning BeamSearchOutput."""
    real = prompts != PAD
    padded = not bool(real.all())
    stepper = _LMStepper(
        model,
        real.repeat_interleave(beam_size, dim=0) if padded else None,
        window=model.config.max_len,
        capacity=prompts.size(1) + max_new_tokens,
    )
    if stepper_wrapper is not None:
        stepper = stepper_wrapper(stepper)
    limits = torch.full((prompts.size(0),), max_new_tokens, dtype=torch.long)
    return beam_search(
        stepper,
        prompts.repeat_interleave(beam_size, dim=0),
        prompts.size(0),
        beam_size,
        limits,
        EOS,
        PAD,
        (PAD, BOS),
        alpha,
        kind,
    )


class CountingStepper:
    """Wraps a stepper and counts the decoding steps a search asks for."""

    def __init__(self, inner) -> None:
        self.inner, self.steps = inner, 0

    def step(self, tokens: Tensor) -> Tensor:
        self.steps += 1
        return self.inner.step(tokens)

    def reorder(self, index: Tensor) -> None:
        self.inner.reorder(index)


# Full-model (uncached, one forward pass over the whole sequence) log-probabilities of continuations.
def transformer_sequence_log_probs(model: Transformer, src_row: Tensor, seqs: list[list[int]]) -> list[float]:
    """Sum over each sequence of log_softmax(full vocabulary) of its tokens, given one source sentence."""
    width = max(len(s) for s in seqs)
    tgt_in = torch.tensor([[BOS, *s[:-1]] + [PAD] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src_row[None].expand(len(seqs), -1), tgt_in).float(), dim=-1)
    return [sum(float(log_probs[i, t, tok]) for t, tok in enumerate(s)) for i, s in enumerate(seqs)]


def lm_sequence_log_probs(model: TransformerLM, prompt: list[int], seqs: list[list[int]]) -> list[float]:
    width = len(prompt) + max(len(s) for s in seqs)
    ids = torch.tensor([prompt + s + [PAD] * (width - len(prompt) - len(s)) for s in seqs])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).float(), dim=-1)
    start = len(prompt) - 1
    return [sum(float(log_probs[i, start + t, tok]) for t, tok in enumerate(s)) for i, s in enumerate(seqs)]


# ======================================================================================== 1. cache
def _src_batch() -> Tensor:
    # Rows with different amounts of right padding (0, 3 and 6 pads).
    return right_padded(random_rows(11, [9, 6, 3]))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_equals_full_decoding_transformer(beam_size):
    model = make_transformer(5, tie_output=False)
    make_eos_depend_on_context(model)  # rows finish at different steps, or run to the limit
    src = _src_batch()
    cached = model.generate(src, max_new_tokens=16, beam_size=beam_size, use_cache=True)
    full = model.generate(src, max_new_tokens=16, beam_size=beam_size, use_cache=False)
    assert torch.equal(cached, full)


MODES = {"greedy": {}, "beam": {"beam_size": 3}, "sample": {"do_sample": True, "temperature": 1.3}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_cached_decoding_equals_full_decoding_lm(mode, padding):
    model = make_lm(1, tie_output=False)
    make_eos_depend_on_context(model)
    rows = random_rows(12, [2, 7, 4])
    prompts = left_padded(rows) if padding == "left" else right_padded(rows)
    options = MODES[mode]
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(5)
        outputs.append(
            model.generate(prompts, max_new_tokens=12, use_cache=use_cache, generator=generator, **options)
        )
    assert torch.equal(outputs[0], outputs[1])


def test_cached_step_logits_equal_full_step_logits_transformer():
    model = make_transformer(2)
    beams = 2
    src = _src_batch()
    with torch.no_grad():
        memory, memory_mask, _ = model.encode(src)
        memory, memory_mask = memory.repeat_interleave(beams, 0), memory_mask.repeat_interleave(beams, 0)
        cached = _EncoderDecoderStepper(model, memory, memory_mask, capacity=8)
        full = _EncoderDecoderStepper(model, memory, memory_mask, capacity=None)
        src_rows = src.repeat_interleave(beams, 0)
        g = torch.Generator().manual_seed(0)
        tokens = torch.full((src_rows.size(0), 1), BOS)
        for step in range(8):
            logits_cached, logits_full = cached.step(tokens), full.step(tokens)
            torch.testing.assert_close(logits_cached, logits_full, atol=1e-5, rtol=0)
            # ... and both equal one forward pass of the whole model over the prefix.
            torch.testing.assert_close(logits_cached, model(src_rows, full.prefix)[:, -1], atol=1e-5, rtol=0)
            if step in (2, 5):  # beam search moves hypotheses among the beams of one sentence
                index = torch.tensor([1, 1, 3, 2, 4, 4])
                cached.reorder(index)
                full.reorder(index)
            tokens = torch.randint(3, VOCAB, (src_rows.size(0), 1), generator=g)


@pytest.mark.parametrize("padded", [False, True])
def test_cached_step_logits_equal_full_step_logits_lm(padded):
    model = make_lm(3)
    rows = random_rows(13, [5, 2, 4] if padded else [5, 5, 5])
    prompts = left_padded(rows)  # the steppers take left-padded prompts
    real = prompts != PAD
    with torch.no_grad():
        window = model.config.max_len
        cached = _LMStepper(model, real if padded else None, window, capacity=prompts.size(1) + 7)
        full = _LMStepper(model, real if padded else None, window, capacity=None)
        continuations = [[] for _ in rows]
        g = torch.Generator().manual_seed(1)
        tokens = prompts
        for step in range(7):
            logits_cached, logits_full = cached.step(tokens), full.step(tokens)
            torch.testing.assert_close(logits_cached, logits_full, atol=1e-5, rtol=0)
            # Each row equals its prompt (no padding) + continuation run alone through the whole model.
            for i, row in enumerate(rows):
                alone = model(torch.tensor([row + continuations[i]]))[:, -1]
                torch.testing.assert_close(logits_cached[i : i + 1], alone, atol=1e-5, rtol=0)
            if step == 3:
                index = torch.tensor([2, 0, 0])
                cached.reorder(index)
                full.reorder(index)
                rows = [rows[i] for i in index.tolist()]
                continuations = [list(continuations[i]) for i in index.tolist()]
            tokens = torch.randint(3, VOCAB, (len(rows), 1), generator=g)
            for i, t in enumerate(tokens[:, 0].tolist()):
                continuations[i].append(t)


def test_cached_decoding_equals_full_decoding_without_decoder_layers():
    # TransformerConfig accepts n_decoder_layers=0 ("a non-negative integer"). The decoder is then the target
    # embedding plus positional encoding, and the step logits must still depend on the step's position.
    model = make_transformer(0, n_decoder_layers=0)
    src = _src_batch()
    with torch.no_grad():
        memory, memory_mask, _ = model.encode(src)
        cached = _EncoderDecoderStepper(model, memory, memory_mask, capacity=4)
        full = _EncoderDecoderStepper(model, memory, memory_mask, capacity=None)
        tokens = torch.full((src.size(0), 1), BOS)
        for _ in range(4):
            torch.testing.assert_close(cached.step(tokens), full.step(tokens), atol=1e-5, rtol=0)
            tokens = torch.full((src.size(0), 1), 5)


# ======================================================================================== 2. beam 1 = greedy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_equals_greedy(seed):
    # alpha must be 0 here. With alpha > 0 the length penalty grows with the length, so a beam of one that
    # has just finished with EOS may rightly keep its live hypothesis going: a longer one, divided by a
    # larger lp, can still reach a better normalised score. Greedy search stops at the first EOS, so the two
    # only coincide when scores are raw log-probabilities.
    transformer = make_transformer(seed)
    add_logit_bias(transformer, {EOS: 1.0 + seed})
    src = right_padded(random_rows(20 + seed, [8, 3, 5, 1]))
    limits = torch.tensor([12, 12, 12, 12])
    with torch.no_grad():
        memory, memory_mask, _ = transformer.encode(src)
        bos = torch.full((src.size(0), 1), BOS)

        def stepper():
            return _EncoderDecoderStepper(transformer, memory, memory_mask, capacity=12)

        greedy = greedy_search(stepper(), bos, limits, EOS, PAD, (PAD, BOS))
        beam = beam_search(stepper(), bos, src.size(0), 1, limits, EOS, PAD, (PAD, BOS), alpha=0.0)
    assert torch.equal(beam.tokens, greedy)
    assert torch.equal(transformer.generate(src, max_new_tokens=12, beam_size=1), greedy)

    lm = make_lm(seed)
    add_logit_bias(lm, {EOS: 1.0 + seed})
    prompts = left_padded(random_rows(30 + seed, [4, 1, 6]))
    limits = torch.tensor([10, 10, 10])
    real = prompts != PAD
    with torch.no_grad():
        greedy = greedy_search(
            _LMStepper(lm, real, lm.config.max_len, capacity=16), prompts, limits, EOS, PAD, (PAD, BOS)
        )
        beam = beam_search(
            _LMStepper(lm, real, lm.config.max_len, capacity=16),
            prompts,
            3,
            1,
            limits,
            EOS,
            PAD,
            (PAD, BOS),
            alpha=0.0,
        )
    assert torch.equal(beam.tokens, greedy)
    assert torch.equal(lm.generate(prompts, max_new_tokens=10, beam_size=1), greedy)


# ======================================================================================== 3. brute force
SMALL_VOCAB = 5  # pad 0, bos 1, eos 2, and two real tokens 3 and 4
BRUTE_MAX = 4
# With two real tokens and max_new_tokens 4, a beam of 16 is exhaustive: no step has more than 16 live
# hypotheses, and an EOS extension cut off at rank >= 16 (only possible at the last step) has 16 better
# candidates of the same length, hence the same length penalty.
BRUTE_BEAM = 16
BRUTE_CASES = [(0.0, "gnmt"), (0.6, "gnmt"), (1.0, "gnmt"), (0.5, "power"), (1.0, "power")]


def all_outputs(max_new_tokens: int) -> list[list[int]]:
    """Every output beam search may return: EOS-terminated at any length, or unterminated at the limit;
    never pad or BOS."""
    outputs = []
    for length in range(1, max_new_tokens + 1):
        outputs += [[*body, EOS] for body in itertools.product((3, 4), repeat=length - 1)]
    outputs += [list(body) for body in itertools.product((3, 4), repeat=max_new_tokens)]
    return outputs


def check_against_brute_force(
    result: BeamSearchOutput,
    log_probs: list[list[float]],
    alpha: float,
    kind: str,
    max_new_tokens: int,
    beam_size: int,
) -> None:
    """log_probs[b][i]: the full-model log-probability of all_outputs(max_new_tokens)[i] for sentence b."""
    seqs = all_outputs(max_new_tokens)
    for b, sentence_log_probs in enumerate(log_probs):
        exact = {
            tuple(s): lp / length_penalty(len(s), alpha, kind)
            for lp, s in zip(sentence_log_probs, seqs, strict=True)
        }
        ranked = sorted(exact.items(), key=lambda item: item[1], reverse=True)
        (best, best_score), (_, runner_up_score) = ranked[0], ranked[1]
        assert result.scores[b].item() == pytest.approx(best_score, abs=1e-4)
        if best_score - runner_up_score > 1e-4:  # not a numerical tie
            assert content(result.tokens[b]) == list(best)
        # The whole returned beam: true scores, in order, and the K best of all outputs.
        hypotheses = result.hypotheses[b]
        assert len(hypotheses) == beam_size
        for hyp in hypotheses:
            assert hyp.score == pytest.approx(exact[tuple(hyp.tokens)], abs=1e-4)
            assert hyp.log_prob == pytest.approx(
                hyp.score * length_penalty(len(hyp.tokens), alpha, kind), abs=1e-4
            )
            assert hyp.finished == (hyp.tokens[-1] == EOS)
        expected_scores = [score for _, score in ranked[: len(hypotheses)]]
        assert [h.score for h in hypotheses] == pytest.approx(expected_scores, abs=1e-4)


def _peaky(model: torch.nn.Module, eos_scale: float, scale: float) -> None:
    """Sharper next-token distributions than a random init gives, with EOS likely after some prefixes only."""
    with torch.no_grad():
        model.output_projection.weight.mul_(scale)
    make_eos_depend_on_context(model, eos_scale)


@pytest.mark.parametrize(("alpha", "kind"), BRUTE_CASES)
@pytest.mark.parametrize(("seed", "eos_scale", "scale"), [(0, 1.0, 3.0), (3, 4.0, 1.0)])
def test_beam_search_matches_brute_force_transformer(alpha, kind, seed, eos_scale, scale):
    model = make_transformer(seed, vocab_size=SMALL_VOCAB, tie_output=False)
    _peaky(model, eos_scale, scale)
    src = right_padded([[3, 4, 4, 3, 4], [4, 3], [2, 4, 3, 3]])
    result = transformer_beam(model, src, BRUTE_BEAM, BRUTE_MAX, alpha=alpha, kind=kind)
    seqs = all_outputs(BRUTE_MAX)
    log_probs = [transformer_sequence_log_probs(model, src[b], seqs) for b in range(src.size(0))]
    check_against_brute_force(result, log_probs, alpha, kind, BRUTE_MAX, BRUTE_BEAM)
    generated = model.generate(
        src, max_new_tokens=BRUTE_MAX, beam_size=BRUTE_BEAM, length_penalty=alpha, length_penalty_kind=kind
    )
    assert torch.equal(generated, result.tokens)


@pytest.mark.parametrize(("alpha", "kind"), BRUTE_CASES)
@pytest.mark.parametrize(("seed", "eos_scale", "scale"), [(0, 1.0, 3.0), (3, 4.0, 1.0)])
def test_beam_search_matches_brute_force_lm(alpha, kind, seed, eos_scale, scale):
    model = make_lm(seed, vocab_size=SMALL_VOCAB, tie_output=False)
    _peaky(model, eos_scale, scale)
    prompt_rows = [[3, 4, 4], [4], [3, 3, 4, 3, 4]]
    result = lm_beam(model, left_padded(prompt_rows), BRUTE_BEAM, BRUTE_MAX, alpha=alpha, kind=kind)
    seqs = all_outputs(BRUTE_MAX)
    log_probs = [lm_sequence_log_probs(model, p, seqs) for p in prompt_rows]
    check_against_brute_force(result, log_probs, alpha, kind, BRUTE_MAX, BRUTE_BEAM)
    generated = model.generate(
        right_padded(prompt_rows),
        max_new_tokens=BRUTE_MAX,
        beam_size=BRUTE_BEAM,
        length_penalty=alpha,
        length_penalty_kind=kind,
    )
    assert torch.equal(generated, result.tokens)


class FunctionStepper:
    """A Stepper without a model: the next-token logits of a row are `logits_fn(sentence, prefix)`, where
    prefix is the tuple of tokens generated so far. Lets beam search be checked on arbitrary distributions."""

    def __init__(self, sentences: list[int], logits_fn) -> None:
        self.sentences, self.logits_fn = list(sentences), logits_fn
        self.prefixes: list[tuple[int, ...]] = [() for _ in sentences]
        self.started = False

    def step(self, tokens: Tensor) -> Tensor:
        if self.started:
            self.prefixes = [(*p, t) for p, t in zip(self.prefixes, tokens[:, -1].tolist(), strict=True)]
        self.started = True
        return torch.stack([self.logits_fn(s, p) for s, p in zip(self.sentences, self.prefixes, strict=True)])

    def reorder(self, index: Tensor) -> None:
        self.prefixes = [self.prefixes[i] for i in index.tolist()]
        self.sentences = [self.sentences[i] for i in index.tolist()]


def random_prefix_logits(seed: int, vocab: int = SMALL_VOCAB, scale: float = 2.0):
    """A fixed random function (sentence, prefix) -> logits: an arbitrary autoregressive distribution."""

    def logits_fn(sentence: int, prefix: tuple[int, ...]) -> Tensor:
        generator = torch.Generator().manual_seed(hash((seed, sentence, prefix)) % 2**31)
        return torch.randn(vocab, generator=generator) * scale

    return logits_fn


def function_sequence_log_probs(logits_fn, sentence: int, seqs: list[list[int]]) -> list[float]:
    return [
        sum(float(torch.log_softmax(logits_fn(sentence, tuple(s[:t])), -1)[tok]) for t, tok in enumerate(s))
        for s in seqs
    ]


@pytest.mark.parametrize(("alpha", "kind"), BRUTE_CASES)
@pytest.mark.parametrize("seed", range(6))
def test_beam_search_matches_brute_force_on_arbitrary_distributions(alpha, kind, seed):
    # Random models rarely prefer an EOS in the middle of the range; arbitrary prefix tables often do.
    max_new, beam = 5, 32  # exhaustive for two real tokens and 5 steps (see BRUTE_BEAM)
    logits_fn = random_prefix_logits(seed)
    sentences = 3
    result = beam_search(
        FunctionStepper([b for b in range(sentences) for _ in range(beam)], logits_fn),
        torch.full((sentences * beam, 1), BOS),
        sentences,
        beam,
        torch.full((sentences,), max_new),
        EOS,
        PAD,
        (PAD, BOS),
        alpha,
        kind,
    )
    seqs = all_outputs(max_new)
    log_probs = [function_sequence_log_probs(logits_fn, b, seqs) for b in range(sentences)]
    check_against_brute_force(result, log_probs, alpha, kind, max_new, beam)


@pytest.mark.parametrize(
    ("alpha", "kind", "winner"), [(0.0, "gnmt", "short"), (1.0, "gnmt", "long"), (1.0, "power", "long")]
)
def test_beam_search_keeps_searching_while_the_length_penalty_can_lift_a_live_hypothesis(alpha, kind, winner):
    """Beam 1, limit 10. Step 1: EOS has p=0.6, token 3 has p=0.35. After 3, the model is all but certain
    to write 3 eight more times, then EOS. With a length penalty, [3]*9 + [EOS] (log-prob about -1.06,
    lp(10) = 2.5 for GNMT, 10 for power) beats [EOS] (-0.51, lp(1) = 1): early stopping may only drop the
    live hypothesis when not even lp(limit) could lift it past the finished one."""
    limit = 10

    def logits_fn(_sentence: int, prefix: tuple[int, ...]) -> Tensor:
        probs = torch.full((SMALL_VOCAB,), 5e-4)
        probs[PAD] = probs[BOS] = 0.0
        if not prefix:
            probs[EOS], probs[3], probs[4] = 0.6, 0.35, 0.05
        elif len(prefix) < limit - 1:
            probs[3] = 0.999
        else:
            probs[EOS] = 0.999
        return probs.log()

    result = beam_search(
        FunctionStepper([0], logits_fn),
        torch.tensor([[BOS]]),
        1,
        1,
        torch.tensor([limit]),
        EOS,
        PAD,
        (PAD, BOS),
        alpha,
        kind,
    )
    expected = [EOS] if winner == "short" else [3] * (limit - 1) + [EOS]
    assert content(result.tokens[0]) == expected
    log_prob = function_sequence_log_probs(logits_fn, 0, [expected])[0]
    assert result.scores[0].item() == pytest.approx(
        log_prob / length_penalty(len(expected), alpha, kind), abs=1e-5
    )


# ======================================================================================== 11. early stopping
def reference_beam_search(log_prob_fn, beam_size: int, limit: int, alpha: float, kind: str):
    """The documented beam search of one sentence, without early stopping: it always runs to the limit (or
    until nothing is live). log_prob_fn(list of prefixes) -> (n, V) log-probabilities, banned ids -inf."""
    k = beam_size
    live: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int], float]] = []  # (score, tokens, log_prob)
    for length in range(1, limit + 1):
        log_probs = log_prob_fn([seq for seq, _ in live])
        candidates = [
            (score + float(log_probs[i, v]), [*seq, v])
            for i, (seq, score) in enumerate(live)
            for v in range(log_probs.size(1))
            if log_probs[i, v] > float("-inf")
        ]
        candidates.sort(key=lambda c: c[0], reverse=True)
        live = []
        for rank, (score, seq) in enumerate(candidates[: 2 * k]):
            if seq[-1] == EOS:
                if rank < k:
                    finished.append((score / length_penalty(length, alpha, kind), seq, score))
            elif len(live) < k:
                live.append((seq, score))
        if length == limit:
            finished += [(score / length_penalty(limit, alpha, kind), seq, score) for seq, score in live]
        if not live:
            break
    finished.sort(key=lambda h: h[0], reverse=True)
    return finished[:k]


@pytest.mark.parametrize(("alpha", "kind"), [(0.0, "gnmt"), (0.6, "gnmt"), (1.0, "gnmt"), (0.5, "power")])
def test_beam_search_early_stopping_loses_nothing(alpha, kind):
    """Beam search stops a sentence once no live hypothesis can beat its worst finished one. Stopping must
    not change the result: the K best hypotheses equal those of the same search run to the length limit."""
    model = make_transformer(5, tie_output=False)
    make_eos_depend_on_context(model)
    add_logit_bias(model, {EOS: 1.0})  # with EOS this likely, K hypotheses finish well before the limit
    src = right_padded(random_rows(40, [7, 4, 9]))
    beam_size, limit = 3, 20
    counter = {}

    def wrap(stepper):
        counter["stepper"] = CountingStepper(stepper)
        return counter["stepper"]

    result = transformer_beam(model, src, beam_size, limit, alpha, kind, stepper_wrapper=wrap)
    assert counter["stepper"].steps < limit, "early stopping never happened: the test would prove nothing"
    for b in range(src.size(0)):

        def log_prob_fn(prefixes, b=b):
            tgt_in = torch.tensor([[BOS, *p] for p in prefixes])
            with torch.no_grad():
                logits = model(src[b : b + 1].expand(len(prefixes), -1), tgt_in)[:, -1]
            return next_token_log_probs(logits, (PAD, BOS))

        expected = reference_beam_search(log_prob_fn, beam_size, limit, alpha, kind)
        got = result.hypotheses[b]
        assert [h.tokens for h in got] == [seq for _, seq, _ in expected]
        for h, (score, _, log_prob) in zip(got, expected, strict=True):
            assert h.score == pytest.approx(score, abs=1e-4)
            assert h.log_prob == pytest.approx(log_prob, abs=1e-4)


# ======================================================================================== 4, 5. sampling
@pytest.mark.parametrize(
    "options",
    [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 3.0}],
    ids=["top-k-1", "top-p-tiny", "top-k-1-hot"],
)
def test_top_k_one_sampling_equals_greedy(options):
    # top_p tiny keeps only the most likely token too ("the most likely token is always kept").
    transformer = make_transformer(5)
    add_logit_bias(transformer, {EOS: 1.0})
    src = right_padded(random_rows(50, [6, 2, 9]))
    greedy = transformer.generate(src, max_new_tokens=15)
    sampled = transformer.generate(
        src, max_new_tokens=15, do_sample=True, generator=torch.Generator().manual_seed(0), **options
    )
    assert torch.equal(sampled, greedy)

    lm = make_lm(5)
    prompts = right_padded(random_rows(51, [3, 6]))
    greedy = lm.generate(prompts, max_new_tokens=15)
    sampled = lm.generate(
        prompts, max_new_tokens=15, do_sample=True, generator=torch.Generator().manual_seed(0), **options
    )
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("model_kind", ["transformer", "lm"])
def test_sampling_is_reproducible_with_a_generator_seed(model_kind):
    model = make_transformer(6) if model_kind == "transformer" else make_lm(6)
    inputs = right_padded(random_rows(60, [5, 3, 7, 4]))

    def sample(seed: int, **options) -> Tensor:
        return model.generate(
            inputs,
            max_new_tokens=12,
            do_sample=True,
            generator=torch.Generator().manual_seed(seed),
            **options,
        )

    assert torch.equal(sample(7), sample(7))
    assert torch.equal(sample(7, top_k=5, top_p=0.9), sample(7, top_k=5, top_p=0.9))
    # A sample is not greedy decoding, and different seeds give different samples.
    outputs = [sample(seed, temperature=1.5) for seed in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])
    assert any(not torch.equal(output, model.generate(inputs, max_new_tokens=12)) for output in outputs)


def test_sampling_follows_the_filtered_softmax():
    """Empirical frequencies of sample_next_token match softmax(logits / T) restricted by top-k and top-p,
    with pad and BOS never drawn."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]])
    rows = 20000
    generator = torch.Generator().manual_seed(0)

    def frequencies(**options) -> Tensor:
        draws = sample_next_token(logits.expand(rows, -1), generator=generator, **options)
        return torch.bincount(draws, minlength=logits.size(1)).float() / rows

    banned = (0, 1)
    expected = torch.softmax(logits[0] / 2.0, dim=-1)
    expected[list(banned)] = 0
    expected /= expected.sum()
    torch.testing.assert_close(frequencies(temperature=2.0, banned_ids=banned), expected, atol=0.015, rtol=0)

    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=-1)
    got = frequencies(top_k=2)
    torch.testing.assert_close(got[:2], expected, atol=0.015, rtol=0)
    assert got[2:].sum() == 0
    # softmax(logits) = [.61, .22, .08, ...]: the nucleus for p=0.8 is the first two tokens.
    got = frequencies(top_p=0.8)
    torch.testing.assert_close(got[:2], expected, atol=0.015, rtol=0)
    assert got[2:].sum() == 0


# ======================================================================================== 6. banned tokens
@pytest.mark.parametrize("model_kind", ["transformer", "lm"])
@pytest.mark.parametrize(
    "options",
    [{}, {"beam_size": 3}, {"do_sample": True}, {"do_sample": True, "top_k": 3, "top_p": 0.5}],
    ids=["greedy", "beam", "sample", "sample-top-k-top-p"],
)
def test_generation_never_emits_pad_or_bos(model_kind, options):
    if model_kind == "transformer":
        model = make_transformer(7, tie_output=False)
        inputs = right_padded(random_rows(70, [6, 2, 4]))
    else:
        model = make_lm(7, tie_output=False)
        inputs = right_padded(random_rows(71, [3, 5, 1]))
    # The model now prefers pad and BOS above everything; EOS comes soon after them, so some rows finish.
    add_logit_bias(model, {PAD: 30.0, BOS: 25.0, EOS: 2.0})
    output = model.generate(inputs, max_new_tokens=10, generator=torch.Generator().manual_seed(0), **options)
    assert_well_formed(output, [10] * inputs.size(0))


# ======================================================================================== 7. output format
@pytest.mark.parametrize("beam_size", [1, 4])
def test_each_sentence_decodes_as_if_alone_and_finished_rows_are_eos_then_pad(beam_size):
    model = make_transformer(8, tie_output=False)
    make_eos_depend_on_context(model)
    rows = random_rows(80, [7, 1, 5, 10, 3])
    src = right_padded(rows)
    batch = model.generate(src, beam_size=beam_size)  # default limits: per-sentence source length + 50
    limits = [len(r) + EXTRA_OUTPUT_TOKENS for r in rows]
    assert_well_formed(batch, limits)
    ends = [len(content(row)) for row in batch]
    finished = [EOS in row.tolist() for row in batch]
    # The batch must mix rows that finish with EOS (at different steps) and rows that hit their own limit.
    assert len({end for end, done in zip(ends, finished, strict=True) if done}) >= 2
    assert any(end == limit and not done for end, limit, done in zip(ends, limits, finished, strict=True))
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), beam_size=beam_size)
        assert content(alone[0]) == content(batch[b]), f"sentence {b} decodes differently in a batch"
        assert alone.size(1) == len(content(batch[b]))


# ======================================================================================== 8. default length
@pytest.mark.parametrize("beam_size", [1, 2])
def test_default_max_length_is_source_length_plus_50_capped_at_max_len(beam_size):
    model = make_transformer(9, max_len=64)
    add_logit_bias(model, {EOS: -1e4})  # never finishes
    rows = random_rows(90, [3, 9, 20])  # 53, 59, and 70 capped to 64
    output = model.generate(right_padded(rows), beam_size=beam_size)
    limits = [min(len(r) + EXTRA_OUTPUT_TOKENS, 64) for r in rows]
    assert limits == [53, 59, 64]
    assert output.shape == (3, 64)
    assert [int((row != PAD).sum()) for row in output] == limits
    assert_well_formed(output, limits)


def test_explicit_max_new_tokens_bounds_every_row():
    model = make_transformer(9)
    add_logit_bias(model, {EOS: -1e4})
    output = model.generate(right_padded(random_rows(91, [3, 9])), max_new_tokens=7)
    assert output.shape == (2, 7)
    assert bool((output != PAD).all())


# ======================================================================================== 9. LM batching
@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_lm_prompt_continues_identically_alone_and_in_a_padded_batch(beam_size, padding):
    model = make_lm(10)
    add_logit_bias(model, {EOS: 1.2})
    rows = random_rows(100, [3, 8, 5, 1])
    prompts = left_padded(rows) if padding == "left" else right_padded(rows)
    batch = model.generate(prompts, max_new_tokens=12, beam_size=beam_size)
    assert_well_formed(batch, [12] * len(rows))
    for b, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=12, beam_size=beam_size)
        assert content(alone[0]) == content(batch[b]), f"prompt {b} continues differently in a batch"


def test_lm_output_does_not_repeat_the_prompt():
    model = make_lm(10)
    add_logit_bias(model, {EOS: -1e4})
    prompts = right_padded(random_rows(101, [4, 2]))
    output = model.generate(prompts, max_new_tokens=5)
    assert output.shape == (2, 5)
    # The first new token is the argmax after the prompt, computed here with one full forward pass.
    with torch.no_grad():
        first = model(torch.tensor([random_rows(101, [4, 2])[0]]))[:, -1]
    assert int(output[0, 0]) == int(next_token_log_probs(first, (PAD, BOS)).argmax())


# ======================================================================================== generate's mode
def test_generate_runs_in_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.tiny(vocab_size=VOCAB, dropout=0.5))
    model.train()
    src = right_padded(random_rows(110, [5, 3]))
    first = model.generate(src, max_new_tokens=8)
    second = model.generate(src, max_new_tokens=8)
    assert torch.equal(first, second), "dropout was active during generation"
    assert model.training
    model.eval()
    assert torch.equal(model.generate(src, max_new_tokens=8), first)
    assert not model.training


# ======================================================================================== 10. pure functions
def test_top_k_filter_keeps_exactly_the_k_best():
    scores = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 9):
        filtered = top_k_filter(scores, k)
        kept = torch.isfinite(filtered)
        assert kept.sum(dim=1).tolist() == [k] * 4
        top = scores.topk(k, dim=1).indices
        assert bool(kept.gather(1, top).all())
        assert torch.equal(filtered[kept], scores[kept])
    assert torch.equal(top_k_filter(scores, 10), scores)
    assert torch.equal(top_k_filter(scores, 50), scores)


def test_top_p_filter_keeps_the_smallest_nucleus():
    # Probabilities 0.15, 0.5, 0.05, 0.3 (shuffled, so the filter must map its sorted order back).
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    scores = probs.log()

    def kept(p: float) -> list[int]:
        return torch.isfinite(top_p_filter(scores, p))[0].nonzero().flatten().tolist()

    assert kept(0.3) == [1]  # 0.5 alone reaches 0.3
    assert kept(0.45) == [1]
    assert kept(0.7) == [1, 3]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept(0.9) == [0, 1, 3]  # 0.8 < 0.9 <= 0.95
    assert kept(0.97) == [0, 1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]  # the most likely token is always kept
    assert kept(5e-324) == [1]  # even when p is 0 in float32 (found by fuzzing the HTTP API)
    # Rows are filtered independently; kept scores are unchanged.
    two = torch.cat((scores, scores.flip(-1)))
    filtered = top_p_filter(two, 0.7)
    assert torch.isfinite(filtered).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert torch.equal(filtered[torch.isfinite(filtered)], two[torch.isfinite(filtered)])


def test_length_penalty_values():
    assert length_penalty(1, 0.6) == pytest.approx(1.0)  # GNMT: ((5 + 1) / 6) ** alpha
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(10, 0.6) == pytest.approx(2.5**0.6)
    assert length_penalty(13, 0.5, "gnmt") == pytest.approx(3**0.5)
    assert length_penalty(30, 0.0) == 1.0
    assert length_penalty(4, 0.5, "power") == pytest.approx(2.0)
    assert length_penalty(3, 1.0, "power") == pytest.approx(3.0)
    assert length_penalty(9, 0.0, "power") == 1.0
    with pytest.raises(ValueError, match="length_penalty_kind='linear'"):
        length_penalty(3, 0.6, "linear")


@pytest.mark.parametrize("width", [7, 600, 8000, 8003, 4 * 8000, 37000])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_top_k_equals_torch_topk(width, k):
    g = torch.Generator().manual_seed(width + k)
    scores = torch.randn(6, width, generator=g)
    scores[1, : width // 2] = float("-inf")  # beam search's first step: most candidates are -inf
    scores[2, width // 3 :] = float("-inf")
    scores[3] = torch.randint(0, 5, (width,), generator=g).float()  # ties everywhere
    scores[4, -1] = 100.0  # the best in the last, partial block
    values, indices = top_k(scores, min(k, width))
    expected = scores.topk(min(k, width), dim=-1)
    torch.testing.assert_close(values, expected.values, rtol=0, atol=0)
    assert torch.equal(scores.gather(1, indices), values)  # the indices point at those values
    assert all(len(set(row)) == len(row) for row in indices.tolist())  # and no index twice
    untied = [0, 1, 2, 4, 5]
    assert torch.equal(indices[untied], expected.indices[untied])


def test_greedy_next_token_is_the_argmax_of_the_log_probabilities_without_banned_ids():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 8000, generator=g)
    logits[0, BOS] = logits[1, PAD] = 1e4  # the best token is banned
    expected = next_token_log_probs(logits, (PAD, BOS)).argmax(dim=-1)
    assert torch.equal(greedy_next_token(logits, (PAD, BOS)), expected)
    assert int(greedy_next_token(logits)[0]) == BOS
    half = logits.bfloat16()  # low-precision logits are compared in fp32, as next_token_log_probs does
    assert torch.equal(greedy_next_token(half, (PAD, BOS)), next_token_log_probs(half, (PAD, BOS)).argmax(-1))


@pytest.mark.parametrize("beam_size", [1, 4])
def test_decoding_with_a_realistic_vocabulary_equals_plain_topk_decoding(beam_size, monkeypatch):
    # The small-vocabulary tests never reach top_k's block path; this one does (vocabulary 8,000).
    model = make_transformer(6, vocab_size=8000)
    src = right_padded(random_rows(60, [6, 3, 9], high=8000))
    fast = model.generate(src, max_new_tokens=10, beam_size=beam_size)
    monkeypatch.setattr("vaswani.generation._TOP_K_BLOCK", 10**9)  # every width now takes torch.topk
    assert torch.equal(model.generate(src, max_new_tokens=10, beam_size=beam_size), fast)


def test_next_token_log_probs_bans_after_normalising():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0]])
    out = next_token_log_probs(logits, (0, 1))
    full = torch.log_softmax(logits, dim=-1)
    assert torch.isinf(out[0, :2]).all() and bool((out[0, :2] < 0).all())
    # The remaining scores are the log-probabilities under the whole vocabulary, not renormalised.
    torch.testing.assert_close(out[0, 2:], full[0, 2:])
    assert torch.equal(next_token_log_probs(logits), full)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 2.0}, "beam_size"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"do_sample": True, "beam_size": 3}, "do_sample"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"beam_size": 2, "length_penalty_kind": "linear"}, "length_penalty_kind"),
        ({"length_penalty_kind": "linear"}, "length_penalty_kind"),
        ({"beam_size": 2, "length_penalty": float("nan")}, "length_penalty"),
        ({"beam_size": True}, "beam_size"),
    ],
)
@pytest.mark.parametrize("model_kind", ["transformer", "lm"])
def test_invalid_decoding_options_raise_value_error_naming_the_option(options, name, model_kind):
    model = make_transformer(0) if model_kind == "transformer" else make_lm(0)
    inputs = right_padded([[3, 4, 5], [6]])
    with pytest.raises(ValueError, match=name):
        model.generate(inputs, **options)


def test_a_translation_may_not_run_past_max_len_but_a_language_model_may():
    inputs = right_padded([[3, 4, 5], [6]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_transformer(0).generate(inputs, max_new_tokens=300)  # tiny: max_len 256
    assert make_lm(0).generate(inputs, max_new_tokens=300).size(1) <= 300  # it slides its window


def nanogpt_greedy(model: TransformerLM, row: list[int], new: int, window: int) -> list[int]:
    """nanoGPT's loop: at every step the model reads the last `window` tokens from position 0, no cache."""
    tokens = list(row)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([tokens[-window:]]))[:, -1]
            tokens.append(int(next_token_log_probs(logits, (PAD, BOS)).argmax()))
    return tokens[len(row) :]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("window", [16, 6])
def test_lm_generation_past_the_window_reads_the_last_window_like_nanogpt(use_cache, window):
    model = make_lm(3, max_len=16)
    add_logit_bias(model, {EOS: -1e4})  # run the whole length, far past the window
    rows = random_rows(40, [5, 2, 9])
    batch = model.generate(left_padded(rows), max_new_tokens=30, use_cache=use_cache, context_window=window)
    for b, row in enumerate(rows):
        assert batch[b].tolist() == nanogpt_greedy(model, row, 30, window), f"row {b}"


@pytest.mark.parametrize("beam_size", [1, 3])
def test_lm_cached_equals_uncached_past_the_window(beam_size):
    model = make_lm(4, max_len=12)
    add_logit_bias(model, {EOS: 0.5})
    prompts = right_padded(random_rows(41, [3, 7, 1]))
    options = {"max_new_tokens": 25, "beam_size": beam_size, "context_window": 10}
    cached = model.generate(prompts, use_cache=True, **options)
    assert torch.equal(cached, model.generate(prompts, use_cache=False, **options))
    assert_well_formed(cached, [25] * 3)
    for b, row in enumerate(random_rows(41, [3, 7, 1])):  # and each row as if alone
        alone = model.generate(torch.tensor([row]), **options)
        assert content(alone[0]) == content(cached[b])


def test_lm_prompt_longer_than_the_window_is_read_from_its_end():
    model = make_lm(5, max_len=16)
    row = random_rows(42, [14])[0]
    out = model.generate(torch.tensor([row]), max_new_tokens=4, context_window=8, beam_size=1)
    assert content(out[0])[:1] == nanogpt_greedy(model, row, 1, 8)


def test_lm_rejects_a_bad_context_window_and_empty_prompts():
    model = make_lm(0, max_len=16)
    prompts = torch.tensor([[3] * 10])
    for window in (0, 17, 2.5):
        with pytest.raises(ValueError, match="context_window"):
            model.generate(prompts, max_new_tokens=2, context_window=window)
    with pytest.raises(ValueError, match="padding"):
        model.generate(torch.tensor([[3, 4], [PAD, PAD]]), max_new_tokens=2)


def test_check_decoding_options_accepts_valid_values():
    check_decoding_options(4, False, 0.7, None, None)
    check_decoding_options(1, True, 2.0, 50, 1.0)
    check_decoding_options(1, True, 1.0, 1, 0.01)


def test_public_api_exports_the_search_functions():
    assert vaswani.beam_search is beam_search
    assert vaswani.greedy_search is greedy_search
    assert vaswani.top_k_filter is top_k_filter and vaswani.top_p_filter is top_p_filter

"""Decoding: greedy search, sampling (temperature, top-k, top-p) and beam search with a length penalty.

The search functions know nothing of the model. They drive a `Stepper`: an object that takes the newest
tokens of every row, returns the logits of the next token, and reorders its rows when beam search asks.
The models provide steppers backed by a KV cache (or, for tests and debugging, by full recomputation).
Beam search follows §6.1 of the paper (beam size 4, length penalty alpha = 0.6, maximum output length =
input length + 50) with the length penalty of Wu et al. (2016), "GNMT".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

LENGTH_PENALTY_KINDS = ("gnmt", "power")


class Stepper(Protocol):
    def step(self, tokens: Tensor) -> Tensor:
        """Feed (N, t) new tokens per row; return the (N, V) logits for the token after the last one."""
        ...

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (a LongTensor of N row numbers) of the decoding state."""
        ...


# ---------------------------------------------------------------------------------------- pure functions
def next_token_log_probs(logits: Tensor, banned_ids: tuple[int, ...] = ()) -> Tensor:
    """log-softmax over the whole vocabulary in fp32, then -inf for tokens that may never be generated
    (padding and BOS): removed after normalisation, so the other scores stay true log-probabilities."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if banned_ids:
        log_probs[:, list(banned_ids)] = float("-inf")
    return log_probs


# On a CPU, torch's argmax and topk over a long row run one element at a time (about 2.5 ns per element: 2 ms
# for beam search's top 8 of 4 x 8,000 scores), while amax is vectorised; see `top_k`.
_TOP_K_BLOCK = 64


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`scores.topk(k, dim=-1)` of 2-D scores: (values, indices), best first; the order of equal scores is
    unspecified, as it is for topk.

    On a CPU the row is cut into blocks of 64: the k best scores lie in the k blocks with the highest maxima
    (a block holding one of them has a maximum at least the k-th best, and at most k blocks do), so topk
    runs over those k blocks only, after one vectorised amax. Other devices call topk.
    """
    rows, width = scores.shape
    if scores.device.type != "cpu" or width <= 8 * k * _TOP_K_BLOCK:
        return scores.topk(k, dim=-1)
    pad = (-width) % _TOP_K_BLOCK
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    blocks = scores.reshape(rows, -1, _TOP_K_BLOCK)
    best_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # (rows, k)
    gathered = blocks.gather(1, best_blocks[..., None].expand(rows, k, _TOP_K_BLOCK))
    values, where = gathered.reshape(rows, k * _TOP_K_BLOCK).topk(k, dim=-1)
    indices = best_blocks.gather(1, where // _TOP_K_BLOCK) * _TOP_K_BLOCK + where % _TOP_K_BLOCK
    return values, indices


def greedy_next_token(logits: Tensor, banned_ids: tuple[int, ...] = ()) -> Tensor:
    """The most likely next token of each row of (N, V) logits, never a banned one. The argmax of the logits
    is the argmax of the log-probabilities: no log-softmax is needed to pick it."""
    scores = logits.float()
    if banned_ids:
        scores = scores.index_fill(-1, torch.tensor(banned_ids, device=scores.device), float("-inf"))
    return top_k(scores, 1)[1].squeeze(-1)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """Keep the k highest scores of each row, -inf elsewhere (Fan et al., 2018)."""
    if k >= scores.size(-1):
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al., 2020): keep the smallest set of most likely tokens whose
    probability adds up to at least p; the most likely token is always kept."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = mass_before >= p
    # A p below float32's smallest positive number compares as 0 and would remove every token.
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    banned_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from softmax(logits / temperature), restricted by top-k then top-p."""
    scores = next_token_log_probs(logits.float() / temperature, banned_ids)
    if top_k is not None:
        scores = top_k_filter(scores, top_k)
    if top_p is not None:
        scores = top_p_filter(scores, top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def length_penalty(length: int, alpha: float, kind: str = "gnmt") -> float:
    """lp(Y) by which beam search divides a finished hypothesis' log-probability.

    "gnmt" (the paper, §6.1, after Wu et al. 2016): ((5 + |Y|) / 6) ** alpha; "power": |Y| ** alpha.
    |Y| counts the generated tokens including EOS. alpha = 0 compares raw log-probabilities.
    """
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if kind == "power":
        return float(length) ** alpha
    raise ValueError(f"length_penalty_kind={kind!r} must be one of {LENGTH_PENALTY_KINDS}")


def check_decoding_options(
    beam_size: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    length_penalty: float = 0.6,
    length_penalty_kind: str = "gnmt",
) -> None:
    """Reject option values that have no meaning, with a message naming the option."""
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size!r} must be an integer >= 1")
    if do_sample and beam_size > 1:
        raise ValueError(
            "do_sample=True works with beam_size=1 only (sampling draws one continuation per row)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1]")
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r} must be a finite number")
    if length_penalty_kind not in LENGTH_PENALTY_KINDS:
        raise ValueError(f"length_penalty_kind={length_penalty_kind!r} must be one of {LENGTH_PENALTY_KINDS}")


@dataclass(frozen=True)
class DecodingOptions:
    """How `generate` searches, validated on construction (see `check_decoding_options`)."""

    beam_size: int = 1
    length_penalty: float = 0.6
    length_penalty_kind: str = "gnmt"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        check_decoding_options(
            self.beam_size,
            self.do_sample,
            self.temperature,
            self.top_k,
            self.top_p,
            self.length_penalty,
            self.length_penalty_kind,
        )


def decode(
    make_stepper,
    first_tokens: Tensor,
    max_new_tokens: Tensor,
    options: DecodingOptions,
    eos_id: int,
    pad_id: int,
    banned_ids: tuple[int, ...] = (),
) -> Tensor:
    """Run greedy search / sampling (beam_size 1) or beam search; return (N, L) generated ids.

    `make_stepper(beams)` builds a Stepper whose rows are the N inputs, each repeated `beams` times.
    """
    o = options
    if o.beam_size == 1:
        return greedy_search(
            make_stepper(1),
            first_tokens,
            max_new_tokens,
            eos_id,
            pad_id,
            banned_ids,
            o.do_sample,
            o.temperature,
            o.top_k,
            o.top_p,
            o.generator,
        )
    output = beam_search(
        make_stepper(o.beam_size),
        first_tokens.repeat_interleave(o.beam_size, dim=0),
        first_tokens.size(0),
        o.beam_size,
        max_new_tokens,
        eos_id,
        pad_id,
        banned_ids,
        o.length_penalty,
        o.length_penalty_kind,
    )
    return output.tokens


# ---------------------------------------------------------------------------------------- greedy / sampling
@torch.no_grad()
def greedy_search(
    stepper: Stepper,
    first_tokens: Tensor,
    max_new_tokens: Tensor,
    eos_id: int,
    pad_id: int,
    banned_ids: tuple[int, ...] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the most likely next token (or sample one) until every row has produced EOS or its limit.

    first_tokens (N, t0): what the decoder is fed first (BOS, or a prompt). max_new_tokens (N,): per-row
    limit. Returns (N, L) generated ids; after a row's EOS, or once it reaches its limit, it holds pad_id.
    """
    rows = first_tokens.size(0)
    limits = max_new_tokens.to(first_tokens.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=first_tokens.device)
    generated: list[Tensor] = []
    tokens = first_tokens
    for step in range(int(limits.max())):
        logits = stepper.step(tokens)
        if do_sample:
            next_tokens = sample_next_token(logits, temperature, top_k, top_p, banned_ids, generator)
        else:
            next_tokens = greedy_next_token(logits, banned_ids)
        next_tokens = next_tokens.masked_fill(finished, pad_id)
        generated.append(next_tokens)
        finished |= (next_tokens == eos_id) | (limits <= step + 1)
        if bool(finished.all()):
            break
        tokens = next_tokens[:, None]
    return torch.stack(generated, dim=1)


# ---------------------------------------------------------------------------------------- beam search
@dataclass
class Hypothesis:
    tokens: list[int]
    log_prob: float  # sum of the model's log-probabilities of `tokens`
    score: float  # log_prob / lp(len(tokens)): what beam search ranks by
    finished: bool  # ends with EOS (False: stopped at the length limit)


@dataclass
class BeamSearchOutput:
    tokens: Tensor  # (B, L) best hypothesis per sentence, then pad_id
    scores: Tensor  # (B,) its length-normalised score
    hypotheses: list[list[Hypothesis]]  # per sentence, the beam_size best, best first


@torch.no_grad()
def beam_search(
    stepper: Stepper,
    first_tokens: Tensor,
    batch_size: int,
    beam_size: int,
    max_new_tokens: Tensor,
    eos_id: int,
    pad_id: int,
    banned_ids: tuple[int, ...] = (),
    alpha: float = 0.6,
    length_penalty_kind: str = "gnmt",
) -> BeamSearchOutput:
    """Beam search over sums of log-probabilities, ranked by length-normalised score.

    first_tokens (B * beam_size, t0): the first input of every beam, sentence-major (rows b*K .. b*K+K-1
    belong to sentence b). max_new_tokens (B,): per-sentence limit.

    At each step the 2K best extensions of a sentence's K live hypotheses are ranked; an EOS among the first
    K of them becomes a finished hypothesis, and the K best non-EOS extensions stay live. A sentence is done
    when it has K finished hypotheses and no live one can still beat the worst of them (the bound uses the
    fact that log-probabilities only fall as a hypothesis grows, while lp may grow up to the limit), or when
    it reaches its limit, where live hypotheses are kept as unfinished candidates.
    """
    length_penalty(1, alpha, length_penalty_kind)  # validates the kind before any work
    device = first_tokens.device
    k = beam_size
    limits = [int(n) for n in max_new_tokens.tolist()]
    beam_scores = torch.full((batch_size, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: let only the first one extend at step 1
    sequences: list[list[int]] = [[] for _ in range(batch_size * k)]
    done = [False] * batch_size
    finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    tokens = first_tokens

    def add_finished(b: int, hyp: Hypothesis) -> None:
        finished[b].append(hyp)
        finished[b].sort(key=lambda h: h.score, reverse=True)
        del finished[b][k:]

    for step in range(max(limits)):
        length = step + 1
        log_probs = next_token_log_probs(stepper.step(tokens), banned_ids)
        vocab = log_probs.size(-1)
        candidates = (beam_scores.reshape(-1, 1) + log_probs).view(batch_size, k * vocab)
        top_scores, top_index = top_k(candidates, min(2 * k, k * vocab))
        top_beam, top_token = top_index // vocab, top_index % vocab

        # The bookkeeping runs on Python lists: one tensor conversion per step instead of one small tensor
        # operation per hypothesis (which costs more than the arithmetic it does).
        neg_inf = float("-inf")
        new_scores = [[neg_inf] * k for _ in range(batch_size)]
        new_beam = [[0] * k for _ in range(batch_size)]
        new_token = [[pad_id] * k for _ in range(batch_size)]
        scores_l, beams_l, tokens_l = top_scores.tolist(), top_beam.tolist(), top_token.tolist()
        for b in range(batch_size):
            if done[b]:
                continue
            live = 0
            for rank, (score, beam, token) in enumerate(
                zip(scores_l[b], beams_l[b], tokens_l[b], strict=True)
            ):
                if score == neg_inf:
                    break
                if token == eos_id:
                    if rank < k:
                        seq = [*sequences[b * k + beam], eos_id]
                        lp = length_penalty(length, alpha, length_penalty_kind)
                        add_finished(b, Hypothesis(seq, score, score / lp, True))
                    continue
                if live < k:
                    new_scores[b][live], new_beam[b][live], new_token[b][live] = score, beam, token
                    live += 1
            best_live = new_scores[b][0]
            if length >= limits[b]:
                lp = length_penalty(length, alpha, length_penalty_kind)
                for j in range(live):
                    seq = [*sequences[b * k + new_beam[b][j]], new_token[b][j]]
                    add_finished(b, Hypothesis(seq, new_scores[b][j], new_scores[b][j] / lp, False))
                done[b] = True
            elif best_live == neg_inf:
                done[b] = True
            elif len(finished[b]) >= k:
                # The best score a live hypothesis could still reach: its log-probability can only fall,
                # and dividing a negative number by the largest lp among the lengths it may still finish at
                # gives the highest value (lp is monotonic in length, so an end point).
                lp_next = length_penalty(length + 1, alpha, length_penalty_kind)
                lp_last = length_penalty(limits[b], alpha, length_penalty_kind)
                bound = max(best_live / lp_next, best_live / lp_last)
                if finished[b][-1].score >= bound:
                    done[b] = True
        if all(done):
            break
        origin_l = [b * k + beam for b in range(batch_size) for beam in new_beam[b]]
        token_l = [token for row in new_token for token in row]
        sequences = [[*sequences[o], t] for o, t in zip(origin_l, token_l, strict=True)]
        stepper.reorder(torch.tensor(origin_l, device=device))
        beam_scores = torch.tensor(new_scores, device=device)
        tokens = torch.tensor(token_l, device=device).view(-1, 1)

    best = [hyps[0] for hyps in finished]
    width = max(len(h.tokens) for h in best)
    out = torch.full((batch_size, width), pad_id, dtype=torch.long, device=device)
    for b, hyp in enumerate(best):
        out[b, : len(hyp.tokens)] = torch.tensor(hyp.tokens, dtype=torch.long)
    scores = torch.tensor([h.score for h in best], device=device)
    return BeamSearchOutput(out, scores, finished)

"""Label-smoothed cross-entropy, §5.4 of the paper ("we employed label smoothing of value eps_ls = 0.1").

Like fairseq, the loss reports the smoothed loss that is optimised and the plain negative log-likelihood
(from which perplexity comes) separately: smoothing raises the first, and hurts perplexity, on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LossOutput:
    loss: Tensor  # mean smoothed cross-entropy per real target token (what to backpropagate)
    nll: Tensor  # mean negative log-likelihood per real target token (no smoothing; exp() = perplexity)
    n_tokens: Tensor  # number of real (non-pad) target tokens


def label_smoothed_cross_entropy(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> LossOutput:
    """Cross-entropy against a smoothed target distribution, ignoring padded positions.

    logits (..., V), target (...). The target distribution puts 1 - epsilon on the true token and spreads
    epsilon evenly over the other tokens except padding (as the Annotated Transformer does): padding is
    never a correct prediction, so it gets no probability mass, and padded positions add nothing.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon={epsilon!r} must be in [0, 1)")
    vocab = logits.size(-1)
    log_probs = torch.log_softmax(logits.float(), dim=-1).reshape(-1, vocab)
    target = target.reshape(-1)
    real = target != pad_id
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    # Mass on every token but the true one and padding: sum over all, minus those two.
    others = -(log_probs.sum(dim=1) - log_probs[:, pad_id]) - nll
    smoothed = (1.0 - epsilon) * nll + epsilon / (vocab - 2) * others
    n_tokens = real.sum()
    denominator = n_tokens.clamp(min=1)
    return LossOutput(
        loss=(smoothed * real).sum() / denominator, nll=(nll * real).sum() / denominator, n_tokens=n_tokens
    )

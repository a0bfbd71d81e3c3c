"""The loss (§5.4), the schedule (§5.3) and a short end-to-end training run on the copy task."""

import math

import pytest
import torch

from vaswani.config import TransformerConfig
from vaswani.copy_task import EOS, PAD, make_copy_batch, sequence_accuracy, train_copy_task
from vaswani.training import inverse_sqrt_lr, label_smoothed_cross_entropy, noam_lr


def reference_smoothed_loss(logits, target, epsilon, pad_id):
    """Written the slow way: build each smoothed distribution and take -sum q log p."""
    vocab = logits.size(-1)
    total, count = 0.0, 0
    for row, t in zip(logits.reshape(-1, vocab), target.reshape(-1), strict=True):
        if t == pad_id:
            continue
        q = torch.full((vocab,), epsilon / (vocab - 2))
        q[pad_id] = 0.0
        q[t] = 1.0 - epsilon
        total += -(q * torch.log_softmax(row, dim=-1)).sum().item()
        count += 1
    return total / count


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_matches_reference(epsilon):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    target = torch.randint(3, 11, (3, 5), generator=g)
    target[1, 3:] = 0
    out = label_smoothed_cross_entropy(logits, target, epsilon, pad_id=0)
    assert out.loss.item() == pytest.approx(reference_smoothed_loss(logits, target, epsilon, 0), rel=1e-5)
    real = target != 0
    nll = torch.nn.functional.cross_entropy(logits[real], target[real])
    assert out.nll.item() == pytest.approx(nll.item(), rel=1e-5)
    assert out.n_tokens.item() == real.sum().item()
    if epsilon == 0.0:
        assert out.loss.item() == pytest.approx(out.nll.item(), rel=1e-6)


def test_padding_positions_add_nothing_to_the_loss():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 4, 9, generator=g), torch.randint(3, 9, (2, 4), generator=g)
    padded_target = torch.cat((target, torch.zeros(2, 3, dtype=torch.long)), dim=1)
    padded_logits = torch.cat((logits, 100 * torch.randn(2, 3, 9, generator=g)), dim=1)
    a = label_smoothed_cross_entropy(logits, target, 0.1, 0)
    b = label_smoothed_cross_entropy(padded_logits, padded_target, 0.1, 0)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.nll, b.nll)


def test_noam_schedule_is_equation_three():
    d, warmup = 512, 4000
    for step in (1, 10, 3999, 4000, 4001, 100_000):
        expected = d**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert noam_lr(step, d, warmup) == pytest.approx(expected)
    peak = max(noam_lr(s, d, warmup) for s in range(1, 20_000, 7))
    assert peak == pytest.approx(d**-0.5 * warmup**-0.5, rel=1e-3)
    assert noam_lr(8000, d, warmup, scale=2.0) == pytest.approx(2 * noam_lr(8000, d, warmup))
    assert inverse_sqrt_lr(2000, 1e-3, 4000) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(16000, 1e-3, 4000) == pytest.approx(5e-4)
    assert math.isclose(inverse_sqrt_lr(4000, 1e-3, 4000), 1e-3)


def test_copy_batches_are_well_formed():
    batch = make_copy_batch(8, 13, 3, 6, torch.Generator().manual_seed(0))
    for src, tgt_in, tgt_out in zip(batch.src, batch.tgt_in, batch.tgt_out, strict=True):
        n = int((src != PAD).sum())
        assert 3 <= n <= 6 and (src[:n] >= 3).all() and (src[n:] == PAD).all()
        assert tgt_in[0] == 1 and torch.equal(tgt_in[1:], src)
        assert torch.equal(tgt_out[:n], src[:n]) and tgt_out[n] == EOS


@pytest.mark.slow
def test_copy_task_loss_falls_and_greedy_output_copies():
    cfg = TransformerConfig.tiny(vocab_size=13, d_model=64, d_ff=128, dropout=0.0, max_len=32)
    run = train_copy_task(cfg, steps=350, batch_size=64, min_len=3, max_len=8, seed=0)
    first, last = sum(run.losses[:20]) / 20, sum(run.losses[-20:]) / 20
    assert last < 0.25 * first
    test = make_copy_batch(200, 13, 3, 8, torch.Generator().manual_seed(123))
    assert sequence_accuracy(run.model, test) >= 0.9
    assert sequence_accuracy(run.model, test, beam_size=4) >= 0.9

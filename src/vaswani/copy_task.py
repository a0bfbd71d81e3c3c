"""The copy task: learn to output the input sequence (the Annotated Transformer's first sanity check).

A model that cannot learn to copy has a bug in its masks, positions or decoding; one that can shows that
the whole path (embeddings, attention, loss, schedule, greedy and beam decoding) works. `python -m
vaswani.copy_task` (what `make demo` runs) trains a small model for about a minute on CPU and decodes a few
held-out inputs with greedy and beam search.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vaswani.config import TransformerConfig
from vaswani.models import Transformer
from vaswani.training import label_smoothed_cross_entropy, noam_lr

PAD, BOS, EOS = 0, 1, 2
FIRST_SYMBOL = 3


@dataclass
class CopyBatch:
    src: Tensor  # (B, S) symbols, right-padded
    tgt_in: Tensor  # (B, S + 1) BOS + symbols
    tgt_out: Tensor  # (B, S + 1) symbols + EOS


def make_copy_batch(
    batch_size: int, vocab_size: int, min_len: int, max_len: int, generator: torch.Generator
) -> CopyBatch:
    """Random sequences of symbols 3..vocab_size-1 of random lengths in [min_len, max_len]."""
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)
    symbols = torch.randint(FIRST_SYMBOL, vocab_size, (batch_size, max_len), generator=generator)
    real = torch.arange(max_len)[None, :] < lengths[:, None]
    src = symbols.masked_fill(~real, PAD)
    tgt_in = torch.cat((torch.full((batch_size, 1), BOS), src), dim=1)
    tgt_out = torch.cat((src, torch.full((batch_size, 1), PAD)), dim=1)
    tgt_out[torch.arange(batch_size), lengths] = EOS
    return CopyBatch(src, tgt_in, tgt_out)


@dataclass
class CopyRun:
    model: Transformer
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_copy_task(
    cfg: TransformerConfig,
    steps: int,
    batch_size: int = 64,
    min_len: int = 3,
    max_len: int = 10,
    warmup: int = 200,
    lr_scale: float = 0.5,
    label_smoothing: float = 0.1,
    seed: int = 0,
    log_every: int = 0,
) -> CopyRun:
    """Train a Transformer on fresh random copy batches with the paper's optimiser (Adam, beta2 = 0.98,
    eps = 1e-9), schedule (§5.3) and label smoothing (§5.4)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: noam_lr(i + 1, cfg.d_model, warmup=warmup, scale=lr_scale)
    )
    run = CopyRun(model)
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        batch = make_copy_batch(batch_size, cfg.vocab_size, min_len, max_len, generator)
        logits = model(batch.src, batch.tgt_in)
        out = label_smoothed_cross_entropy(logits, batch.tgt_out, label_smoothing, cfg.pad_id)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        run.losses.append(out.nll.item())
        if log_every and (step % log_every == 0 or step == steps):
            print(
                f"step {step:5d}  loss {out.loss.item():.3f}  nll {out.nll.item():.3f}  "
                f"lr {schedule.get_last_lr()[0]:.2e}  {time.perf_counter() - start:5.1f}s",
                flush=True,
            )
    run.seconds = time.perf_counter() - start
    model.eval()
    return run


def sequence_accuracy(model: Transformer, batch: CopyBatch, **generate_options) -> float:
    """Fraction of inputs whose decoded output is exactly the input followed by EOS."""
    out = model.generate(batch.src, **generate_options)
    width = batch.tgt_out.size(1)
    out = torch.nn.functional.pad(out, (0, max(0, width - out.size(1))), value=PAD)[:, :width]
    return (out == batch.tgt_out).all(dim=1).float().mean().item()


def _show(ids: Tensor) -> str:
    """Symbols as letters (3 -> a, 4 -> b, ...), EOS as </s>, padding left out."""
    names = {EOS: "</s>"}
    return " ".join(
        names.get(int(t), chr(ord("a") + int(t) - FIRST_SYMBOL)) for t in ids if int(t) not in (PAD, BOS)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaswani.copy_task", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=1200, help="training steps (default: 1200, about a minute)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = TransformerConfig.tiny(vocab_size=13, d_model=128, d_ff=256, dropout=0.1, max_len=64)
    params = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"Copy task: vocabulary of {cfg.vocab_size - FIRST_SYMBOL} symbols, sequences of 3-10.")
    print(
        f"Model: {cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers, d_model={cfg.d_model}, "
        f"h={cfg.n_heads}, d_ff={cfg.d_ff}, {params:,} parameters; {args.steps} steps of 64 sequences."
    )
    run = train_copy_task(cfg, args.steps, seed=args.seed, log_every=max(1, args.steps // 10))
    test = make_copy_batch(500, cfg.vocab_size, 3, 10, torch.Generator().manual_seed(args.seed + 1))
    greedy = sequence_accuracy(run.model, test, beam_size=1)
    beam = sequence_accuracy(run.model, test, beam_size=4, length_penalty=0.6)
    print(f"\nTrained in {run.seconds:.0f}s. Exact-copy accuracy on 500 held-out sequences:")
    print(f"  greedy      {greedy:6.1%}\n  beam 4      {beam:6.1%}\n")
    examples = test.src[:5]
    greedy_out = run.model.generate(examples)
    beam_out = run.model.generate(examples, beam_size=4, length_penalty=0.6)
    for src, g, b in zip(examples, greedy_out, beam_out, strict=True):
        print(f"  input  {_show(src)}\n  greedy {_show(g)}\n  beam   {_show(b)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's sizes, its batch, and one iteration of each workload as a closure.

Workloads:
  train   one training step: forward, label-smoothed cross-entropy (§5.4, eps 0.1), backward, Adam step
          (§5.3: beta2 0.98, eps 1e-9). Rate: source + target tokens per second (all non-pad).
  greedy  greedy decoding of exactly `new_tokens` tokens per sentence, source encoding included.
          Rate: generated tokens per second (sentences × new_tokens / time).
  beam    beam search (beam 4, alpha 0.6, §6.1) of exactly `new_tokens` tokens per sentence. Rate: tokens
          of the returned translations per second (sentences × new_tokens / time), not of all beams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from vaswani.benchmark.peers import Runner
from vaswani.config import TransformerConfig
from vaswani.training.losses import label_smoothed_cross_entropy

WORKLOADS = ("train", "greedy", "beam")
PRECISIONS = ("fp32", "bf16")
LABEL_SMOOTHING = 0.1  # §5.4
ADAM = {"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-9}  # §5.3; the rate does not depend on lr
FIRST_TOKEN = 5  # random tokens avoid the special ids (pad 0, BOS 1, EOS 2, unk 3, cls 4)


@dataclass(frozen=True)
class Size:
    """One benchmark size: the model (the same for every implementation) and the batches."""

    name: str
    d_model: int
    n_heads: int
    d_ff: int
    n_layers: int  # encoder layers = decoder layers
    vocab_size: int  # one shared vocabulary
    dropout: float  # residual and embedding dropout (§5.4); attention and ReLU dropout are 0
    sentences: int  # training batch
    src_len: int
    tgt_len: int
    decode_sentences: int
    decode_src_len: int
    new_tokens: int
    beam_size: int
    matmul_n: int  # side of the square matmul that measures the machine's peak
    about: str

    def config(self) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_encoder_layers=self.n_layers,
            n_decoder_layers=self.n_layers,
            dropout=self.dropout,
            positional="sinusoidal_concat",  # Marian's layout of the same sinusoids
        )

    def to_dict(self) -> dict:
        return asdict(self)


SIZES = {
    "tiny": Size(
        name="tiny",
        d_model=64,
        n_heads=4,
        d_ff=256,
        n_layers=2,
        vocab_size=1000,
        dropout=0.0,
        sentences=8,
        src_len=12,
        tgt_len=12,
        decode_sentences=4,
        decode_src_len=12,
        new_tokens=8,
        beam_size=4,
        matmul_n=256,
        about="smoke tests: seconds on one core",
    ),
    "cpu": Size(
        name="cpu",
        d_model=256,
        n_heads=4,
        d_ff=1024,
        n_layers=3,
        vocab_size=8000,
        dropout=0.0,
        sentences=32,
        src_len=32,
        tgt_len=32,
        decode_sentences=32,
        decode_src_len=32,
        new_tokens=32,
        beam_size=4,
        matmul_n=2048,
        about="a CPU-sized model (TransformerConfig.small without dropout)",
    ),
    "base": Size(
        name="base",
        d_model=512,
        n_heads=8,
        d_ff=2048,
        n_layers=6,
        vocab_size=37000,
        dropout=0.1,
        sentences=780,
        src_len=32,
        tgt_len=32,
        decode_sentences=128,
        decode_src_len=32,
        new_tokens=32,
        beam_size=4,
        matmul_n=8192,
        about="the paper's base model (Table 3) on batches of about 25,000 + 25,000 tokens, for a GPU",
    ),
}


@dataclass
class Batch:
    """src (B, S); tgt_in = BOS + target (B, T); tgt_out = target + EOS (B, T); decode_src (B', S')."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    decode_src: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.src, self.tgt_in, self.tgt_out, self.decode_src)))

    def train_tokens(self, pad_id: int) -> int:
        """Source + target tokens of a training step that are not padding (what train rates count)."""
        return int((self.src != pad_id).sum()) + int((self.tgt_out != pad_id).sum())


def make_batch(
    cfg: TransformerConfig,
    sentences: int,
    src_len: int,
    tgt_len: int,
    decode_sentences: int,
    decode_src_len: int,
    seed: int = 0,
) -> Batch:
    """Random token ids, every sentence exactly src_len / tgt_len long (no padding)."""
    g = torch.Generator().manual_seed(seed)
    high = cfg.vocab_size

    def ids(rows: int, length: int) -> Tensor:
        return torch.randint(FIRST_TOKEN, high, (rows, length), generator=g)

    src = ids(sentences, src_len)
    target = ids(sentences, tgt_len - 1)
    bos = torch.full((sentences, 1), cfg.bos_id, dtype=torch.long)
    eos = torch.full((sentences, 1), cfg.eos_id, dtype=torch.long)
    return Batch(
        src, torch.cat((bos, target), 1), torch.cat((target, eos), 1), ids(decode_sentences, decode_src_len)
    )


def size_batch(size: Size, cfg: TransformerConfig, seed: int = 0) -> Batch:
    return make_batch(
        cfg, size.sentences, size.src_len, size.tgt_len, size.decode_sentences, size.decode_src_len, seed
    )


def autocast(precision: str, device: torch.device):
    """fp32: nothing; bf16: torch.autocast to bfloat16 (weights and optimizer stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")


def make_optimizer(runner: Runner) -> torch.optim.Optimizer:
    return torch.optim.Adam(runner.model.parameters(), **ADAM, **runner.optimizer_options)


def training_loss(runner: Runner, batch: Batch, pad_id: int) -> Tensor:
    logits = runner.logits(batch.src, batch.tgt_in)
    return label_smoothed_cross_entropy(logits, batch.tgt_out, LABEL_SMOOTHING, pad_id).loss


def workload_fn(
    workload: str,
    runner: Runner,
    batch: Batch,
    precision: str,
    device: torch.device,
    pad_id: int,
    new_tokens: int,
    beam_size: int,
) -> Callable[[], Tensor]:
    """One iteration of `workload` for `runner`: returns the loss (train) or the generated ids."""
    if workload == "train":
        runner.model.train()
        optimizer = make_optimizer(runner)

        def train() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision, device):
                loss = training_loss(runner, batch, pad_id)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return train
    if workload == "greedy":

        def greedy() -> Tensor:
            with autocast(precision, device):
                return runner.greedy(batch.decode_src, new_tokens)

        return greedy
    if workload == "beam":
        if runner.beam is None:
            raise ValueError(f"{runner.label} has no beam search")
        beam = runner.beam

        def beam_fn() -> Tensor:
            with autocast(precision, device):
                return beam(batch.decode_src, new_tokens, beam_size)

        return beam_fn
    raise ValueError(f"workload {workload!r} must be one of {', '.join(WORKLOADS)}")

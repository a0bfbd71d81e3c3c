"""Learning-rate schedules as pure functions of the step (1-based), for torch.optim.lr_scheduler.LambdaLR
with a base learning rate of 1.0, or to be read directly."""

from __future__ import annotations

import math


def noam_lr(step: int, d_model: int, warmup: int = 4000, scale: float = 1.0) -> float:
    """§5.3, Eq. 3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), times `scale`.

    It rises linearly for `warmup` steps, then decays with the inverse square root of the step.
    """
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def inverse_sqrt_lr(step: int, peak_lr: float, warmup: int = 4000) -> float:
    """fairseq's inverse_sqrt: linear warm-up to `peak_lr`, then peak_lr * sqrt(warmup / step)."""
    step = max(step, 1)
    return peak_lr * min(step / warmup, (warmup / step) ** 0.5)


def cosine_lr(step: int, peak_lr: float, warmup: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to `peak_lr`, then a half cosine down to `min_lr` at `total_steps` (nanoGPT)."""
    if warmup > 0 and step < warmup:
        return peak_lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

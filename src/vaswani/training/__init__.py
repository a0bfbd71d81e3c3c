"""Training pieces: the loss of §5.4 (label smoothing) and the learning-rate schedule of §5.3."""

from vaswani.training.losses import LossOutput, label_smoothed_cross_entropy
from vaswani.training.schedules import cosine_lr, inverse_sqrt_lr, noam_lr

__all__ = ["LossOutput", "cosine_lr", "inverse_sqrt_lr", "label_smoothed_cross_entropy", "noam_lr"]

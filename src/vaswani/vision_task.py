"""The image-classification task: an image dataset (vaswani.data.images) -> `VisionTransformer`
(Dosovitskiy et al., 2020), cross-entropy with label smoothing, accuracy and macro-F1. It sits beside the
text tasks of vaswani.tasks and serves the same training loop (vaswani.training.trainer.Task).

Pixels reach the model scaled to [-1, 1], as in the ViT paper's code. The image shape and the classes come
from the dataset's registry entry, not from the files, so a trained run loads without its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaswani.config import VisionConfig
from vaswani.data.images import ImageDatasetSpec, ImageSet, augment, image_dataset, load_images
from vaswani.evaluation import ClassificationReport, classification_report
from vaswani.recipes import Recipe
from vaswani.training.losses import LossOutput
from vaswani.vision import VisionTransformer


def model_input(unit_images: Tensor) -> Tensor:
    """Pixels in [0, 1] -> the model's input range [-1, 1]."""
    return unit_images * 2.0 - 1.0


@dataclass
class ImageBatch:
    images: Tensor  # (B, C, H, W) float, already scaled for the model
    labels: Tensor  # (B,)

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(self.images.to(device), self.labels.to(device))


class ImageClassificationTask:
    """Image classification with the Vision Transformer and a [CLS] token (or mean pooling).

    The best checkpoint is the one with the lowest validation NLL, not the highest accuracy: on a small
    validation split (179 digits) accuracy moves in steps of 0.56% and a tie keeps the earliest checkpoint,
    which in 5-fold cross-validation on the digits' train+valid images was an under-trained one (held-out
    accuracy 94.3% at step 600, 97.4% at step 2,000, mean of the folds); NLL is continuous and reached its
    minimum at step 1,400 or later on every fold.
    """

    best_metric = ("valid_nll", False)
    run_files: tuple[str, ...] = ()  # beyond recipe.toml, a run needs nothing to be loaded again

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        self.recipe, self.run_dir = recipe, Path(run_dir)

    # ------------------------------------------------------------------ data
    @property
    def spec(self) -> ImageDatasetSpec:
        return image_dataset(self.recipe.data.dataset)

    @property
    def label_names(self) -> list[str]:
        return list(self.spec.label_names)

    def data(self, split: str) -> ImageSet:
        d = self.recipe.data
        name = {"train": d.train_split, "valid": d.valid_split, "test": d.test_split}.get(split, split)
        # "train+valid": after the settings are chosen, the final model may learn from both (then the
        # validation scores are not held out; see the recipe's comment).
        return ImageSet.join([load_images(d.dataset, part, data_dir=d.data_dir) for part in name.split("+")])

    @cached_property
    def train_data(self) -> ImageSet:
        data, n = self.data("train"), self.recipe.data.limit_train
        return data if n is None else data.subset(list(range(min(n, len(data)))))

    @cached_property
    def valid_data(self) -> ImageSet:
        data, n = self.data("valid"), self.recipe.data.limit_valid
        return data if n is None else data.subset(list(range(min(n, len(data)))))

    # ------------------------------------------------------------------ training
    def model_config(self) -> VisionConfig:
        spec = self.spec
        return self.recipe.vision_config(
            image_size=spec.image_size, channels=spec.channels, n_classes=len(spec.label_names)
        )

    def build_model(self) -> VisionTransformer:
        return VisionTransformer(self.model_config())

    @cached_property
    def _patches_per_image(self) -> int:
        return self.model_config().n_patches

    def epoch_batches(self, epoch: int) -> list[tuple[int, int, list[int]]]:
        """(epoch, batch number, indices) per batch of data.batch_size images, in an order drawn from
        (seed, epoch): reproducible on resume. The last batch may be smaller."""
        generator = torch.Generator().manual_seed(self.recipe.train.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_data), generator=generator).tolist()
        size = self.recipe.data.batch_size
        return [(epoch, i // size, order[i : i + size]) for i in range(0, len(order), size)]

    def make_batch(self, spec: tuple[int, int, list[int]], device: torch.device) -> ImageBatch:
        epoch, number, indices = spec
        d = self.recipe.data
        images = self.train_data.unit_tensor(indices)
        # Seeded by the batch's place, not by a running generator, so a resumed run augments alike.
        generator = torch.Generator().manual_seed(
            (self.recipe.train.seed * 1_000_003 + epoch) * 100_003 + number
        )
        images = augment(images, d.augment, d.crop_padding, generator)
        labels = torch.tensor([self.train_data.labels[i] for i in indices], dtype=torch.long)
        return ImageBatch(model_input(images), labels).to(device)

    def loss(self, model: nn.Module, batch: ImageBatch, label_smoothing: float) -> LossOutput:
        logits = model(batch.images).float()
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=label_smoothing)
        nll = F.cross_entropy(logits, batch.labels) if label_smoothing > 0 else loss
        return LossOutput(loss, nll.detach(), torch.tensor(batch.labels.numel()))

    def batch_tokens(self, batch: ImageBatch) -> int:
        return batch.labels.numel() * self._patches_per_image

    def loss_denominator(self, batch: ImageBatch) -> int:
        return int(batch.labels.numel())

    # ------------------------------------------------------------------ inference
    def predict(self, model: VisionTransformer, unit_images: Tensor, device: torch.device) -> Tensor:
        """Class probabilities (N, n_classes) of images (N, C, H, W) in [0, 1], in input order."""
        size = self.recipe.data.batch_size
        probs = torch.empty(len(unit_images), model.config.n_classes)
        model.eval()
        with torch.no_grad():
            for start in range(0, len(unit_images), size):
                chunk = model_input(unit_images[start : start + size]).to(device)
                probs[start : start + size] = torch.softmax(model(chunk).float(), dim=-1).cpu()
        return probs

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        probs = self.predict(model, self.valid_data.unit_tensor(), device)
        labels = torch.tensor(self.valid_data.labels)
        nll = F.nll_loss(probs.clamp(min=1e-12).log(), labels).item()
        accuracy = (probs.argmax(-1) == labels).float().mean().item()
        return {"valid_nll": nll, "valid_accuracy": accuracy}

    def evaluate(
        self, model: VisionTransformer, device: torch.device, unit_images: Tensor, labels: list[int]
    ) -> tuple[list[int], ClassificationReport]:
        predictions = self.predict(model, unit_images, device).argmax(-1).tolist()
        return predictions, classification_report(predictions, labels, self.label_names)

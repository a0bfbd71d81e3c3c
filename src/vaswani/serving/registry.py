"""The models a server holds: trained run directories loaded once (`vaswani.runs.load_run`), named, described
for `GET /v1/models`, and the checks of a request's input against the model (its length in tokens, the room
left for new tokens) that no schema can make.

A served model is named after its run directory ("runs/demo" -> "demo"). Translation, text classification
and language-model runs are served; image runs and imported encoders are refused at start-up, with the
reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaswani.runs import LoadedRun, load_run
from vaswani.tasks import ClassificationTask, LanguageModelTask, TranslationTask

SERVED_TASKS = {
    TranslationTask: ("translation", "/v1/translate"),
    ClassificationTask: ("classification", "/v1/classify"),
    LanguageModelTask: ("lm", "/v1/generate"),
}


class RequestError(ValueError):
    """A request the server refuses: `status` is the HTTP status, the message says what is wrong."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how requests are batched. Each is a `vaswani serve` option."""

    max_body_bytes: int = 64 * 1024  # larger request bodies get 413 before they are parsed
    max_inputs: int = 32  # texts in one translate or classify request
    max_new_tokens: int = 256  # the largest max_new_tokens a request may ask for
    max_batch_size: int = 32  # items that share one forward pass; 1 = no dynamic batching
    max_wait_ms: float = 5.0  # how long the first item of a batch waits for others

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_new_tokens", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms={self.max_wait_ms} must be between 0 and 1000")

    def check_new_tokens(self, asked: int | None) -> None:
        """Refuse a request's max_new_tokens beyond the server's limit (None: the model's default)."""
        if asked is not None and asked > self.max_new_tokens:
            raise RequestError(f"max_new_tokens={asked}: this server allows at most {self.max_new_tokens}")


@dataclass
class ServedModel:
    name: str
    run: LoadedRun
    task_name: str
    endpoint: str

    @property
    def task(self) -> Any:
        return self.run.task

    @property
    def max_tokens(self) -> int:
        """The longest input the model takes, in tokens, counting what the task adds ([CLS], </s>)."""
        cfg = self.run.model.config
        if self.task_name == "classification":
            # ClassificationTask.encode keeps min(data.max_len, max_len) positions: [CLS] + ids + suffix.
            return min(self.run.recipe.data.max_len, cfg.max_len)
        return cfg.max_len

    def input_length(self, text: str, what: str, fits: bool = True) -> int:
        """How many positions `text` takes in the model (with the [CLS] or </s> the task adds);
        RequestError (422) if it holds no known token or (unless `fits` is False) does not fit."""
        tokenizer = self.task.tokenizer
        ids = tokenizer.encode(text)
        if not ids:
            raise RequestError(f"{what} holds no token the model knows")
        added = {"translation": len(tokenizer.suffix_ids), "classification": 1 + len(tokenizer.suffix_ids)}
        length = len(ids) + added.get(self.task_name, 0)
        if fits and length > self.max_tokens:
            raise RequestError(
                f"{what} has {length} tokens; the model {self.name!r} takes at most {self.max_tokens}"
            )
        return length

    def new_tokens(self, asked: int | None, limits: ServeLimits) -> int:
        """A language model's max_new_tokens: what was asked (refused beyond the server's limit), else the
        recipe's (200 unless it says) within the limit. The model slides its context window, so the
        prompt's length sets no bound."""
        if asked is None:
            default = self.run.recipe.decode.max_new_tokens
            return min(200 if default is None else default, limits.max_new_tokens)
        limits.check_new_tokens(asked)
        return asked

    def info(self) -> dict[str, Any]:
        recipe, data = self.run.recipe, self.run.recipe.data
        decode = recipe.decode
        if self.task_name == "translation":
            defaults = {"beam_size": decode.beam_size, "length_penalty": decode.length_penalty}
        elif self.task_name == "lm":
            defaults = {"temperature": decode.temperature, "top_k": decode.top_k, "top_p": decode.top_p}
        else:
            defaults = {}
        return {
            "name": self.name,
            "task": self.task_name,
            "endpoint": self.endpoint,
            "max_len": self.max_tokens,
            "labels": list(self.task.label_names) if self.task_name == "classification" else None,
            "source_language": data.src_lang if self.task_name == "translation" else None,
            "target_language": data.tgt_lang if self.task_name == "translation" else None,
            "defaults": defaults,
            "parameters": sum(p.numel() for p in self.run.model.parameters()),
            "checkpoint": self.run.checkpoint.name,
        }


def load_models(
    run_dirs: list[str | Path], device: str | None = None, checkpoint: str | None = None
) -> dict[str, ServedModel]:
    """Load every run directory; refuse two runs of the same name and runs of a task that is not served."""
    if not run_dirs:
        raise ValueError("no run directory given: serve needs at least one trained run")
    models: dict[str, ServedModel] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        name = path.resolve().name
        if name in models:
            raise ValueError(f"two runs are named {name!r}: serve run directories with different names")
        run = load_run(path, checkpoint, device)
        served = next((v for cls, v in SERVED_TASKS.items() if isinstance(run.task, cls)), None)
        if served is None:
            raise ValueError(
                f"{run_dir} is a {run.recipe.data.task} run: serve takes translation, classification "
                "and lm runs"
            )
        if served[0] == "classification":
            run.task.label_names  # noqa: B018 -- read labels.txt now, not on the first request
        models[name] = ServedModel(name, run, *served)
    return models

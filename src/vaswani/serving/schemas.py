"""The HTTP API's request and response bodies, as pydantic models: FastAPI validates every request against
them and publishes them in the OpenAPI schema (`/openapi.json`, browsable at `/docs`).

What a schema can say on its own is said here: non-empty texts, parameter ranges, unknown fields refused.
What depends on the served model or on the server's configured limits (a text's length in tokens, how many
inputs a request may hold, the largest max_new_tokens) is checked by the app against `ServeLimits` and the
model, with the same kind of one-line message.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the text is empty")
    return text


# Characters, not tokens: a cheap first bound before tokenizing (the model's own limit is in tokens and is
# checked after); 10,000 characters is far more than any served model's max_len holds.
Text = Annotated[str, Field(min_length=1, max_length=10_000), AfterValidator(_not_blank)]
ModelName = Annotated[str, Field(min_length=1, max_length=200, description="a name from GET /v1/models")]
BeamSize = Annotated[int, Field(ge=1, le=16, description="1 = greedy (default: the run's recipe)")]
LengthPenalty = Annotated[
    float, Field(ge=0.0, le=10.0, description="alpha of ((5 + |Y|) / 6)^alpha, §6.1 (default: the recipe's)")
]
MaxNewTokens = Annotated[int, Field(ge=1, description="at most the server's --max-new-tokens")]


class _Request(BaseModel):
    # A misspelt field ("beam" for "beam_size") is an error, not silently the default.
    model_config = ConfigDict(extra="forbid")


class TranslateRequest(_Request):
    model: ModelName
    texts: list[Text] = Field(min_length=1, description="sentences to translate (at most --max-inputs)")
    beam_size: BeamSize | None = None
    length_penalty: LengthPenalty | None = None
    max_new_tokens: MaxNewTokens | None = None


class Translation(BaseModel):
    text: str
    translation: str


class TranslateResponse(BaseModel):
    model: str
    translations: list[Translation]


class ClassifyRequest(_Request):
    model: ModelName
    texts: list[Text] = Field(min_length=1, description="texts to classify (at most --max-inputs)")


class Classification(BaseModel):
    text: str
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    classifications: list[Classification]


class GenerateRequest(_Request):
    model: ModelName
    prompt: Text
    max_new_tokens: MaxNewTokens | None = None
    temperature: float | None = Field(
        default=None, ge=0.0, le=10.0, description="0 = greedy (default: the recipe's)"
    )
    top_k: int | None = Field(default=None, ge=1, le=100_000)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    beam_size: BeamSize | None = None
    length_penalty: LengthPenalty | None = None
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="a seeded request is decoded alone, reproducibly"
    )

    @model_validator(mode="after")
    def _beam_or_sampling(self) -> GenerateRequest:
        if self.beam_size is not None and self.beam_size > 1:
            sampling = [name for name in ("top_k", "top_p") if getattr(self, name) is not None]
            if self.temperature not in (None, 0.0):
                sampling.append("temperature")
            if sampling:
                raise ValueError(
                    f"beam_size={self.beam_size} searches; {', '.join(sampling)} "
                    "only apply to sampling (beam_size=1)"
                )
        return self


class GenerateResponse(BaseModel):
    model: str
    prompt: str
    text: str = Field(description="the continuation (the prompt is not repeated)")


class AttentionRequest(_Request):
    model: ModelName
    text: Text
    target: Text | None = Field(
        default=None, description="translation: the target the decoder reads (default: the model's own)"
    )


class AttentionKind(BaseModel):
    label: str
    queries: list[str]
    predicts: list[str | None] | None
    keys: list[str]
    rows: str
    columns: str
    layers: list[list[list[list[float]]]] = Field(description="(layer, head, query, key), rows sum to 1")


class AttentionResponse(BaseModel):
    """The data of vaswani's attention page (vaswani.interpret.attention_page_data)."""

    model: str
    title: str
    kind: str
    text: str
    target: str | None
    prediction: str | None
    colors: list[str]
    kinds: dict[str, AttentionKind]


class ModelInfo(BaseModel):
    name: str
    task: str = Field(description="translation, classification or lm")
    endpoint: str
    max_len: int = Field(description="the longest input, in tokens")
    labels: list[str] | None = None
    source_language: str | None = None
    target_language: str | None = None
    defaults: dict[str, float | int | None] = Field(description="the run's [decode] settings")
    parameters: int
    checkpoint: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    limits: dict[str, int | float]


class Health(BaseModel):
    status: str
    models: int
    batches: int = Field(description="forward passes run so far (a batch of one counts)")
    batched_items: int = Field(description="inputs answered in them: batched_items / batches = mean batch")


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, in one line")

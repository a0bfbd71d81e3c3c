"""The FastAPI application: routes, error answers, the body-size guard and the static playground.

Routes: POST /v1/translate, /v1/classify, /v1/generate, /v1/attention; GET /v1/models, /health; the
playground at GET / (and the attention viewer it embeds at GET /viewer.html); OpenAPI at /openapi.json,
Swagger UI at /docs and ReDoc at /redoc, all served from the package (fastapi-offline), never a CDN.

Every refusal is JSON `{"error": "<one line>"}` with a 4xx status: 400 malformed JSON, 404 unknown model or
route, 413 body too large, 422 a request the schema or the model refuses. A failure of the server itself
is a 500 with the same shape, and the server goes on serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vaswani.interpret.html import attention_page_template
from vaswani.serving import inference
from vaswani.serving.batching import DynamicBatcher
from vaswani.serving.registry import RequestError, ServedModel, ServeLimits
from vaswani.serving.schemas import (
    AttentionRequest,
    AttentionResponse,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelsResponse,
    TranslateRequest,
    TranslateResponse,
)

REQUEST_ENDPOINTS = {  # request schema -> the endpoint its models serve (None: any model)
    "TranslateRequest": "/v1/translate",
    "ClassifyRequest": "/v1/classify",
    "GenerateRequest": "/v1/generate",
    "AttentionRequest": None,
}
_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed JSON",
        404: "unknown model",
        413: "request body too large",
        422: "a request the schema or the model refuses",
    }.items()
}


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before anything parses it, whether its
    length is declared (Content-Length) or streamed in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body too large: this server takes at most {self.max_bytes} bytes"
        await JSONResponse({"error": message}, status_code=413)(scope, receive, send)


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    """(status, one line) for a request the schema refused: the first problem, where it is and what it is."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return 400, f"the request body is not valid JSON{': ' + detail if detail else ''}"
    where = ""
    for part in first["loc"][1:] if first["loc"][:1] == ("body",) else first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return 422, f"{where}: {message}{more}" if where else f"{message}{more}"


def create_app(models: dict[str, ServedModel], limits: ServeLimits | None = None) -> FastAPI:
    """The application serving `models` (from `registry.load_models`) under `limits`."""
    limits = limits or ServeLimits()
    batcher = DynamicBatcher(inference.make_runner(models), limits.max_batch_size, limits.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPIOffline(
        lifespan=lifespan,
        title="vaswani",
        summary="Transformers of 'Attention Is All You Need', served: translate, classify, generate, "
        "and the attention behind each answer.",
        version="1",
    )
    app.state.batcher, app.state.limits, app.state.models = batcher, limits, models
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(error)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        status, headers = error.status_code, error.headers
        message = str(error.detail)
        if status == 404:
            message = f"no such route: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _failed(request: Request, error: Exception) -> JSONResponse:
        # A bug, not the request's fault: say so in one line (the traceback goes to the server's log).
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    def model_for(name: str, operation: str) -> ServedModel:
        served = models.get(name)
        if served is None:
            raise RequestError(f"unknown model {name!r}: this server has {', '.join(sorted(models))}", 404)
        if operation != "attention" and served.endpoint != f"/v1/{operation}":
            raise RequestError(
                f"model {name!r} is a {served.task_name} model: use {served.endpoint}, not /v1/{operation}"
            )
        return served

    def check_texts(served: ServedModel, texts: list[str]) -> None:
        """Refuse too many texts, or one the model cannot take whole."""
        if len(texts) > limits.max_inputs:
            raise RequestError(f"texts: {len(texts)} inputs; this server takes at most {limits.max_inputs}")
        for i, text in enumerate(texts):
            served.input_length(text, f"texts[{i}]")

    async def run_all(served: ServedModel, operation: str, items: list[str], options: dict) -> list[Any]:
        key = inference.batch_key(served.name, operation, options)
        results = []
        for item in items:  # each text is its own item: texts of one request may share a batch or not
            results.append(batcher.submit(key, item))
        return [await result for result in results]

    @app.post("/v1/translate", response_model=TranslateResponse, responses=_ERRORS)
    async def translate(request: TranslateRequest) -> dict[str, Any]:
        """Translate texts with beam search (§6.1), batched with concurrent requests."""
        served = model_for(request.model, "translate")
        check_texts(served, request.texts)
        limits.check_new_tokens(request.max_new_tokens)
        options = request.model_dump(include={"beam_size", "length_penalty", "max_new_tokens"})
        outputs = await run_all(served, "translate", request.texts, options)
        pairs = [{"text": t, "translation": o} for t, o in zip(request.texts, outputs, strict=True)]
        return {"model": served.name, "translations": pairs}

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS)
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        """Label texts, with every class's probability."""
        served = model_for(request.model, "classify")
        check_texts(served, request.texts)
        outputs = await run_all(served, "classify", request.texts, {})
        rows = [
            {"text": text, "label": max(probs, key=probs.get), "probabilities": probs}
            for text, probs in zip(request.texts, outputs, strict=True)
        ]
        return {"model": served.name, "classifications": rows}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS)
    async def generate(request: GenerateRequest) -> dict[str, Any]:
        """Continue a prompt: sampling (temperature, top-k, top-p), greedy (temperature 0) or beam search."""
        served = model_for(request.model, "generate")
        served.input_length(request.prompt, "prompt")
        options = request.model_dump(exclude={"model", "prompt"})
        options["max_new_tokens"] = served.new_tokens(request.max_new_tokens, limits)
        (text,) = await run_all(served, "generate", [request.prompt], options)
        return {"model": served.name, "prompt": request.prompt, "text": text}

    @app.post("/v1/attention", response_model=AttentionResponse, responses=_ERRORS)
    async def attention(request: AttentionRequest) -> dict[str, Any]:
        """Every attention map (kind, layer, head) of one input: what the playground draws."""
        served = model_for(request.model, "attention")
        # A language model reads the last context window of a longer text (prompt + continuation).
        served.input_length(request.text, "text", fits=served.task_name != "lm")
        try:
            data = await batcher.run_alone(lambda: inference.attention(served, request.text, request.target))
        except ValueError as error:  # attention_maps' one-line refusals (an over-long target, ...)
            raise RequestError(str(error)) from None
        return {"model": served.name, **data}

    @app.get("/v1/models", response_model=ModelsResponse)
    async def list_models() -> dict[str, Any]:
        """The served models, what each does and takes, and the server's limits."""
        return {
            "models": [served.info() for served in models.values()],
            "limits": {
                "max_body_bytes": limits.max_body_bytes,
                "max_inputs": limits.max_inputs,
                "max_new_tokens": limits.max_new_tokens,
                "max_batch_size": limits.max_batch_size,
                "max_wait_ms": limits.max_wait_ms,
            },
        }

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        stats = batcher.stats
        return {"status": "ok", "models": len(models), "batches": stats.batches, "batched_items": stats.items}

    playground = resources.files("vaswani.serving").joinpath("static/playground.html").read_text("utf-8")
    viewer = attention_page_template()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/viewer.html", response_class=HTMLResponse, include_in_schema=False)
    async def viewer_page() -> HTMLResponse:
        # vaswani.interpret's attention page with its holes unfilled; the playground fills them.
        return HTMLResponse(viewer)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The served names, as an enum of each request's `model`: /docs offers them and a fuzzer finds them.
        if app.openapi_schema is None:
            schemas = default_openapi()["components"]["schemas"]
            for request, endpoint in REQUEST_ENDPOINTS.items():
                names = sorted(n for n, m in models.items() if endpoint in (None, m.endpoint))
                if names:
                    schemas[request]["properties"]["model"]["enum"] = names
        return app.openapi_schema

    app.openapi = openapi
    return app

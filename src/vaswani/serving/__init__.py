"""Serving trained runs over HTTP (`vaswani serve`), with a web playground that shows the attention.

registry.py    loading the runs, naming and describing them, checking inputs against a model; ServeLimits
schemas.py     the request and response bodies (pydantic): the OpenAPI schema
batching.py    DynamicBatcher: concurrent requests share one forward pass, run off the event loop
inference.py   what a batch runs: the tasks' translate / predict / generate_batch, attention_maps
app.py         the FastAPI app: routes, JSON errors, the body-size guard, the playground
server.py      `serve`: load the runs, build the app, run uvicorn
static/        playground.html (the page at /; it embeds vaswani.interpret's attention viewer)

Needs the `serve` extra (fastapi, uvicorn, fastapi-offline): pip install "vaswani[serve]".
"""

from vaswani.serving.app import create_app
from vaswani.serving.registry import RequestError, ServedModel, ServeLimits, load_models
from vaswani.serving.server import serve

__all__ = ["RequestError", "ServeLimits", "ServedModel", "create_app", "load_models", "serve"]

"""`vaswani serve`: load the runs, build the app, run it with uvicorn on one process."""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

from vaswani.serving.app import create_app
from vaswani.serving.registry import ServeLimits, load_models


def serve(
    run_dirs: list[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    device: str | None = None,
    checkpoint: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve `run_dirs` until interrupted. Binds to loopback unless `host` says otherwise: the API has no
    authentication, so exposing it is a decision to make explicitly."""
    models = load_models(run_dirs, device, checkpoint)
    app = create_app(models, limits)
    names = ", ".join(f"{m.name} ({m.task_name})" for m in models.values())
    print(f"serving {names} on http://{host}:{port}/  (API docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)

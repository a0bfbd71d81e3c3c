"""One tiny run of each served task and a live server on loopback, shared by the serving tests and the load
benchmark's test. The runs hold tiny random models (tiny_runs.py), so that every test is fast."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from tiny_runs import make_run


def make_runs(root: Path) -> dict[str, Path]:
    """One run of each served task, named mt, clf and lm."""
    return {
        "mt": make_run(root, "mt", "translation"),
        "clf": make_run(root, "clf", "classification"),
        "lm": make_run(root, "lm", "lm"),
    }


class LiveServer:
    """An app served by uvicorn on 127.0.0.1 in a background thread (what a browser or a load test needs)."""

    def __init__(self, app) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

"""The screenshot of the serving playground in docs/SERVING.md (not a benchmark: it lives here with the
serving load test). Serves trained runs on loopback, opens the playground in headless Chromium (Playwright,
Debian's /usr/bin/chromium), translates a sentence, picks the cross-attention of a layer, hovers a token and
saves the page:

    python benchmarks/serve_screenshot.py runs/demo runs/trec --out docs/img/serving_playground.png
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

try:
    import vaswani  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import uvicorn
from playwright.sync_api import sync_playwright

from vaswani.serving import create_app, load_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the first one is shown")
    parser.add_argument("--text", default="A little girl is climbing into a wooden playhouse.")
    parser.add_argument("--layer", type=int, default=3, help="the layer shown (default: 3)")
    parser.add_argument("--hover", type=int, default=3, help="the target token hovered (default: 3)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default="docs/img/serving_playground.png")
    args = parser.parse_args(argv)

    models = load_models(args.run_dirs, device="cpu")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(models), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            page.select_option("#model", next(iter(models)))
            page.fill("#text", args.text)
            page.click("#run")
            page.wait_for_selector("body[data-attention='1']", timeout=120_000)
            viewer = page.frame_locator("#viewer")
            viewer.locator("#kind-cross").click()
            viewer.locator(f"#layer-{args.layer}").click()
            viewer.locator("#queries .tok").nth(args.hover).hover()
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    print(f"screenshot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test of `vaswani serve` on loopback: many concurrent clients, a fixed number of requests, with and
without dynamic batching. Prints a table and writes JSON.

    python benchmarks/serve_load.py RUN_DIR --clients 32 --requests 400 --out serve_load.json

For each mode it starts `vaswani serve RUN_DIR` in a fresh process (`--no-batching` for the unbatched one),
waits for /health, lets `--clients` concurrent clients send `--requests` requests in all (one input each,
texts taken in turn from a fixed list), and stops it. Bounded: no request is sent after `--max-seconds`
and each waits at most `--timeout` seconds. Reports, per mode: requests answered, failed (non-200 or
transport error) and never sent, throughput, latency p50 / p99 / max, and the mean batch the server ran
(from its /health counters). See docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
TEXTS = {
    "translation": [
        "A little girl is climbing into a wooden playhouse.",
        "Two men are playing football in the park.",
        "A woman in a red jacket is riding a bicycle down the street.",
        "A dog is running on the beach.",
        "Three people are sitting at a table in a restaurant.",
        "A man in a blue shirt is standing on a ladder.",
        "Children are playing in the water at the beach.",
        "An older man is reading a newspaper on a bench.",
    ],
    "classification": [
        "Who wrote Hamlet ?",
        "How many people live in Paris ?",
        "What is the capital of Australia ?",
        "Where is the Eiffel Tower ?",
        "What does NASA stand for ?",
        "Why is the sky blue ?",
        "When did the Berlin Wall fall ?",
        "What kind of animal is a dingo ?",
    ],
    "lm": ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:", "To be", "O, what", "My lord,", "HAMLET:"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run_dir: str, port: int, batching: bool, args: argparse.Namespace) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "vaswani.cli",
        "serve",
        run_dir,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    command += ["--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)]
    if not batching:
        command.append("--no-batching")
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, server: subprocess.Popen, limit_s: float = 180.0) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=2.0).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {limit_s:.0f} s")


def request_body(model: dict, text: str, args: argparse.Namespace) -> tuple[str, dict]:
    if model["task"] == "translation":
        body = {"model": model["name"], "texts": [text]}
        if args.beam_size:
            body["beam_size"] = args.beam_size
        return "/v1/translate", body
    if model["task"] == "classification":
        return "/v1/classify", {"model": model["name"], "texts": [text]}
    return "/v1/generate", {"model": model["name"], "prompt": text, "max_new_tokens": args.max_new_tokens}


async def load(url: str, model: dict, args: argparse.Namespace) -> dict:
    texts = TEXTS[model["task"]]
    latencies: list[float] = []
    failures: list[str] = []
    next_index = 0
    deadline = time.monotonic() + args.max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < args.requests and time.monotonic() < deadline:
            index, next_index = next_index, next_index + 1
            path, body = request_body(model, texts[index % len(texts)], args)
            start = time.perf_counter()
            try:
                response = await http.post(url + path, json=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as error:
                failures.append(f"{type(error).__name__}: {error}")
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        wall = time.perf_counter() - start
    latencies.sort()

    def quantile(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {
        "answered": len(latencies),
        "failed": len(failures),
        "not_sent": args.requests - next_index,
        "failures": failures[:10],
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "latency_p50_s": quantile(0.50),
        "latency_p99_s": quantile(0.99),
        "latency_max_s": latencies[-1] if latencies else None,
    }


def run_mode(run_dir: str, batching: bool, args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(run_dir, port, batching, args)
    try:
        before = wait_ready(url, server)
        model = httpx.get(url + "/v1/models", timeout=10).json()["models"][0]
        result = asyncio.run(load(url, model, args))
        after = httpx.get(url + "/health", timeout=10).json()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    batches = after["batches"] - before["batches"]
    result["mean_batch"] = (after["batched_items"] - before["batched_items"]) / batches if batches else None
    result.update(mode="batched" if batching else "unbatched", model=model["name"], task=model["task"])
    return result


def format_table(results: list[dict]) -> str:
    header = f"{'mode':<10} {'answered':>8} {'failed':>6} {'unsent':>6} {'req/s':>8} {'p50 ms':>8} "
    header += f"{'p99 ms':>8} {'max ms':>8} {'batch':>6}"
    lines = [header, "-" * len(header)]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1000 * value:.0f}"

    for r in results:
        batch = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        lines.append(
            f"{r['mode']:<10} {r['answered']:>8} {r['failed']:>6} {r['not_sent']:>6} "
            f"{r['throughput_rps']:>8.1f} "
            f"{ms(r['latency_p50_s']):>8} {ms(r['latency_p99_s']):>8} {ms(r['latency_max_s']):>8} {batch:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="one trained run (translation, classification or lm)"
    )
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    parser.add_argument("--requests", type=int, default=400, help="per mode (default: 400)")
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, help="send nothing after this (default: 300)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds (default: 120)")
    parser.add_argument("--modes", default="batched,unbatched", help="batched, unbatched or both (default)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's (default: 32)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's (default: 5)")
    parser.add_argument("--beam-size", type=int, help="translation: beam size (default: the run's recipe)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="lm: tokens per request (default: 32)")
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("batched", "unbatched") for m in modes):
        parser.error(f"--modes {args.modes!r}: give batched, unbatched or both")
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    results = [run_mode(args.run_dir, mode == "batched", args) for mode in modes]
    print(format_table(results))
    report = {
        "run_dir": str(args.run_dir),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "run_dir")},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.out}")
    lost = sum(r["failed"] + r["not_sent"] for r in results)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())

"""The serving load test (benchmarks/serve_load.py) at a tiny size: it starts real `vaswani serve`
processes, loses no request in either mode, and writes the JSON it promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from tiny_runs import make_run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def load_script():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_load_test_answers_every_request_in_both_modes_and_writes_json(tmp_path, capsys):
    run = make_run(tmp_path, "clf", "classification")
    out = tmp_path / "load.json"
    args = [str(run), "--clients", "6", "--requests", "24", "--threads", "1", "--batch-wait-ms", "20"]
    assert load_script().main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "batched" in table and "unbatched" in table and "p99 ms" in table
    report = json.loads(out.read_text())
    by_mode = {r["mode"]: r for r in report["results"]}
    assert set(by_mode) == {"batched", "unbatched"} and report["settings"]["requests"] == 24
    for result in by_mode.values():
        assert (result["answered"], result["failed"], result["not_sent"]) == (24, 0, 0)
        assert 0 < result["latency_p50_s"] <= result["latency_p99_s"] <= result["latency_max_s"]
        assert result["throughput_rps"] > 0 and result["task"] == "classification"
    assert by_mode["unbatched"]["mean_batch"] == 1.0  # --no-batching runs every input alone
    assert by_mode["batched"]["mean_batch"] >= 1.0

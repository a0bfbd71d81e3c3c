"""The HTTP API (vaswani.serving): answers equal the library's own, dynamic batching changes no answer,
every bad request gets a 4xx JSON error naming the problem, and the server goes on serving."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from fastapi.testclient import TestClient

from serving_fixtures import make_runs
from tiny_runs import LABELS, MAX_LEN
from vaswani.cli import main
from vaswani.interpret import attention_maps
from vaswani.interpret.html import attention_page_data, attention_page_template
from vaswani.serving import ServeLimits, create_app, load_models
from vaswani.serving.batching import DynamicBatcher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def models(runs):
    return load_models(list(runs.values()), device="cpu")


@pytest.fixture(scope="module")
def client(models):
    limits = ServeLimits(max_inputs=3, max_new_tokens=20, max_body_bytes=4096, max_wait_ms=20)
    with TestClient(create_app(models, limits), raise_server_exceptions=False) as client:
        yield client


def post(client, path, body):
    return client.post(path, json=body)


# ------------------------------------------------------------------------------------------ answers
def test_models_and_health_describe_what_is_served(client):
    listing = client.get("/v1/models").json()
    by_name = {m["name"]: m for m in listing["models"]}
    assert set(by_name) == {"mt", "clf", "lm"}
    assert by_name["mt"]["endpoint"] == "/v1/translate" and by_name["mt"]["max_len"] == MAX_LEN
    assert by_name["clf"]["labels"] == LABELS and by_name["lm"]["task"] == "lm"
    assert listing["limits"]["max_inputs"] == 3
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == 3


def test_translate_answers_what_the_task_translates(client, models):
    texts = ["A dog is running.", "Two men are playing football in the park."]
    body = post(client, "/v1/translate", {"model": "mt", "texts": texts, "beam_size": 2}).json()
    run = models["mt"].run
    expected = run.task.translate(run.model, texts, run.device, beam_size=2)
    assert [t["translation"] for t in body["translations"]] == expected
    assert [t["text"] for t in body["translations"]] == texts


def test_classify_answers_the_tasks_probabilities(client, models):
    texts = ["Who wrote Hamlet ?", "Where is the Eiffel Tower ?"]
    body = post(client, "/v1/classify", {"model": "clf", "texts": texts}).json()
    run = models["clf"].run
    probs = run.task.predict(run.model, run.task.encode(texts), run.device)
    for row, expected in zip(body["classifications"], probs.tolist(), strict=True):
        assert list(row["probabilities"]) == LABELS
        assert list(row["probabilities"].values()) == pytest.approx(expected, abs=1e-6)
        assert row["label"] == LABELS[max(range(3), key=expected.__getitem__)]


def test_generate_greedy_and_seeded_sampling_are_the_tasks(client, models):
    run = models["lm"].run
    greedy = post(
        client, "/v1/generate", {"model": "lm", "prompt": "Two", "max_new_tokens": 8, "temperature": 0}
    ).json()
    assert greedy["text"] == run.task.generate(run.model, "Two", run.device, max_new_tokens=8, temperature=0)
    body = {"model": "lm", "prompt": "Two", "max_new_tokens": 8, "temperature": 1.0, "seed": 3}
    first, again = post(client, "/v1/generate", body).json(), post(client, "/v1/generate", body).json()
    generator = torch.Generator().manual_seed(3)
    expected = run.task.generate(
        run.model, "Two", run.device, max_new_tokens=8, temperature=1.0, generator=generator
    )
    assert first["text"] == again["text"] == expected


def test_a_continuation_past_the_window_is_generated_and_its_last_window_shown(client, models):
    # The playground re-reads prompt + continuation for its attention view; the model slides its context
    # window, so the two together may be longer than max_len: the view shows the last window.
    prompt = "Two " * 7
    out = post(client, "/v1/generate", {"model": "lm", "prompt": prompt, "max_new_tokens": 20}).json()
    tokenizer = models["lm"].task.tokenizer
    assert len(tokenizer.encode(out["prompt"] + out["text"])) > MAX_LEN, out
    response = post(client, "/v1/attention", {"model": "lm", "text": out["prompt"] + out["text"]})
    assert response.status_code == 200, response.json()
    kind = response.json()["kinds"]["decoder"]
    assert len(kind["queries"]) == MAX_LEN and kind["rows"] == f"text (its last {MAX_LEN} tokens)"
    last_window = tokenizer.encode(out["prompt"] + out["text"])[-MAX_LEN:]
    assert response.json()["text"] == tokenizer.decode(last_window)


def test_attention_is_the_interpret_modules_page_data(client, models):
    body = post(client, "/v1/attention", {"model": "mt", "text": "A dog.", "target": "Ein Hund."}).json()
    maps = attention_maps(models["mt"].run, "A dog.", "Ein Hund.")
    expected = attention_page_data(maps, "mt: translation attention")
    assert body["model"] == "mt" and set(body["kinds"]) == {"encoder", "decoder", "cross"}
    for name, kind in expected["kinds"].items():
        assert body["kinds"][name]["queries"] == kind["queries"]
        np.testing.assert_allclose(body["kinds"][name]["layers"], kind["layers"], atol=1e-6)
    clf = post(client, "/v1/attention", {"model": "clf", "text": "Who wrote Hamlet ?"}).json()
    assert set(clf["kinds"]) == {"encoder"} and clf["prediction"].split()[0] in LABELS


def test_page_viewer_and_docs_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "vaswani playground" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    assert client.get("/viewer.html").text == attention_page_template()
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and "/static-offline-docs/swagger-ui-bundle.js" in docs
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/translate", "/v1/classify", "/v1/generate", "/v1/attention", "/v1/models", "/health"} <= set(
        schema["paths"]
    )


# ------------------------------------------------------------------------------------------ refusals
LONG = "word " * (MAX_LEN + 5)
BAD_REQUESTS = [
    (
        "/v1/translate",
        {"model": "mt", "texts": [""]},
        422,
        "texts[0]: String should have at least 1 character",
    ),
    ("/v1/translate", {"model": "mt", "texts": ["   "]}, 422, "texts[0]: the text is empty"),
    ("/v1/translate", {"model": "mt", "texts": []}, 422, "texts: List should have at least 1 item"),
    (
        "/v1/translate",
        {"model": "mt", "texts": ["a", "b", "c", "d"]},
        422,
        "4 inputs; this server takes at most 3",
    ),
    ("/v1/translate", {"model": "mt", "texts": [LONG]}, 422, f"the model 'mt' takes at most {MAX_LEN}"),
    (
        "/v1/translate",
        {"model": "nope", "texts": ["a"]},
        404,
        "unknown model 'nope': this server has clf, lm, mt",
    ),
    ("/v1/translate", {"model": "clf", "texts": ["a"]}, 422, "use /v1/classify"),
    (
        "/v1/translate",
        {"model": "mt", "texts": ["a"], "beam_size": 0},
        422,
        "beam_size: Input should be greater",
    ),
    (
        "/v1/translate",
        {"model": "mt", "texts": ["a"], "beam": 2},
        422,
        "beam: Extra inputs are not permitted",
    ),
    ("/v1/translate", {"model": "mt", "texts": ["a"], "max_new_tokens": 21}, 422, "allows at most 20"),
    ("/v1/classify", {"model": "clf", "texts": [LONG]}, 422, f"the model 'clf' takes at most {MAX_LEN}"),
    ("/v1/classify", {"texts": ["a"]}, 422, "model: Field required"),
    ("/v1/generate", {"model": "lm", "prompt": "a", "top_p": 1.5}, 422, "top_p: Input should be less than"),
    ("/v1/generate", {"model": "lm", "prompt": "a", "temperature": -1}, 422, "temperature: Input should be"),
    ("/v1/generate", {"model": "lm", "prompt": "a", "max_new_tokens": 500}, 422, "allows at most 20"),
    (
        "/v1/generate",
        {"model": "lm", "prompt": "a", "beam_size": 2, "top_k": 5},
        422,
        "top_k only apply to sampling",
    ),
    ("/v1/attention", {"model": "mt", "text": "A dog.", "target": "x " * 40}, 422, "the model takes at most"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_naming_the_problem(client, path, body, status, message):
    response = post(client, path, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error and "\n" not in error
    assert client.get("/health").status_code == 200  # and the server goes on


def test_oversized_and_malformed_bodies_are_refused_and_the_server_goes_on(client):
    big = {"model": "mt", "texts": ["a" * 5000]}
    response = post(client, "/v1/translate", big)
    assert response.status_code == 413 and "at most 4096 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the guard counts what streams in
        for _ in range(10):
            yield b'{"model": "mt", "texts": ["' + b"a" * 1000

    streamed = client.post("/v1/translate", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    for raw in (b'{"model": "mt", "texts": ["a"', b"\xff\xfe", b"[1, 2]", b"null"):
        response = client.post("/v1/translate", content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500 and response.json()["error"]
    assert client.post(
        "/v1/translate", content=b"{", headers={"Content-Type": "application/json"}
    ).json() == {
        "error": "the request body is not valid JSON: Expecting property name enclosed in double quotes"
    }
    assert client.get("/nowhere").json() == {"error": "no such route: GET /nowhere"}
    ok = post(client, "/v1/translate", {"model": "mt", "texts": ["A dog."]})
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------ batching
def test_concurrent_requests_share_batches_and_get_the_answers_they_get_alone(models):
    texts = ["A dog.", "Two men are playing.", "A girl is climbing into a playhouse.", "Ein Hund.", "Who ?"]
    app = create_app(models, ServeLimits(max_batch_size=8, max_wait_ms=50))

    async def fire() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(
                *(client.post("/v1/translate", json={"model": "mt", "texts": [t]}) for t in texts)
            )
        return [r.json()["translations"][0]["translation"] for r in responses]

    together = asyncio.run(fire())
    stats = app.state.batcher.stats
    assert stats.items == len(texts) and stats.largest > 1  # they did share a forward pass
    run = models["mt"].run
    assert together == [run.task.translate(run.model, [t], run.device)[0] for t in texts]


def test_batcher_groups_by_key_and_a_batch_size_of_one_runs_items_alone():
    calls: list[tuple] = []

    def run_batch(key, items):
        calls.append((key, list(items)))
        return [f"{key}:{item}" for item in items]

    async def fire(batcher: DynamicBatcher) -> list[str]:
        jobs = [batcher.submit(key, i) for i, key in enumerate("aabab")]
        return await asyncio.gather(*jobs)

    batched = DynamicBatcher(run_batch, max_batch_size=8, max_wait_ms=50)
    assert asyncio.run(fire(batched)) == ["a:0", "a:1", "b:2", "a:3", "b:4"]
    assert sorted(calls) == [("a", [0, 1, 3]), ("b", [2, 4])]
    calls.clear()
    alone = DynamicBatcher(run_batch, max_batch_size=1, max_wait_ms=50)
    assert asyncio.run(fire(alone)) == ["a:0", "a:1", "b:2", "a:3", "b:4"]
    assert [items for _, items in calls] == [[0], [1], [2], [3], [4]]


def test_a_failing_batch_fails_only_its_own_requests_and_runs_off_the_event_loop():
    loop_thread = []

    def run_batch(key, items):
        loop_thread.append(threading.current_thread().name)
        if key == "bad":
            raise RuntimeError("boom")
        time.sleep(0.05)
        return items

    async def fire(batcher):
        return await asyncio.gather(
            batcher.submit("bad", 1), batcher.submit("good", 2), return_exceptions=True
        )

    bad, good = asyncio.run(fire(DynamicBatcher(run_batch, max_wait_ms=20)))
    assert isinstance(bad, RuntimeError) and good == 2
    assert all(name.startswith("vaswani-inference") for name in loop_thread)


def test_the_batcher_is_refused_nonsense_settings():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        DynamicBatcher(lambda key, items: items, max_batch_size=0)
    with pytest.raises(ValueError, match="max_inputs=0"):
        ServeLimits(max_inputs=0)


# ------------------------------------------------------------------------------------------ the command
def test_serve_command_parses_and_calls_serve(runs, monkeypatch):
    import vaswani.serving as serving

    seen = {}
    monkeypatch.setattr(serving, "serve", lambda *args: seen.update(args=args))
    assert (
        main(
            ["serve", str(runs["mt"]), str(runs["clf"]), "--port", "9", "--max-inputs", "4", "--no-batching"]
        )
        == 0
    )
    run_dirs, host, port, limits, *_ = seen["args"]
    assert run_dirs == [str(runs["mt"]), str(runs["clf"])] and (host, port) == ("127.0.0.1", 9)
    assert limits.max_inputs == 4 and limits.max_batch_size == 1


def test_serve_refuses_missing_runs_and_unserved_tasks_in_one_line(tmp_path, runs, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: run directory not found")
    assert main(["serve", str(runs["mt"]), "--max-inputs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: max_inputs=0 must be at least 1"
    with pytest.raises(ValueError, match="two runs are named 'mt'"):
        load_models([runs["mt"], runs["mt"]])


def test_an_app_started_and_stopped_twice_still_answers(models):
    """Each test client (and schemathesis' every call) runs the app's lifespan; its shutdown closes the
    inference thread, and the next start must bring it back (found by the fuzz test)."""
    app = create_app(models)
    for _ in range(2):
        with TestClient(app) as client:
            response = post(client, "/v1/classify", {"model": "clf", "texts": ["Who ?"]})
            assert response.status_code == 200


def test_generate_batch_of_prompts_of_different_lengths_equals_each_prompt_alone(models):
    run = models["lm"].run
    prompts = ["Two", "A little girl", "W"]
    for options in ({"temperature": 0}, {"beam_size": 2, "temperature": 0}):
        together = run.task.generate_batch(run.model, prompts, run.device, max_new_tokens=6, **options)
        alone = [run.task.generate(run.model, p, run.device, max_new_tokens=6, **options) for p in prompts]
        assert together == alone
    with pytest.raises(ValueError, match="top_k only apply to sampling"):
        run.task.generate_batch(run.model, prompts, run.device, beam_size=2, top_k=3)

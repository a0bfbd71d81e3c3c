"""The playground in a real browser: headless Chromium (Debian's package) driven by Playwright, against a
live server on loopback holding tiny runs. Skipped, with the reason, where chromium or Playwright is
missing; `pip install playwright` brings no browser and none is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from serving_fixtures import LiveServer, make_runs  # noqa: E402
from tiny_runs import LABELS  # noqa: E402
from vaswani.serving import ServeLimits, create_app, load_models  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(), reason="chromium is not installed (apt-get install chromium)"
    ),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = make_runs(tmp_path_factory.mktemp("runs"))
    live = LiveServer(create_app(load_models(list(runs.values()), device="cpu"), ServeLimits()))
    yield live
    live.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the playground; what the console and the network say is kept on it."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.console_errors, page.failed_requests, page.outside = [], [], []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.on("requestfailed", lambda r: page.failed_requests.append(r.url))
    page.on(
        "request",
        lambda r: not r.url.startswith((server.url, "data:", "about:")) and page.outside.append(r.url),
    )
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    yield page
    context.close()


def run(page, model: str, text: str, outcome: str = "done") -> None:
    # Playwright's select_option fires "change" even for the model already selected (a person's click on it
    # does not), and the page then redraws the option fields, dropping what a test typed into them.
    if page.input_value("#model") != model:
        page.select_option("#model", model)
    page.fill("#text", text)
    page.click("#run")
    page.wait_for_selector("body[data-state='done'], body[data-state='error']", timeout=60_000)
    state = page.get_attribute("body", "data-state")
    assert state == outcome, f"the page ended in {state!r}: {page.inner_text('#error')!r}"


def test_page_loads_without_console_errors_and_fetches_nothing_from_elsewhere(page):
    assert page.locator("#model option").all_inner_texts() == [
        "mt (translation)",
        "clf (classification)",
        "lm (lm)",
    ]
    assert page.console_errors == [] and page.failed_requests == [] and page.outside == []


def test_a_translation_renders_the_output_and_an_interactive_heatmap(page):
    run(page, "mt", "A dog is running on the beach.")
    page.wait_for_selector("body[data-attention='1']")
    assert page.inner_text("#output").strip()
    viewer = page.frame_locator("#viewer")
    for control in ("#kind-encoder", "#kind-decoder", "#kind-cross", "#layer-1", "#layer-2", "#head-2"):
        assert viewer.locator(control).count() == 1
    cells = viewer.locator("#matrix .cell")
    queries, keys = viewer.locator("#queries .tok"), viewer.locator("#keys .tok")
    assert cells.count() == queries.count() * keys.count() > 0  # the cross-attention is shown first
    viewer.locator("#kind-encoder").click()
    assert viewer.locator("#kind-encoder").get_attribute("aria-checked") == "true"
    assert viewer.locator("#matrix .cell").count() == viewer.locator("#queries .tok").count() ** 2
    viewer.locator("#layer-1").click()
    viewer.locator("#head-2").click()
    assert "layer 1 of 2, head 2" in viewer.locator("#matrix-title").inner_text()
    viewer.locator("#queries .tok").first.hover()
    readout = viewer.locator("#readout").inner_text()
    assert "attends most to" in readout
    assert page.console_errors == [] and page.outside == []


def test_a_classification_shows_the_label_and_its_probabilities(page):
    run(page, "clf", "Who wrote Hamlet ?")
    label = page.inner_text("#output .label")
    assert label in LABELS and page.locator("#output .bar").count() == len(LABELS)
    page.wait_for_selector("body[data-attention='1']")
    assert page.frame_locator("#viewer").locator("#kind-encoder").count() == 1
    assert page.console_errors == []


def test_generation_shows_the_continuation(page):
    page.select_option("#model", "lm")
    page.fill("#opt-max_new_tokens", "5")
    page.fill("#opt-temperature", "0")
    run(page, "lm", "Two")
    assert page.input_value("#opt-max_new_tokens") == "5"  # the options typed were the ones sent
    assert page.inner_text("#output .generated") != "" and page.inner_text("#output").startswith("Two")


def test_a_bad_input_shows_the_servers_error_message(page):
    run(page, "mt", "word " * 300, outcome="error")
    message = page.inner_text("#error")
    assert "texts[0] has" in message and "the model 'mt' takes at most 32" in message
    assert page.is_visible("#error")
    run(page, "mt", "A dog.")  # the page and the server go on
    assert not page.is_visible("#error")

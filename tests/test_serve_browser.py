"""`img-guidance serve`'s Gradio page on the shipped ShapesWorld models, built, served on localhost
and driven: through gradio's own client (HTTP) and in the system's Chromium (a prompt typed, Generate
clicked, both images shown). Gradio is in the dev extra, so CI runs these; they skip, saying why,
where gradio, playwright or chromium is missing."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network

from tests.test_study_browser import chromium

PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def served():
    why = 'gradio is not installed (make install, or pip install -e ".[serve]")'
    pytest.importorskip("gradio", reason=why)
    from img_guidance.pipeline import IMGPipeline
    from img_guidance.serve import build_app

    app = build_app(IMGPipeline.from_pretrained("shapes"))
    app.queue()
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, show_error=True)
    yield url
    app.close()


def test_the_page_answers_a_prompt_over_http(served):
    from gradio_client import Client
    from PIL import Image

    client = Client(served, verbose=False)
    assert "/run" in client.view_api(return_format="dict")["named_endpoints"]
    initial, calibrated, note = client.predict(PROMPT, 3, 1, 3, 0.5, api_name="/run")
    for path in (initial, calibrated):
        assert Image.open(path).size == (32, 32)
    assert PROMPT in note


def test_the_page_generates_in_a_browser(served):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('playwright is not installed (make install, or pip install -e ".[dev]")')
    if chromium() is None:
        pytest.skip("no chromium on this machine (make install runs apt-get install chromium, as root)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(served)
        page.get_by_label("Prompt").fill(PROMPT)
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector("text=Question asked of the MLLM", timeout=60_000)
        sizes = page.locator("img").evaluate_all("els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        browser.close()
    assert sizes.count([32, 32]) >= 2, sizes  # the initial and the calibrated image
    assert errors == []

"""The chat page in a real headless browser: Debian's Chromium driven by Playwright.

Load the page from a server with a tiny model, attach an image (file picker, then
paste), ask, watch the answer stream in and compare it with ``generate``'s, stop a long
answer, start a new chat. Skips with the reason when Chromium or Playwright is missing,
unless ``MLX_LLAMA3V_REQUIRE_BROWSER=1`` (CI), where that is a failure.
``MLX_LLAMA3V_SCREENSHOT=PATH`` saves a screenshot of the answered question there.
"""

import os
import shutil
import time

import pytest

from mlx_llama3v import generate
from mlx_llama3v.server import serve
from test_generate import IMAGE_A, IMAGE_B, Tiny
from test_server import our_user, png

N = 24
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(reason: str):
    if os.environ.get("MLX_LLAMA3V_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and MLX_LLAMA3V_REQUIRE_BROWSER=1 requires the browser test")
    pytest.skip(reason)


def chromium_path():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright)")
    path = chromium_path()
    if path is None:
        _missing("no Chromium found (Debian: apt-get install -y chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=path,
            headless=True,
            args=BROWSER_FLAGS,
            viewport={"width": 1100, "height": 720},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _, _, model, processor = Tiny(tmp_path_factory.mktemp("browser")).get("minicpm_v2_5")
    server = serve(model, processor, "tiny-minicpm", port=0)
    yield server, model, processor
    server.close()


def answers(page):
    return page.locator(".message.assistant")


def wait_done(page, count, timeout=60):
    page.wait_for_function(
        f"document.querySelectorAll('.message.assistant').length === {count} && "
        "!document.querySelector('.message.streaming')",
        timeout=timeout * 1000,
    )


def test_the_chat_page_answers_about_an_image_and_stops(browser, served, tmp_path):
    server, model, processor = served
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-minicpm'")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(N))
    page.fill("#system", "")
    page.fill("#repetition_penalty", "")  # greedy, as generate() by default

    # count the answer's updates: it must arrive in pieces, not at once
    page.evaluate(
        """() => { window.updates = 0;
        new MutationObserver(() => { window.updates += 1; }).observe(
          document.getElementById('conversation'),
          {subtree: true, characterData: true, childList: true}); }"""
    )
    (tmp_path / "a.png").write_bytes(png(IMAGE_A))
    page.set_input_files("#file", str(tmp_path / "a.png"))
    page.wait_for_selector("#attachments img")
    question = "What is in this image?"
    page.fill("#prompt", question)
    page.click("#send")
    wait_done(page, 1)
    expected = generate(model, processor, [our_user(question, [IMAGE_A])], max_tokens=N).text
    assert answers(page).nth(0).locator(".text").text_content() == expected
    assert page.locator(".message.user img").count() == 1
    assert page.evaluate("window.updates") > 3
    assert "prompt tokens" in answers(page).nth(0).locator(".meta").text_content()
    if os.environ.get("MLX_LLAMA3V_SCREENSHOT"):
        page.screenshot(path=os.environ["MLX_LLAMA3V_SCREENSHOT"])

    # a pasted image and a long answer, stopped while it streams
    page.evaluate(
        """(b64) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'b.png', {type: 'image/png'}));
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data})); }""",
        __import__("base64").b64encode(png(IMAGE_B)).decode(),
    )
    page.wait_for_selector("#attachments img")
    page.fill("#max_tokens", "1500")
    page.fill("#prompt", "Tell me a very long story about it.")
    page.click("#send")
    page.wait_for_function(
        "document.querySelectorAll('.message.assistant .text')[1]?.textContent.length > 0",
        timeout=60000,
    )
    assert page.is_enabled("#stop")
    page.click("#stop")
    wait_done(page, 2)
    assert "stopped" in answers(page).nth(1).locator(".meta").text_content()
    assert page.locator(".message.user img").count() == 2
    deadline = time.monotonic() + 5
    while server.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.stats()["running"] == 0  # the stopped answer left the batch

    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert not errors, errors
    page.close()

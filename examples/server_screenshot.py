"""The README's picture of the chat page: the demo model served, asked about a sample.

    python examples/server_screenshot.py docs/server.png

Starts ``mlx_llama3v.server`` on the shapes demo model (loopback, a free port), opens
the page in headless Chromium (Debian's ``chromium``, driven by Playwright), attaches
``examples/shapes/samples/1.png``, asks two questions, waits for the streamed answers
and saves a screenshot.
"""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
MODEL, SAMPLE = HERE / "shapes" / "model", HERE / "shapes" / "samples" / "1.png"
QUESTIONS = ["What colour is the triangle?", "How many shapes are there?"]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"error: the server at {url} did not come up in {seconds:.0f} s")


def main(out: str = "docs/server.png") -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_llama3v.server",
            "--model",
            str(MODEL),
            "--model-name",
            "shapes-demo",
            "--port",
            str(port),
        ]
    )
    try:
        wait_up(url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url + "/")
            page.fill("#temperature", "0")
            for i, question in enumerate(QUESTIONS):
                if i == 0:
                    page.set_input_files("#file", str(SAMPLE))
                    page.wait_for_selector("#attachments img")
                page.fill("#prompt", question)
                page.click("#send")
                page.wait_for_function(
                    f"document.querySelectorAll('.message.assistant').length === {i + 1} && "
                    "!document.querySelector('.message.streaming')",
                    timeout=120000,
                )
            page.screenshot(path=out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"saved {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The explorer in a real browser: Voilà serves it on localhost, headless Chromium renders it.

Chromium is driven over its DevTools protocol (a websocket on localhost), so the test waits until the
widgets have rendered instead of guessing a time budget. Set LAYERLAB_SCREENSHOT=PATH to keep the screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("voila")
websockets = pytest.importorskip("websockets")

WINDOW = (1400, 1700)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> None:
    """Wait until something listens on localhost:``port``."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


async def render(url: str, devtools_port: int, timeout: float = 150.0) -> tuple[str, bytes, list[str]]:
    """Open ``url`` in the running headless Chromium; wait for the explorer's four figure panels; return the
    DOM, a full-page PNG screenshot and the page's uncaught exceptions."""
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json", timeout=10))
    page = next(t for t in targets if t["type"] == "page")
    errors: list[str] = []
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**27) as ws:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            mine = counter
            await ws.send(json.dumps({"id": mine, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("method") == "Runtime.exceptionThrown":
                    errors.append(msg["params"]["exceptionDetails"].get("text", ""))
                if msg.get("id") == mine:
                    return msg.get("result", {})

        async def evaluate(expression: str):
            return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

        await call("Runtime.enable")
        await call("Page.enable")
        await call("Page.navigate", url=url)
        ready = ("Array.from(document.querySelectorAll('.layerlab-explorer img'))"
                 ".filter(i => i.complete && i.naturalWidth > 0).length")
        end = time.time() + timeout
        while (await evaluate(ready) or 0) < 4:
            if time.time() > end:
                raise TimeoutError("the explorer's figure panels did not render")
            await asyncio.sleep(1)
        await asyncio.sleep(1)
        dom = await evaluate("document.documentElement.outerHTML")
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    return dom, base64.b64decode(shot["data"]), errors


@pytest.fixture(scope="module")
def run_root(analysis_run_root) -> Path:
    """ST and AT runs; AT with its CKA and LSC files, so every panel has something to draw."""
    return analysis_run_root


def test_explorer_renders_in_chromium(run_root, tmp_path):
    from PIL import Image, ImageStat

    from layerlab.explore import app_notebook, voila_command

    notebook = app_notebook(run_root, tmp_path / "app" / "explorer.ipynb")
    port, devtools = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    server = subprocess.Popen(voila_command(notebook, port=port), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "voila.log", "w"))
    browser = None
    try:
        wait_port(port, 90)
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--remote-debugging-port={devtools}",
             "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(devtools, 60)
        dom, png, errors = asyncio.run(render(f"http://127.0.0.1:{port}/", devtools))
    finally:
        for proc in (browser, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    keep = os.environ.get("LAYERLAB_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(png)
    (tmp_path / "explorer.png").write_bytes(png)

    for text in ("layerlab-explorer", "layerlab explorer", "rescan runs", "launch what-if run", "focus run",
                 "adversarial", "layerlab-summary", "re-initialize updated blocks"):
        assert text in dom, text
    assert ">AT<" in dom and ">ST<" in dom  # the runs are listed
    assert not errors, errors
    image = Image.open(io.BytesIO(png)).convert("L")
    assert image.width == WINDOW[0] and image.height >= 600
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 20  # not blank: text, figures and controls
    dark = sum(image.histogram()[:200]) / (image.width * image.height)
    assert dark > 0.03, f"only {dark:.1%} of the page is not near-white"


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/test_browser.py
    sys.exit(pytest.main([__file__, "-q"]))

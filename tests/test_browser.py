"""The explorer in a real browser: Voilà serves it on localhost, headless Chromium renders it.

Chromium is driven over its DevTools protocol (a websocket on localhost): the test waits for what the page
shows instead of guessing a time budget, clicks and drags with real mouse events, and reports how long the
page took to show text, the loading message and the first view. Set LAYERLAB_SCREENSHOT=PATH to keep the
final screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
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


class Page:
    """One Chromium page driven over the DevTools protocol."""

    def __init__(self, ws) -> None:
        self.ws, self.counter, self.errors = ws, 0, []

    async def call(self, method: str, **params):
        self.counter += 1
        mine = self.counter
        await self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(msg["params"]["exceptionDetails"].get("text", ""))
            if msg.get("id") == mine:
                return msg.get("result", {})

    async def evaluate(self, expression: str):
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def wait(self, expression: str, timeout: float, what: str):
        """Poll ``expression`` every 0.1 s until it is truthy; its value."""
        end = time.time() + timeout
        while not (value := await self.evaluate(expression)):
            if time.time() > end:
                state = await self.evaluate(f"JSON.stringify({{view: {VIEW}, drawn: llFigures().map(llDrawn)}})")
                raise TimeoutError(f"{what}; the page shows {state}")
            await asyncio.sleep(0.1)
        return value

    async def mouse(self, kind: str, x: float, y: float, modifiers: int = 0) -> None:
        await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=1,
                        clickCount=1, modifiers=modifiers)


APP = "document.querySelector('.layerlab-explorer')"
# page helpers: the explorer's figures (ipympl canvases) and a fingerprint of the pixels each one shows
HELPERS = """
window.llFigures = () => Array.from(document.querySelectorAll('.layerlab-explorer .layerlab-figure'));
window.llPixels = fig => {
  const c = fig.querySelector('canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 4 * 7) h = (Math.imul(h, 31) + d[i] + 3 * d[i + 1] + 7 * d[i + 2] + d[i + 3]) | 0;
  return c.width + 'x' + c.height + ':' + h;
};
window.llDrawn = fig => {
  const c = fig.querySelector('canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < d.length; i += 4 * 97) if (d[i]) return true;
  return false;
};
"""
EPOCH_SLIDER = ("Array.from(document.querySelectorAll('.widget-hslider'))"
                ".find(s => s.querySelector('.widget-label').innerText.trim() === 'epoch')")
# the explorer's state as a person sees it: the table's text, the epoch readout and the four figures' pixels
VIEW = (f"({APP} ? {{table: {APP}.querySelector('.layerlab-summary').innerText,"
        f" epoch: {EPOCH_SLIDER}.querySelector('.widget-readout').innerText,"
        " images: llFigures().map(llPixels)} : null)")
FIGURES_READY = f"{APP} && llFigures().length === 4 && llFigures().every(llDrawn)"
CTRL = 2  # the DevTools protocol's modifier bit for Ctrl


def changed(view: dict, figure: int) -> str:
    """A page expression: every figure is drawn, and the table and figure number ``figure`` differ from ``view``."""
    return (f"{FIGURES_READY} && {APP}.querySelector('.layerlab-summary').innerText !== {json.dumps(view['table'])}"
            f" && llPixels(llFigures()[{figure}]) !== {json.dumps(view['images'][figure])}")


def column(view: dict, index: int) -> list[str]:
    """The ``index``-th column of the table in ``view``, below its header."""
    return [line.split("\t")[index] for line in view["table"].splitlines()[1:]]


def centre(rect: dict) -> tuple[float, float]:
    return rect["x"] + rect["width"] / 2, rect["y"] + rect["height"] / 2


async def use_explorer(url: str, devtools_port: int, timeout: float = 150.0) -> dict:
    """Open the served explorer, then as a person would: ctrl-click the ST run into the selection, drag the
    epoch slider to its start, hover over the accuracy curves and zoom into them. Returns the views after each
    step, the hover readout, the seconds from navigation to the first text, the loading message and the first
    view, the page's uncaught exceptions and a screenshot."""
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json", timeout=10))
    target = next(t for t in targets if t["type"] == "page")
    out: dict = {"seconds": {}}
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**27) as ws:
        page = Page(ws)
        await page.call("Runtime.enable")
        await page.call("Page.enable")
        await page.call("Page.addScriptToEvaluateOnNewDocument", source=HELPERS)
        start = time.time()
        await page.call("Page.navigate", url=url)
        text = "(document.body ? document.body.innerText : '')"
        marks = {"first text": f"{text}.trim().length > 0",  # Voilà's own spinner counts
                 "loading message": f"{text}.includes('Loading the layerlab explorer')", "first view": FIGURES_READY}
        end = time.time() + timeout
        while "first view" not in out["seconds"]:  # a mark is skipped when the next one came first
            if time.time() > end:
                raise TimeoutError(f"the explorer did not render; seen so far: {out['seconds']}")
            for name, expression in marks.items():
                if name not in out["seconds"] and await page.evaluate(expression):
                    out["seconds"][name] = round(time.time() - start, 2)
            await asyncio.sleep(0.1)
        out["loading visible after load"] = await page.evaluate(
            "Array.from(document.querySelectorAll('.layerlab-loading')).some(e => e.offsetParent !== null)")
        out["first"] = await page.evaluate(VIEW)

        # select a second run: ctrl-click its option in the runs list
        rect = await page.evaluate(
            f"(() => {{ const o = Array.from({APP}.querySelectorAll('select[multiple] option'))"
            ".find(o => o.textContent === 'ST'); o.scrollIntoView(); return o.getBoundingClientRect().toJSON(); })()")
        x, y = centre(rect)
        await page.mouse("mousePressed", x, y, CTRL)
        await page.mouse("mouseReleased", x, y, CTRL)
        await page.wait(changed(out["first"], 2), 60, "clicking the ST run did not change the view")
        out["run clicked"] = await page.evaluate(VIEW)

        # drag the epoch slider's handle to the left end of its track
        track, handle = await page.evaluate(
            f"(() => {{ const s = {EPOCH_SLIDER}; s.scrollIntoView();"
            " return [s.querySelector('.noUi-target').getBoundingClientRect().toJSON(),"
            " s.querySelector('.noUi-handle').getBoundingClientRect().toJSON()]; })()")
        x, y = centre(handle)
        await page.mouse("mousePressed", x, y)
        for step in range(1, 11):
            await page.mouse("mouseMoved", x + (track["x"] - 20 - x) * step / 10, y)
        await page.mouse("mouseReleased", track["x"] - 20, y)
        await page.wait(changed(out["run clicked"], 3), 60, "moving the epoch slider did not change the view")
        out["slider moved"] = await page.evaluate(VIEW)

        # hover over the accuracy curves: the figure's footer reads the coordinates under the cursor
        curves = "llFigures()[0]"
        rect = await page.evaluate(f"(() => {{ {curves}.scrollIntoView(); return {curves}.querySelector('canvas')"
                                   ".getBoundingClientRect().toJSON(); })()")
        x, y = centre(rect)
        await page.mouse("mouseMoved", x, y)
        out["hover"] = await page.wait(f"{curves}.querySelector('.jupyter-matplotlib-footer').innerText.trim()", 30,
                                       "hovering over the curves shows no coordinates")
        # zoom: the toolbar's zoom button, then drag a rectangle over the middle of the curves
        button = await page.evaluate(f"Array.from({curves}.querySelectorAll('button')).find("
                                     "b => b.title.startsWith('Zoom')).getBoundingClientRect().toJSON()")
        await page.mouse("mousePressed", *centre(button))
        await page.mouse("mouseReleased", *centre(button))
        await page.mouse("mousePressed", x - rect["width"] / 6, y - rect["height"] / 6)
        for step in range(1, 6):
            await page.mouse("mouseMoved", x - rect["width"] / 6 + rect["width"] / 15 * step,
                             y - rect["height"] / 6 + rect["height"] / 15 * step)
        await page.mouse("mouseReleased", x + rect["width"] / 6, y + rect["height"] / 6)
        before = json.dumps(out["slider moved"]["images"][0])
        await page.wait(f"llPixels({curves}) !== {before}", 30, "zooming did not change the curves")
        out["zoomed"] = await page.evaluate(VIEW)
        shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        out["dom"] = await page.evaluate("document.documentElement.outerHTML")
        out["errors"] = page.errors
    out["png"] = base64.b64decode(shot["data"])
    return out


@pytest.fixture(scope="module")
def run_root(analysis_run_root) -> Path:
    """ST and AT runs; AT with its CKA and LSC files, so every panel has something to draw."""
    return analysis_run_root


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_explorer_in_chromium(run_root, tmp_path, capsys):
    """The served explorer shows a loading message, then the app; a click on a run and a drag of the epoch
    slider change what is shown; a figure reads the coordinates under the cursor and zooms; once the browser is
    gone, Voilà culls the idle kernel."""
    from PIL import Image, ImageStat

    import layerlab
    from layerlab.explore import app_notebook, voila_command

    notebook = app_notebook(run_root, tmp_path / "app" / "explorer.ipynb")
    port, devtools = free_port(), free_port()
    # the kernel imports the layerlab under test, whatever is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(Path(layerlab.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "voila.log"
    server = subprocess.Popen(voila_command(notebook, port=port, cull_idle=5, cull_interval=1), cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
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
        seen = asyncio.run(use_explorer(f"http://127.0.0.1:{port}/", devtools))
        browser.kill()  # no unload handler runs: the kernel is left without a page, as by a crashed tab
        browser.wait(timeout=20)
        end = time.time() + 60
        while "Culling 'idle' kernel" not in log.read_text() and time.time() < end:
            time.sleep(0.5)
        culled = log.read_text()
    finally:
        stop(browser)
        stop(server)
    keep = os.environ.get("LAYERLAB_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(seen["png"])
    with capsys.disabled():  # the timings are reported, not asserted: they depend on the machine's load
        print(f"\nexplorer in Chromium, seconds after navigation: {seen['seconds']}")

    dom = seen["dom"]
    for text in ("layerlab-explorer", "layerlab explorer", "rescan runs", "launch what-if run", "focus run",
                 "adversarial", "layerlab-summary", "re-initialize updated blocks", "select several runs"):
        assert text in dom, text
    assert not seen["errors"], seen["errors"]
    assert set(seen["seconds"]) >= {"first text", "first view"}
    assert not seen["loading visible after load"]
    first, clicked, moved = seen["first"], seen["run clicked"], seen["slider moved"]
    # the first view shows AT only; the click adds ST to the table and redraws the accuracy curves
    assert column(first, 0) == ["AT"] and column(clicked, 0) == ["AT", "ST"]
    assert clicked["images"][0] != first["images"][0]
    # the slider went to epoch 1: readout, table rows and the epoch-dependent figures follow
    assert first["epoch"] == clicked["epoch"] == "3" and moved["epoch"] == "1"
    assert column(moved, 3) == ["1", "1"]
    assert moved["images"][0] != clicked["images"][0] and moved["images"][2] != clicked["images"][2]
    assert moved["images"][3] != clicked["images"][3]  # the LSC checkpoint nearest the epoch
    # the figures are interactive: coordinates under the cursor, and a zoom redraws the curves (only)
    assert re.search(r"x.*y.*\d", seen["hover"]), seen["hover"]
    zoomed = seen["zoomed"]
    assert zoomed["images"][0] != moved["images"][0] and zoomed["images"][1:] == moved["images"][1:]
    assert "Culling 'idle' kernel" in culled, "Voilà kept the kernel of a closed page"

    image = Image.open(io.BytesIO(seen["png"])).convert("L")
    assert image.width == WINDOW[0] and image.height >= 600
    assert ImageStat.Stat(image).stddev[0] > 20  # not blank: text, figures and controls
    dark = sum(image.histogram()[:200]) / (image.width * image.height)
    assert dark > 0.03, f"only {dark:.1%} of the page is not near-white"


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/test_browser.py
    sys.exit(pytest.main([__file__, "-q"]))

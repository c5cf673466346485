"""Open report pages in a real headless Chromium through the DevTools protocol (CDP).

:func:`check_pages` starts Debian's ``/usr/bin/chromium`` once (own temporary profile, no network
services), opens each ``file://`` page in a fresh tab, waits for ``load``, and returns per page: console
errors and uncaught exceptions, every ``<img>`` with its ``naturalWidth`` (0: the image did not decode),
the page size, and optionally a full-page PNG screenshot. The websocket client is aiohttp's (already
installed with ``ray[default]``), so no new dependency.

Also usable by hand: ``python tests/browser.py runs/demo/analysis/report.html --shots /tmp/shots``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--hide-scrollbars", "--remote-debugging-port=0")
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium"
VIEWPORT = (1280, 900)


def chromium() -> str | None:
    """Path of the Chromium binary, or None when it is not installed."""
    for name in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if name and Path(name).exists():
            return name
    return None


def require_chromium() -> str:
    """The Chromium binary; without one the test skips locally and fails in CI (``tests.testing_utils``)."""
    from tests.testing_utils import require

    path = chromium()
    require(path is not None, "chromium not installed", INSTALL_HINT)
    return path


@dataclass
class PageCheck:
    path: str
    console_errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # {"alt", "naturalWidth", "naturalHeight", "complete"}
    width: int = 0
    height: int = 0
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["naturalWidth"] <= 0]


class _Tab:
    """One CDP page session: send commands, collect console errors and exceptions."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id, self.errors, self.loaded = ws, 0, [], asyncio.Event()
        self.pending: dict[int, asyncio.Future] = {}

    async def listen(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                          for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append(f"log: {params['entry'].get('text', '')} {params['entry'].get('url', '')}")
            elif method == "Page.loadEventFired":
                self.loaded.set()

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 60)
        if "error" in reply:
            raise RuntimeError(f"CDP {method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str):
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res["result"].get("value")


IMAGES_JS = """Promise.all([...document.images].map(i => i.decode().catch(() => null))).then(() =>
  [...document.images].map(i => ({alt: i.alt, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
                                 complete: i.complete})))"""


async def _check(port: int, page: Path, shots: Path | None) -> PageCheck:
    import aiohttp

    out = PageCheck(str(page))
    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
            target = await r.json(content_type=None)
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = _Tab(ws)
            listener = asyncio.create_task(tab.listen())
            for domain in ("Runtime", "Log", "Page"):
                await tab.send(f"{domain}.enable")
            await tab.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                           deviceScaleFactor=1, mobile=False)
            await tab.send("Page.navigate", url=page.resolve().as_uri())
            await asyncio.wait_for(tab.loaded.wait(), 60)
            out.images = await tab.evaluate(IMAGES_JS)
            out.width, out.height = await tab.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            if shots is not None:
                shot = await tab.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                      clip={"x": 0, "y": 0, "width": out.width, "height": out.height, "scale": 1})
                shots.mkdir(parents=True, exist_ok=True)
                out.screenshot = shots / (page.parent.name + "_" + page.stem + ".png")
                out.screenshot.write_bytes(base64.b64decode(shot["data"]))
            await asyncio.sleep(0.2)  # late console messages
            out.console_errors = list(tab.errors)
            listener.cancel()
        async with http.get(f"http://127.0.0.1:{port}/json/close/{target['id']}") as r:
            await r.read()
    return out


def check_pages(pages: list[Path], shots: Path | None = None, binary: str | None = None) -> list[PageCheck]:
    """Open each page in one headless Chromium; see the module docstring."""
    binary = binary or chromium()
    if binary is None:
        raise FileNotFoundError(f"chromium not found: {INSTALL_HINT}")
    # Chromium's helper processes may still write the profile for a moment after the browser exits: a
    # profile left behind in the temp folder is not a failure of the pages checked.
    with tempfile.TemporaryDirectory(prefix="kscale-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            port = _devtools_port(Path(profile), proc)
            return [asyncio.run(_check(port, Path(p), shots)) for p in pages]
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """Chromium writes the port it chose into ``DevToolsActivePort`` in the profile directory."""
    deadline = time.monotonic() + timeout
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium did not open its DevTools port within {timeout:.0f} s")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="+", type=Path)
    ap.add_argument("--shots", type=Path, default=None)
    args = ap.parse_args()
    for c in check_pages(args.pages, args.shots):
        print(json.dumps({"page": c.path, "errors": c.console_errors, "images": len(c.images),
                          "broken": c.broken_images, "size": [c.width, c.height],
                          "screenshot": str(c.screenshot) if c.screenshot else None}))
    os._exit(0)

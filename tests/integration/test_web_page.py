"""The web page at `/` (funchat/orchestrator/realtime/web/index.html) end to end in a real browser:
Debian's headless chromium, its microphone a fake capture device playing a WAV of the test
recording (looped by chromium), talking through the page's own JavaScript (getUserMedia, an
AudioWorklet, the Realtime WebSocket with the key as a subprotocol) to a real stack: redis-server,
the shared tritonservers, the Ray Serve orchestrator with API keys. The test drives the browser
over the Chrome DevTools Protocol (the `websockets` package) and reads the page's state from
`window.funchat`.

A screenshot of the page after the first reply is saved in the test's tmp dir and copied to
/tmp/funchat_web_page.png.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.integration.pcm import pcm16_bytes
from tests.integration.test_realtime import stack  # noqa: F401 (the module's own stack, as test_realtime's)

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_COPY = Path("/tmp/funchat_web_page.png")
SPEECH_S = 5.6  # the recording's speech (it ends at ~5.55 s), then silence; chromium loops the file
SILENCE_S = 2.0
REPLY_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def capture_wav(speech, tmp_path_factory) -> Path:
    """What the fake microphone plays: the recording's speech, then silence, as PCM16 (16 kHz mono)."""
    path = tmp_path_factory.mktemp("web-page-audio") / "capture.wav"
    samples = np.concatenate([speech[:int(SPEECH_S * 16000)], np.zeros(int(SILENCE_S * 16000), np.float32)])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm16_bytes(samples))
    return path


class Chromium:
    """A headless chromium process and one page of it, driven over the DevTools Protocol."""

    def __init__(self, wav: Path, run_dir: Path):
        self.run_dir = run_dir
        self.stderr_path = run_dir / "chromium.stderr"
        profile = run_dir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             f"--user-data-dir={profile}", "--window-size=900,1000", "--remote-debugging-port=0",
             "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True)
        self.ws = None
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self.reader: asyncio.Task | None = None

    def stderr_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def attach(self, timeout: float = 30.0) -> None:
        """Wait for the DevTools port (chromium writes it to DevToolsActivePort), attach to the page."""
        port_file = self.run_dir / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        target = None
        while target is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with code {self.proc.returncode}:\n{self.stderr_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"chromium's DevTools did not come up in {timeout:g} s:\n{self.stderr_tail()}")
            try:
                port = int(port_file.read_text().split()[0])
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                target = pages[0] if pages else None
            except (OSError, ValueError, IndexError):
                pass
            if target is None:
                await asyncio.sleep(0.2)
        self.ws = await ws_connect(target["webSocketDebuggerUrl"], max_size=None, ping_interval=None)
        self.reader = asyncio.ensure_future(self.read())
        await self.call("Runtime.enable")
        await self.call("Page.enable")

    async def read(self) -> None:
        try:
            async for text in self.ws:
                msg = json.loads(text)
                if "id" in msg:
                    future = self.pending.pop(msg["id"], None)
                    if future is not None and not future.done():
                        future.set_result(msg)
                elif msg.get("method") == "Runtime.consoleAPICalled":
                    args = msg["params"].get("args", [])
                    self.console.append(msg["params"]["type"] + ": " + " ".join(
                        str(a.get("value", a.get("description", ""))) for a in args))
                elif msg.get("method") == "Runtime.exceptionThrown":
                    details = msg["params"]["exceptionDetails"]
                    self.console.append("exception: " + details.get("exception", {}).get("description",
                                                                                         details.get("text", "")))
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the DevTools connection closed"))

    async def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self.next_id += 1
        future = self.pending[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        msg = await asyncio.wait_for(future, timeout)
        if "error" in msg:
            raise AssertionError(f"DevTools {method} failed: {msg['error']}")
        return msg["result"]

    async def evaluate(self, expression: str, gesture: bool = False):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                                 userGesture=gesture)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise AssertionError(f"{expression!r} threw: {d.get('exception', {}).get('description', d.get('text'))}")
        return result["result"].get("value")

    async def open(self, url: str, timeout: float = 30.0) -> None:
        await self.call("Page.navigate", url="about:blank")  # a new document, even when only the fragment differs
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not await self.evaluate("document.readyState === 'complete' && !!window.funchat"):
            if time.monotonic() > deadline:
                raise AssertionError(f"the page {url.split('#')[0]} did not load in {timeout:g} s")
            await asyncio.sleep(0.1)

    async def state(self) -> dict:
        return await self.evaluate("JSON.parse(JSON.stringify(window.funchat))")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stderr.close()


def chromium_or_fail() -> None:
    """Chromium may still be being installed: wait a little, then fail (never skip) if it is missing."""
    deadline = time.monotonic() + 180
    while shutil.which(CHROMIUM) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{CHROMIUM} is missing: this test needs Debian's chromium (apt-get install chromium)",
                        pytrace=False)
        time.sleep(5)


def in_browser(wav: Path, run_dir: Path, scenario) -> None:
    """Run `scenario(browser)` against a fresh chromium; on failure, say what the page and chromium saw."""
    chromium_or_fail()

    async def main():
        browser = Chromium(wav, run_dir)
        try:
            await browser.attach()
            try:
                await scenario(browser)
            except AssertionError as exc:
                state = None
                try:
                    state = await asyncio.wait_for(browser.state(), 10)
                except Exception as why:  # noqa: BLE001 (the page itself may be what failed)
                    state = f"(unreadable: {why!r})"
                raise AssertionError(f"{exc}\n\nwindow.funchat: {json.dumps(state, indent=1)}\n\npage console:\n"
                                     + "\n".join(browser.console[-40:])
                                     + f"\n\nchromium stderr:\n{browser.stderr_tail()}") from None
            finally:
                await browser.close()
        finally:
            browser.kill()

    asyncio.run(main())


async def wait_for(browser: Chromium, what: str, done, timeout: float) -> dict:
    """Poll window.funchat until `done(state)`; fail as soon as the page shows an error."""
    deadline = time.monotonic() + timeout
    while True:
        state = await browser.state()
        if done(state):
            return state
        if state["errors"]:
            raise AssertionError(f"the page shows errors while waiting for {what}: {state['errors']}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout:g} s")
        await asyncio.sleep(0.25)


def answered(turn: dict) -> bool:
    return bool(turn["transcript"]) and turn["firstAudioMs"] is not None and turn["status"] is not None


@pytest.mark.parametrize("capture", ["24k", "native"])
def test_a_spoken_turn_through_the_web_page(stack, capture_wav, tmp_path, capture):
    """capture: the microphone on the 24 kHz playback context (what chromium can do), or (#capture=native)
    on a context at the device's rate, resampled to 24 kHz by the page's worklet (what browsers do
    that cannot connect a microphone to a context at another rate)."""
    async def scenario(browser: Chromium):
        await browser.open(stack["page"] + "#key=" + stack["key"] + ("&capture=native" if capture == "native" else ""))
        prefilled = await browser.evaluate("[document.getElementById('key').value, location.href]")
        assert prefilled[0] == stack["key"], "the key field is not filled from #key="
        assert stack["key"] not in prefilled[1], "the key stays in the address bar"
        await browser.evaluate("document.getElementById('connect').click()", gesture=True)

        state = await wait_for(browser, "session", lambda s: s["ready"] and s["sessionId"] and s["microphone"], 30)
        assert state["connected"]
        if capture == "24k":
            assert state["captureRate"] == 24000 and not state["resampling"], state
        else:
            assert state["captureRate"] != 24000 and state["resampling"], state
        # the reply, then the looped recording's next turn (speaking over the reply if it still runs)
        state = await wait_for(browser, "answered turn with played reply audio, then the next turn",
                               lambda s: any(answered(t) for t in s["turns"]) and s["playedMs"] > 0
                               and s["events"].get("input_audio_buffer.speech_started", 0) >= 2, REPLY_TIMEOUT_S)
        await asyncio.sleep(1.0)  # the server's answer to a truncate, if one was sent
        state = await browser.state()
        assert not state["errors"], state["errors"]
        turn = next(t for t in state["turns"] if answered(t))
        assert turn["speechMs"] and turn["speechMs"] > 1000, turn  # the recording's speech, one turn
        assert 0 < turn["firstAudioMs"] < 30000 and turn["audioMs"] > 0
        assert turn["serverFirstAudioMs"] is not None, "response.done carried no latency_ms.first_audio"
        assert state["events"].get("session.created") == 1 and state["events"].get("response.done", 0) >= 1
        assert state["sentAudioMs"] >= 5000
        # a barge-in (the looped recording speaks over a reply still running) truncates the reply at
        # what was heard, and the server cuts it there
        for cut in state["truncates"]:
            cut_turn = next(t for t in state["turns"] if t["itemId"] == cut["itemId"])
            assert 0 <= cut["audioEndMs"] <= cut_turn["audioMs"] + 1, (cut, cut_turn)
            assert cut_turn["truncatedAtMs"] == cut["audioEndMs"]
            assert cut in state["truncated"], f"the server did not confirm the truncate {cut}: {state['truncated']}"

        shown = await browser.evaluate("document.getElementById('transcript').innerText")
        assert f"(speech, {turn['speechMs']} ms)" in shown
        assert turn["transcript"] in await browser.evaluate(
            "[...document.querySelectorAll('.msg.bot .text')].map((e) => e.textContent)")
        assert f"first audio {turn['firstAudioMs']} ms" in shown
        await asyncio.sleep(0.3)
        png = tmp_path / "web_page.png"
        await browser.screenshot(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if capture == "24k":
            shutil.copyfile(png, SCREENSHOT_COPY)

        state = await browser.state()
        assert not state["errors"], state["errors"]
        await browser.evaluate("document.getElementById('hangup').click()", gesture=True)
        state = await browser.state()
        assert not state["connected"] and not state["microphone"] and state["status"] == "Hung up"

    in_browser(capture_wav, tmp_path, scenario)


def test_a_wrong_key_shows_the_servers_error(stack, capture_wav, tmp_path):
    wrong = "fck_" + "a" * 10 + "_" + "b" * 52

    async def scenario(browser: Chromium):
        await browser.open(stack["page"] + "#key=" + wrong)
        await browser.evaluate("document.getElementById('connect').click()", gesture=True)
        deadline = time.monotonic() + 30
        while (state := await browser.state())["closeCode"] is None:
            if time.monotonic() > deadline:
                raise AssertionError("the server did not close the socket of a wrong key in 30 s")
            await asyncio.sleep(0.2)
        assert state["closeCode"] == 1008 and not state["connected"] and state["sessionId"] is None
        await asyncio.sleep(1.0)  # the microphone, asked for when the socket opened, is not kept
        assert not (await browser.state())["microphone"]
        assert [e["code"] for e in state["errors"]] == ["unauthenticated"], state["errors"]
        shown = await browser.evaluate("[document.getElementById('errors').innerText,"
                                       " document.getElementById('status').innerText]")
        assert "unauthenticated" in shown[0] and state["errors"][0]["message"] in shown[0]
        assert "refused" in shown[1] and "1008" in shown[1]
        assert wrong[12:] not in shown[0]  # the server never echoes a key
        await browser.screenshot(tmp_path / "wrong_key.png")
        # a key no subprotocol can carry is refused by the page itself, before any connection
        await browser.open(stack["page"] + "#key=not%20a%20key")
        await browser.evaluate("document.getElementById('connect').click()", gesture=True)
        state = await browser.state()
        assert [e["code"] for e in state["errors"]] == ["invalid_key"] and state["closeCode"] is None
        assert "not an API key" in await browser.evaluate("document.getElementById('errors').innerText")

    in_browser(capture_wav, tmp_path, scenario)

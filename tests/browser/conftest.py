"""Real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, against a gateway subprocess."""

from __future__ import annotations

import os
import wave
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess

CHROMIUM = os.environ.get("TALKGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # Calls: fake camera and microphone, no permission prompts, loopback ICE, autoplay.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
]
MIC_HZ = 440
SECRET = "browser-secret-0123456789abcdef-0123456789"


def write_tone_wav(path: Path, hz: float = MIC_HZ, seconds: float = 4.0, rate: int = 48_000) -> Path:
    """The fake microphone's sound (Chromium loops the file)."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (9000 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def start_gateway(*args: str) -> GatewayProcess:
    """A gateway subprocess for the browser tests (loopback media, the tests' secret)."""
    return GatewayProcess(*args, "--port", "0", *RTC_LOOPBACK_ARGS, env={"TALKGATE_SECRET": SECRET})


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    gw = start_gateway("serve")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def desk_gateway() -> Iterator[GatewayProcess]:
    """A gateway where an agent may hold two conversations at once."""
    gw = start_gateway("serve", "--agent-capacity", "2")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def dev_gateway() -> Iterator[GatewayProcess]:
    gw = start_gateway("demo", "--demo-bot", "echo")  # deterministic answers
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (the README's test command does)")
    wav = write_tone_wav(tmp_path_factory.mktemp("media") / "mic.wav")
    args = [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={wav}"]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield b
        b.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()

NewPage = Callable[..., Page]


@pytest.fixture
def new_page(browser: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewPage]:
    """Pages in separate browser contexts (like two people); screenshots of each on failure."""
    contexts: list[tuple[str, BrowserContext, Page]] = []

    def open_page(name: str, url: str, **context_options: object) -> Page:
        context = browser.new_context(**context_options)  # type: ignore[arg-type]
        page = context.new_page()
        page.set_default_timeout(10_000)
        console: list[str] = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.console_log = console  # type: ignore[attr-defined]
        page.goto(url)
        contexts.append((name, context, page))
        return page

    yield open_page
    if request.node.stash.get(_FAILED, False):
        for name, _, page in contexts:
            path = tmp_path / f"{name}.png"
            page.screenshot(path=str(path), full_page=True)
            print(f"screenshot of {name}: {path}")
            print("\n".join(page.console_log))  # type: ignore[attr-defined]
    for _, context, _ in contexts:
        context.close()

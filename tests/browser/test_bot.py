"""The customer page talking to a speech bot (the demo's echo bot) in real Chromium."""

from __future__ import annotations

import wave
from collections.abc import Iterator

import numpy as np
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, NewPage
from tests.browser.test_calls import growing, stats
from tests.browser.test_pages import send
from tests.gateway_process import GatewayProcess
from tests.speech import resample, speak

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Chromium whose fake microphone says a sentence, then is silent (the file loops)."""
    speech = resample(speak("I would like to book an appointment"), 16_000, 48_000)
    pcm = np.concatenate([np.zeros(24_000, np.int16), speech, np.zeros(48_000 * 4, np.int16)])
    path = tmp_path_factory.mktemp("speech") / "request.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48_000)
        w.writeframes(pcm.tobytes())
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={path}"]
        )
        yield b
        b.close()


def test_the_customer_talks_to_the_bot_and_hears_it(dev_gateway: GatewayProcess, new_page: NewPage) -> None:
    customer = new_page("customer", dev_gateway.url + "/")
    expect(customer.locator("#status")).to_have_text("Echo bot is answering")
    send(customer, "hello bot")
    expect(customer.locator(".msg.role-bot .msg-bubble")).to_have_text(["You said: hello bot"])
    expect(customer.locator("#call")).to_be_enabled()  # the bot is someone to call
    customer.click("#call")
    expect(customer.locator("#call-bar")).to_be_visible()
    expect(customer.locator("#call-status")).to_contain_text("On a call with Echo bot · ")
    assert stats(customer)["audioEnergy"] == 0  # the bot is silent until the customer has spoken
    # The sentence ends, the bot gets speech.stopped and echoes it: its audio arrives.
    growing(customer, "audioEnergy", timeout=20)

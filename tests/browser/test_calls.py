"""Chat → voice → video between the customer page and the agent console, in real Chromium."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import NewPage
from tests.browser.test_pages import VIEWPORT, send, token_url
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.browser

STATS_JS = """
async () => {
  const out = { audioPackets: 0, audioEnergy: 0, framesDecoded: 0, connected: false };
  const pc = window.talkgate && window.talkgate.pc;
  if (!pc) return out;
  out.connected = pc.connectionState === "connected";
  (await pc.getStats()).forEach((r) => {
    if (r.type !== "inbound-rtp") return;
    if (r.kind === "audio") { out.audioPackets += r.packetsReceived || 0; out.audioEnergy += r.totalAudioEnergy || 0; }
    if (r.kind === "video") out.framesDecoded += r.framesDecoded || 0;
  });
  return out;
}
"""


def stats(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate(STATS_JS)
    return result


def growing(page: Page, key: str, timeout: float = 15.0) -> tuple[float, float]:
    """Wait until stats[key] is positive, then until it grows again; return the two readings."""
    deadline = time.monotonic() + timeout
    first = 0.0
    while time.monotonic() < deadline:
        first = stats(page)[key]
        if first > 0:
            break
        page.wait_for_timeout(200)
    assert first > 0, f"{key} never became positive: {stats(page)}"
    while time.monotonic() < deadline:
        page.wait_for_timeout(300)
        second = stats(page)[key]
        if second > first:
            return first, second
    raise AssertionError(f"{key} stopped growing at {first}: {stats(page)}")


def test_chat_then_voice_then_video(gateway: GatewayProcess, new_page: NewPage) -> None:
    agent = new_page("agent", token_url(gateway, "a-call", "agent", room="r-call", name="Sam Lee"), viewport=VIEWPORT)
    customer = new_page(
        "customer", token_url(gateway, "u-call", "customer", room="r-call", name="Ann Smith"), viewport=VIEWPORT
    )
    # Chat first.
    send(customer, "My router shows a red light")
    expect(agent.locator(".msg.other .msg-bubble")).to_have_text(["My router shows a red light"])

    # Voice: the customer calls; the agent is asked and accepts.
    expect(customer.locator("#call")).to_be_enabled()
    customer.click("#call")
    expect(customer.locator("#call-bar")).to_be_visible()
    expect(agent.locator("#prompt-text")).to_have_text("Ann Smith would like to start a voice call.")
    agent.click("#prompt-accept")
    expect(agent.locator("#prompt")).to_be_hidden()
    for page in (customer, agent):
        growing(page, "audioPackets")
        growing(page, "audioEnergy")
    expect(customer.locator("#call-status")).to_contain_text("Voice · ")
    expect(agent.locator("#call-status")).to_contain_text("Voice · ")

    # Video: the agent asks; the customer's camera turns on only with the customer's click.
    agent.click("#video")
    expect(customer.locator("#prompt-text")).to_have_text("Sam Lee would like to turn on video.")
    assert stats(customer)["framesDecoded"] == 0 or customer.evaluate("!window.talkgate.local.video")
    customer.click("#prompt-accept")
    for page in (customer, agent):
        growing(page, "framesDecoded", timeout=25)
        expect(page.locator("#media-area")).to_be_visible()
        expect(page.locator("#call-status")).to_contain_text("Video · ")
    # Audio keeps flowing after the renegotiations.
    growing(customer, "audioEnergy")

    if folder := os.environ.get("TALKGATE_SCREENSHOTS"):
        customer.screenshot(path=f"{folder}/customer-video.png")
        agent.screenshot(path=f"{folder}/agent-video.png")

    # Mute and hang up.
    customer.click("#mute")
    expect(customer.locator("#mute")).to_have_text("Unmute")
    customer.click("#hangup")
    expect(customer.locator("#call-bar")).to_be_hidden()
    expect(customer.locator("#call")).to_be_enabled()


def test_declined_video_turns_the_requesters_camera_off(gateway: GatewayProcess, new_page: NewPage) -> None:
    agent = new_page("agent", token_url(gateway, "a-dec", "agent", room="r-dec", name="Sam"))
    customer = new_page("customer", token_url(gateway, "u-dec", "customer", room="r-dec", name="Ann"))
    expect(agent.locator("#video")).to_be_enabled()
    agent.click("#video")
    expect(customer.locator("#prompt")).to_be_visible()
    customer.click("#prompt-decline")
    expect(agent.locator("#banner")).to_contain_text("Ann declined video")
    expect(agent.locator("#local-video")).to_be_hidden()
    assert customer.evaluate("window.talkgate.local.video") is None

"""Chat → voice → video between the customer page and the agent console, in real Chromium."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import NewPage, start_gateway
from tests.browser.test_pages import VIEWPORT, send, token_url
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.browser

#: Inbound RTP totals of the call in a conversation (null: the current one).
STATS_JS = """
async (conversation) => {
  const out = { audioPackets: 0, audioEnergy: 0, framesDecoded: 0, connected: false };
  const tg = window.talkgate;
  const call = tg && (conversation === null ? tg : tg.conversation(conversation));
  const pc = call && call.pc;
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


#: The fraction of the remote camera's picture that the #remote-video element shows (object-fit).
VISIBLE_PICTURE_JS = """
() => {
  const v = document.getElementById("remote-video");
  const box = v.getBoundingClientRect();
  const w = v.videoWidth, h = v.videoHeight;
  if (!w || !h) return 0;
  const fit = getComputedStyle(v).objectFit;
  const contain = Math.min(box.width / w, box.height / h);
  const cover = Math.max(box.width / w, box.height / h);
  const scale = { contain, cover, "scale-down": Math.min(1, contain), none: 1 }[fit];
  if (scale === undefined) return 1; // fill: all of it, stretched
  return Math.min(1, box.width / (w * scale)) * Math.min(1, box.height / (h * scale));
}
"""
#: Records the types of the messages the page sends (window.sentTypes).
RECORD_SENT_JS = """
() => {
  const client = window.talkgate;
  const send = client.send.bind(client);
  window.sentTypes = [];
  client.send = (message) => { window.sentTypes.push(message.type); return send(message); };
}
"""


def stats(page: Page, conversation: str | None = None) -> dict[str, Any]:
    """The page's call statistics: of its current conversation, or of the one named."""
    result: dict[str, Any] = page.evaluate(STATS_JS, conversation)
    return result


def growing(page: Page, key: str, timeout: float = 15.0, conversation: str | None = None) -> tuple[float, float]:
    """Wait until stats[key] is positive, then until it grows again; return the two readings."""
    deadline = time.monotonic() + timeout
    first = 0.0
    while time.monotonic() < deadline:
        first = stats(page, conversation)[key]
        if first > 0:
            break
        page.wait_for_timeout(200)
    assert first > 0, f"{key} never became positive: {stats(page, conversation)}"
    while time.monotonic() < deadline:
        page.wait_for_timeout(300)
        second = stats(page, conversation)[key]
        if second > first:
            return first, second
    raise AssertionError(f"{key} stopped growing at {first}: {stats(page, conversation)}")


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
    expect(customer.locator("#call-status")).to_contain_text("On a call with Sam Lee · ")
    expect(agent.locator("#call-status")).to_contain_text("On a call with Ann Smith · ")

    # Video: the agent asks; the customer's camera turns on only with the customer's click.
    agent.click("#video")
    expect(customer.locator("#prompt-text")).to_have_text("Sam Lee would like to turn on video.")
    assert stats(customer)["framesDecoded"] == 0 or customer.evaluate("!window.talkgate.local.video")
    customer.click("#prompt-accept")
    for page in (customer, agent):
        growing(page, "framesDecoded", timeout=25)
        expect(page.locator("#media-area")).to_be_visible()
        expect(page.locator("#call-status")).to_contain_text("Video call with ")
    # The agent sees the customer's whole picture: object-fit "cover" in the console's 16:9
    # box cut off the top and bottom of the customer's 4:3 camera.
    assert agent.evaluate(VISIBLE_PICTURE_JS) > 0.99
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


def voice_call(customer: Page, agent: Page) -> None:
    """The customer calls, the agent accepts, audio flows both ways."""
    expect(customer.locator("#call")).to_be_enabled()
    customer.click("#call")
    agent.click("#prompt-accept")
    for page in (customer, agent):
        growing(page, "audioEnergy")


def assert_stays(page: Page, selector: str, text: str, ms: int = 2200) -> None:
    """The element shows ``text`` now and still after ``ms`` (a running call timer would change it)."""
    expect(page.locator(selector)).to_have_text(text)
    page.wait_for_timeout(ms)
    expect(page.locator(selector)).to_have_text(text)


def test_the_call_timer_stops_when_the_other_side_hangs_up(gateway: GatewayProcess, new_page: NewPage) -> None:
    """Bug: after the agent hung up, the customer's call bar kept counting ("Voice · 0:42",
    "0:43", …) as if the call went on, and did not say that the agent had hung up."""
    agent = new_page("agent", token_url(gateway, "a-hang", "agent", room="r-hang", name="Sam"))
    customer = new_page("customer", token_url(gateway, "u-hang", "customer", room="r-hang", name="Ann"))
    voice_call(customer, agent)
    expect(customer.locator("#call-status")).to_contain_text("On a call with Sam · ")
    agent.click("#hangup")
    expect(agent.locator("#call-bar")).to_be_hidden()
    assert_stays(customer, "#call-status", "Sam hung up")
    expect(customer.locator("#hangup")).to_be_visible()  # the customer's microphone is theirs to turn off


def test_closing_the_conversation_after_a_call_ends_it_quietly(gateway: GatewayProcess, new_page: NewPage) -> None:
    """Bug: "Close conversation" after a call showed the agent a raw protocol error ("there is no
    call yet: send an offer first"): leaving ended the call at the gateway, then the page sent
    a hangup for it. And the customer's call timer went on counting after the agent left."""
    agent = new_page("agent", token_url(gateway, "a-close", "agent", room="r-close", name="Sam Lee"))
    customer = new_page("customer", token_url(gateway, "u-close", "customer", room="r-close", name="Ann"))
    voice_call(customer, agent)
    agent.evaluate(RECORD_SENT_JS)
    agent.click("#leave")
    expect(agent.locator("#no-conversation")).to_be_visible()
    expect(agent.locator("#call-bar")).to_be_hidden()
    agent.wait_for_timeout(1000)  # time for an error to come back
    expect(agent.locator("#banner")).to_be_hidden()
    assert agent.evaluate("window.sentTypes") == ["leave"]
    assert agent.evaluate("window.talkgate.inCall") is False
    assert_stays(customer, "#call-status", "Sam Lee left")


def test_a_bot_call_goes_on_with_the_agent_after_the_handover(dev_gateway: GatewayProcess, new_page: NewPage) -> None:
    """Bug: when a customer on a voice call with the bot was handed over, nothing told the agent
    that the customer was on a call, the agent's Call sent an upgrade request for the
    microphone the customer was already sending (asking the customer again), and the
    customer's call bar did not say with whom the call was."""
    customer = new_page("customer", dev_gateway.url + "/")
    expect(customer.locator("#status")).to_have_text("Echo bot is answering")
    customer.evaluate(
        """() => { window.upgradesAsked = [];
        window.talkgate.on("upgrade.request", (m) => { if (m.from.identity !== window.talkgate.joined.identity)
          window.upgradesAsked.push(m.from.role); }); }"""
    )
    customer.click("#call")
    expect(customer.locator("#call-status")).to_contain_text("On a call with Echo bot · ")
    name = customer.evaluate("window.talkgate.joined.name")
    customer.click("#escalate")

    agent = new_page("agent", f"{dev_gateway.url}/agent")
    agent.fill("#agent-name", "Dee Demo")
    agent.click("#signin-form button")
    agent.locator(".queue-item", has_text=name).locator("button.accept").click()
    expect(agent.locator("#call-notice-text")).to_have_text(f"{name} is on a call")
    expect(agent.locator("#call .label")).to_have_text("Join call")
    expect(customer.locator("#call-status")).to_have_text("Waiting for Dee Demo to join the call…")

    agent.click("#join-call")  # one click
    expect(agent.locator("#call-notice")).to_be_hidden()
    expect(agent.locator("#call-status")).to_contain_text(f"On a call with {name} · ")
    expect(customer.locator("#call-status")).to_contain_text("On a call with Dee Demo · ")
    whole = "(() => { const s = document.getElementById('call-status'); return s.scrollWidth <= s.clientWidth; })()"
    assert customer.evaluate(whole)  # not cut to "On a call wi…" in the narrow widget
    growing(agent, "audioEnergy")  # the agent hears the customer
    growing(customer, "audioEnergy")  # and the customer the agent
    expect(customer.locator("#prompt")).to_be_hidden()
    assert customer.evaluate("window.upgradesAsked") == []  # the customer was not asked again


def test_ice_checks_are_not_logged_by_default(new_page: NewPage) -> None:
    """Bug: aioice logged every ICE connectivity check of every call at INFO, drowning the
    demo's output."""
    gw = start_gateway("serve")
    try:
        agent = new_page("agent", token_url(gw, "a-log", "agent", room="r-log", name="Sam"))
        customer = new_page("customer", token_url(gw, "u-log", "customer", room="r-log", name="Ann"))
        voice_call(customer, agent)
    finally:
        log = gw.stop()
    assert "aioice" not in log, log[-2000:]


def test_video_goes_on_when_a_second_agent_takes_over(gateway: GatewayProcess, new_page: NewPage) -> None:
    """The gateway forwards video (media/video.py): after the first agent leaves and a second
    one turns a camera on, the customer's same video stream carries the new agent's picture
    (from its keyframe on, sequence numbers continuing) and Chromium decodes it."""
    first = new_page("agent", token_url(gateway, "a-one", "agent", room="r-hand", name="Sam"), viewport=VIEWPORT)
    customer = new_page("customer", token_url(gateway, "u-hand", "customer", room="r-hand", name="Ann"))
    voice_call(customer, first)
    first.click("#video")
    customer.click("#prompt-accept")
    for page in (customer, first):
        growing(page, "framesDecoded", timeout=25)
    first.click("#leave")
    assert_stays(customer, "#call-status", "Sam left", ms=500)
    decoded = stats(customer)["framesDecoded"]
    second = new_page("agent2", token_url(gateway, "a-two", "agent", room="r-hand", name="Kim"), viewport=VIEWPORT)
    expect(second.locator("#call")).to_be_enabled()
    second.click("#call")
    growing(second, "audioEnergy")
    second.click("#video")
    if customer.locator("#prompt").is_visible():
        customer.click("#prompt-accept")
    growing(second, "framesDecoded", timeout=25)  # the agent sees the customer
    deadline = time.monotonic() + 10
    while stats(customer)["framesDecoded"] < decoded + 30 and time.monotonic() < deadline:
        customer.wait_for_timeout(200)
    assert stats(customer)["framesDecoded"] >= decoded + 30, stats(customer)  # and the customer sees the agent
    expect(customer.locator("#call-status")).to_contain_text("Video call with Kim")


@pytest.fixture(scope="module")
def recording_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway("serve", "--record", str(tmp_path_factory.mktemp("calls")))
    yield gw
    gw.stop()


def test_both_pages_show_that_the_call_is_recorded(recording_gateway: GatewayProcess, new_page: NewPage) -> None:
    gateway = recording_gateway
    agent = new_page("agent", token_url(gateway, "a-rec", "agent", room="r-rec", name="Sam"), viewport=VIEWPORT)
    customer = new_page("customer", token_url(gateway, "u-rec", "customer", room="r-rec", name="Ann"))
    voice_call(customer, agent)
    for page in (customer, agent):
        expect(page.locator("#recording")).to_be_visible()
        expect(page.locator("#recording")).to_have_text("● Recording")
    if folder := os.environ.get("TALKGATE_SCREENSHOTS"):
        customer.screenshot(path=f"{folder}/customer-recording.png")
        agent.screenshot(path=f"{folder}/agent-recording.png")
    customer.click("#hangup")
    agent.click("#hangup")
    for page in (customer, agent):
        expect(page.locator("#recording")).to_be_hidden()
    # A page opened while a call is recorded says so before joining it.
    voice_call(customer, agent)
    late = new_page("late", token_url(gateway, "a-rec2", "agent", room="r-rec", name="Kim"), viewport=VIEWPORT)
    expect(late.locator("#call-notice-text")).to_contain_text("(recorded)")

"""The records in the pages, in real Chromium: spoken turns from a bot as spoken bubbles on
both pages, the agent's customer panel with an earlier conversation opened read-only
(paged with ``history``), and calls as quiet lines in the thread."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from tests.browser.conftest import NewPage, start_gateway
from tests.browser.test_pages import VIEWPORT, send, token_url
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.browser

HEARD = "my router blinks red"
SAID = "Have you tried turning it off and on again?"


def scripted_bot(ws: ServerConnection) -> None:
    """A native-protocol bot that says its lines aloud at once (transcripts: a partial, then
    the customer's words and its own), and hands over when asked for a person."""
    try:
        for data in ws:
            if isinstance(data, bytes):
                continue  # the customer's audio on a call
            message = json.loads(data)
            if message["type"] == "start":
                ws.send(json.dumps({"type": "transcript", "text": "my router", "final": False}))
                ws.send(json.dumps({"type": "transcript", "text": HEARD, "final": True}))
                ws.send(json.dumps({"type": "transcript", "text": SAID, "final": True, "speaker": "bot"}))
            elif message["type"] == "chat" and "person" in message["text"]:
                ws.send(json.dumps({"type": "transfer", "reason": "asked_for_a_person"}))
            elif message["type"] == "stop":
                return
    except ConnectionClosed:
        return


@pytest.fixture(scope="module")
def bot_gateway() -> Iterator[GatewayProcess]:
    server: Server = serve(scripted_bot, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.socket.getsockname()[1]
    gw = start_gateway("serve", "--bot-url", f"ws://127.0.0.1:{port}/bot")
    yield gw
    gw.stop()
    server.shutdown()
    thread.join(5)


def agent_takes(gw: GatewayProcess, new_page: NewPage, agent_id: str, customer_name: str) -> Page:
    agent = new_page("agent", token_url(gw, agent_id, "agent", name="Sam Lee"), viewport=VIEWPORT)
    agent.locator(".queue-item", has_text=customer_name).locator("button.accept").click()
    expect(agent.locator("#customer-name")).to_have_text(customer_name)
    return agent


def earlier_conversation(gw: GatewayProcess, new_page: NewPage, identity: str, name: str, texts: list[str]) -> None:
    """The customer had a conversation before (in a room of its own), and left it."""
    page = new_page(f"{identity}-before", token_url(gw, identity, "customer", room=f"{identity}-before", name=name))
    expect(page.locator("#status")).to_contain_text("available on request")
    page.evaluate("(texts) => texts.forEach((t) => window.talkgate.chat(t))", texts)
    expect(page.locator(".msg.own .msg-bubble")).to_have_count(len(texts))
    page.evaluate("window.talkgate.leave()")
    # Polled with evaluate: wait_for_function polls by eval, which the page's CSP forbids.
    for _ in range(200):
        if page.evaluate("window.talkgate.conversations.size") == 0:
            break
        page.wait_for_timeout(25)
    else:
        raise AssertionError("the customer page did not leave its conversation")
    page.close()


def test_spoken_turns_are_spoken_bubbles_on_both_pages(bot_gateway: GatewayProcess, new_page: NewPage) -> None:
    """Bug: neither page showed what was said aloud, and the agent who took over from the bot
    saw nothing of what the customer had said. Final transcripts are spoken bubbles (the
    partial before them leaves nothing behind), and they are in the agent's history."""
    customer = new_page("customer", token_url(bot_gateway, "u-spoken", "customer", room="r-spoken", name="Ann Smith"))
    spoken = customer.locator(".msg.spoken .msg-bubble")
    expect(spoken).to_have_text([HEARD, SAID])
    expect(customer.locator(".msg.own.spoken .msg-bubble")).to_have_text([HEARD])  # her own words, on her side
    expect(customer.locator(".msg.other.spoken .msg-author")).to_have_text(["Assistant"])
    expect(customer.locator(".msg.spoken .spoken-label").first).to_have_text("spoken")
    expect(customer.locator(".transcript-live")).to_have_count(0)

    send(customer, "a person please")
    expect(customer.locator("#status")).to_have_text("Waiting for an agent")
    expect(customer.locator(".msg.system.notice", has_text="Connecting you with a person")).to_be_visible()

    agent = agent_takes(bot_gateway, new_page, "a-spoken", "Ann Smith")
    thread = agent.locator("#messages .messages:visible")
    expect(thread.locator(".msg.spoken .msg-bubble")).to_have_text([HEARD, SAID])
    expect(thread.locator(".msg.spoken .msg-author")).to_have_text(["Ann Smith", "Assistant"])
    expect(thread.locator(".msg:not(.spoken) .msg-bubble")).to_have_text(["a person please"])
    expect(thread.locator(".msg.system.notice", has_text="Connecting you with a person")).to_be_visible()

    # The customer's page after a reload: the same spoken turns, from the records, once.
    customer.reload()
    expect(customer.locator("#status")).to_have_text("You're chatting with an agent")
    expect(spoken).to_have_text([HEARD, SAID])


def test_the_customer_panel_opens_an_earlier_conversation(gateway: GatewayProcess, new_page: NewPage) -> None:
    """The agent sees who the customer is and their earlier conversation, and reads it as a
    read-only timeline, the newest page first, then the earlier one."""
    texts = [f"earlier message {i}" for i in range(1, 35)]  # with joined and left: 36 events, 2 pages
    earlier_conversation(gateway, new_page, "u-back", "Ann Smith", texts)
    profile = {"email": "ann@example.com", "plan": "Fiber 1000"}
    url = token_url(gateway, "u-back", "customer", room="u-back-now", name="Ann Smith", profile=profile)
    customer = new_page("customer", url, viewport=VIEWPORT)
    send(customer, "It is broken again")
    customer.click("#escalate")
    agent = agent_takes(gateway, new_page, "a-panel", "Ann Smith")

    panel = agent.locator("#customer-panel")
    expect(panel).to_be_visible()
    expect(panel.locator("#panel-name")).to_have_text("Ann Smith")
    expect(panel.locator(".profile dt")).to_have_text(["Email", "Plan"])
    expect(panel.locator(".profile dd")).to_have_text(["ann@example.com", "Fiber 1000"])
    item = panel.locator(".previous-item")
    expect(item).to_have_count(1)
    expect(item.locator(".previous-last")).to_have_text("“earlier message 34”")

    item.click()
    timeline = panel.locator("#timeline")
    expect(timeline).to_be_visible()
    expect(panel.locator("#timeline-subtitle")).to_contain_text("Read-only")
    bubbles = timeline.locator(".msg-bubble")
    expect(bubbles).to_have_count(29)  # the newest 30 events: 29 chats and the leave
    expect(bubbles.last).to_have_text("earlier message 34")
    expect(timeline.locator(".msg.notice").last).to_have_text("Ann Smith left")
    timeline.locator(".load-earlier").click()
    expect(bubbles).to_have_count(34)
    expect(bubbles.first).to_have_text("earlier message 1")
    expect(timeline.locator(".load-earlier")).to_have_count(0)
    expect(timeline.locator(".msg.notice").first).to_have_text("Start of the conversation")
    expect(panel.locator("input, textarea, form")).to_have_count(0)  # read-only

    # The live conversation goes on beside it.
    send(agent, "I see you wrote to us before.")
    expect(customer.locator(".msg.role-agent .msg-bubble")).to_have_text(["I see you wrote to us before."])
    agent.click("#timeline-back")
    expect(panel.locator("#panel-card")).to_be_visible()


def test_a_call_starts_and_ends_as_quiet_lines(gateway: GatewayProcess, new_page: NewPage) -> None:
    agent = new_page("agent", token_url(gateway, "a-lines", "agent", room="r-lines", name="Sam Lee"))
    customer = new_page("customer", token_url(gateway, "u-lines", "customer", room="r-lines", name="Ann Smith"))
    expect(customer.locator("#escalate")).to_have_text("An agent is here")
    lines = {page: page.locator(".msg.system.notice") for page in (customer, agent)}
    customer.click("#call")
    expect(lines[customer].filter(has_text="call")).to_have_text(["You started a call"])
    agent.click("#prompt-accept")
    expect(customer.locator("#call-status")).to_contain_text("On a call with Sam Lee")
    expect(lines[customer].filter(has_text="call")).to_have_text(["You started a call", "Sam Lee joined the call"])
    expect(lines[agent].filter(has_text="call")).to_have_text(["Ann Smith started a call", "You joined the call"])
    agent.click("#hangup")
    expect(lines[customer].last).to_have_text("Sam Lee hung up")
    customer.click("#hangup")
    for page in (customer, agent):
        expect(lines[page].filter(has_text="Call ended")).to_have_text([re.compile(r"^Call ended · \d+:\d\d$")])
        assert all(page.locator(".msg.system.notice").evaluate_all(QUIET))


#: Whether each quiet line is small, grey and centered (its text between two rules).
QUIET = """(nodes) => nodes.map((n) => {
  const style = getComputedStyle(n);
  const box = n.getBoundingClientRect(), text = n.firstElementChild.getBoundingClientRect();
  return parseFloat(style.fontSize) <= 12 && style.color === "rgb(156, 163, 175)"
    && Math.abs((box.left + box.right) / 2 - (text.left + text.right) / 2) < 2;
})"""

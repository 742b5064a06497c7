"""An agent holding several conversations at once (--agent-capacity 2) in real Chromium."""

from __future__ import annotations

import os
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import NewPage
from tests.browser.test_calls import growing, stats
from tests.browser.test_pages import VIEWPORT, send, token_url
from tests.browser.test_records import earlier_conversation
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.browser

#: What the app says about Cid in his token (the customer panel shows it).
CID_PROFILE = {"email": "cid.moreau@example.fr", "plan": "Fiber 1000", "customer_since": "2021"}

#: The agent's log of one conversation, and the one on screen.
THREAD = '#messages .messages[data-conversation="{}"]'
SHOWN = "#messages .messages:visible"


def item(room: str) -> str:
    """The agent's list entry for a conversation."""
    return f'.mine-item[data-conversation="{room}"]'


def waiting_customer(
    gw: GatewayProcess, new_page: NewPage, who: str, name: str, first: str, profile: dict[str, Any] | None = None
) -> Page:
    url = token_url(gw, f"u-{who}", "customer", room=f"r-{who}", name=name, profile=profile)
    page = new_page(who, url, viewport=VIEWPORT)
    expect(page.locator("#status")).to_have_text("Agents available on request")
    send(page, first)
    page.click("#escalate")
    expect(page.locator("#escalate")).to_have_text("Waiting for an agent…")
    return page


def desk(gw: GatewayProcess, new_page: NewPage, agent_id: str, ann: str, cid: str) -> tuple[Page, Page, Page]:
    """The agent accepts Ann's conversation, then Cid's while still in Ann's."""
    agent = new_page("agent", token_url(gw, agent_id, "agent", name="Sam Lee"), viewport=VIEWPORT)
    expect(agent.locator("#status")).to_have_text("Available")
    ann_page = waiting_customer(gw, new_page, ann, "Ann Smith", "My router blinks red")
    cid_page = waiting_customer(gw, new_page, cid, "Cid Moreau", "I was billed twice", CID_PROFILE)

    agent.locator(".queue-item", has_text="Ann Smith").locator("button.accept").click()
    expect(agent.locator("#customer-name")).to_have_text("Ann Smith")
    expect(agent.locator("#status")).to_have_text("In a conversation")
    # The gateway says its capacity (2) in joined: the desk lists what it holds from the first.
    expect(agent.locator("#mine .mine-item strong")).to_have_text(["Ann Smith"])

    agent.locator(".queue-item", has_text="Cid Moreau").locator("button.accept").click()
    expect(agent.locator("#customer-name")).to_have_text("Cid Moreau")  # the one just accepted is shown
    expect(agent.locator("#status")).to_have_text("In 2 conversations")
    expect(agent.locator("#mine .mine-item strong")).to_have_text(["Ann Smith", "Cid Moreau"])
    expect(agent.locator(item(f"r-{cid}"))).to_have_attribute("aria-current", "true")
    expect(agent.locator(f"{SHOWN} .msg.other .msg-bubble")).to_have_text(["I was billed twice"])
    expect(agent.locator("#queue-empty")).to_be_visible()
    for page in (ann_page, cid_page):
        expect(page.locator("#escalate")).to_have_text("An agent is here")
    return agent, ann_page, cid_page


def test_an_agent_chats_and_calls_in_two_conversations(desk_gateway: GatewayProcess, new_page: NewPage) -> None:
    earlier_conversation(desk_gateway, new_page, "u-cid", "Cid Moreau", ["My invoice shows an old address"])
    agent, ann, cid = desk(desk_gateway, new_page, "a-desk", "ann", "cid")

    # Chat goes to the conversation on screen, and only its customer sees it.
    send(agent, "Hi Cid, let me look at your bill.")
    expect(cid.locator(".msg.role-agent .msg-bubble")).to_have_text(["Hi Cid, let me look at your bill."])

    # A message in the other conversation marks it unread; it does not show in this one.
    send(ann, "Are you still there?")
    expect(agent.locator(f"{item('r-ann')} .unread-count")).to_have_text("1")
    expect(agent.locator(f"{item('r-ann')} .preview")).to_have_text("Are you still there?")
    expect(agent.locator(f"{SHOWN} .msg.other .msg-bubble")).to_have_text(["I was billed twice"])
    expect(agent).to_have_title("(1 unread) Agent console · talkgate")

    # Switching shows the other conversation, read.
    agent.click(item("r-ann"))
    expect(agent.locator("#customer-name")).to_have_text("Ann Smith")
    expect(agent.locator(f"{SHOWN} .msg.other .msg-bubble")).to_have_text(
        ["My router blinks red", "Are you still there?"]
    )
    expect(agent.locator(f"{item('r-ann')} .unread-count")).to_have_count(0)
    expect(agent.locator("#chat-input")).to_have_attribute("placeholder", "Reply to Ann Smith…")
    send(agent, "Yes Ann, I'm here.")
    expect(ann.locator(".msg.role-agent .msg-bubble")).to_have_text(["Yes Ann, I'm here."])
    expect(cid.locator(".msg.role-agent .msg-bubble")).to_have_text(["Hi Cid, let me look at your bill."])

    # A voice call with Ann.
    ann.click("#call")
    expect(agent.locator("#prompt-text")).to_have_text("Ann Smith would like to start a voice call.")
    agent.click("#prompt-accept")
    growing(agent, "audioEnergy", conversation="r-ann")
    growing(ann, "audioEnergy")
    expect(agent.locator("#call-status")).to_contain_text("On a call with Ann Smith · ")

    # Cid's chat goes on while the call with Ann does.
    agent.click(item("r-cid"))
    expect(agent.locator("#customer-name")).to_have_text("Cid Moreau")
    expect(agent.locator("#call-bar")).to_be_hidden()  # no call in this conversation
    expect(agent.locator("#call")).to_be_enabled()
    expect(agent.locator(f"{item('r-ann')} .flag.call")).to_be_visible()
    expect(agent.locator("#chat-input")).to_have_value("")
    send(agent, "Your refund is on its way.")
    send(cid, "Thanks a lot!")
    expect(agent.locator(f"{SHOWN} .msg.other .msg-bubble")).to_have_text(["I was billed twice", "Thanks a lot!"])
    expect(cid.locator(".msg.role-agent .msg-bubble")).to_have_text(
        ["Hi Cid, let me look at your bill.", "Your refund is on its way."]
    )
    expect(ann.locator(".msg.role-agent .msg-bubble")).to_have_text(["Yes Ann, I'm here."])
    growing(agent, "audioEnergy", conversation="r-ann")  # Ann is still heard
    growing(ann, "audioEnergy")  # and still hears the agent
    assert stats(agent)["audioPackets"] == 0  # the shown conversation has no call
    expect(ann.locator("#call-status")).to_contain_text("On a call with Sam Lee · ")
    send(ann, "I can hear you fine")
    expect(agent.locator(f"{item('r-ann')} .unread-count")).to_have_text("1")
    agent.fill("#chat-input", "Let me check the refund date")  # a draft stays with its conversation
    # The customer panel shows the customer on screen: who they are, what they wrote before.
    expect(agent.locator("#panel-name")).to_have_text("Cid Moreau")
    expect(agent.locator("#customer-panel .profile dd")).to_have_text(list(CID_PROFILE.values()))
    expect(agent.locator("#customer-panel .previous-last")).to_have_text(["“My invoice shows an old address”"])
    if folder := os.environ.get("TALKGATE_SCREENSHOTS"):  # how docs/img is made
        agent.screenshot(path=f"{folder}/agent-desk.png")

    agent.click(item("r-ann"))
    expect(agent.locator("#chat-input")).to_have_value("")
    expect(agent.locator("#call-status")).to_contain_text("On a call with Ann Smith · ")
    agent.click("#hangup")
    expect(agent.locator("#call-bar")).to_be_hidden()
    expect(ann.locator("#call-status")).to_have_text("Sam Lee hung up")

    # Closing one conversation leaves the other on screen; one left looks as it always did.
    agent.click("#leave")
    expect(agent.locator("#customer-name")).to_have_text("Cid Moreau")
    expect(agent.locator("#status")).to_have_text("In a conversation")
    expect(agent.locator("#chat-input")).to_have_value("Let me check the refund date")
    expect(ann.locator(".msg.system", has_text="Sam Lee left")).to_be_visible()
    send(cid, "Bye")
    expect(agent.locator(f"{SHOWN} .msg.other .msg-bubble")).to_have_text(
        ["I was billed twice", "Thanks a lot!", "Bye"]
    )


def test_the_console_opened_again_takes_over_both_conversations(
    desk_gateway: GatewayProcess, new_page: NewPage
) -> None:
    """A second console with the same identity (another tab, or a reload whose old websocket
    is still open) gets both conversations with their history; the customers see nothing."""
    agent, ann, cid = desk(desk_gateway, new_page, "a-desk2", "ann2", "cid2")
    send(agent, "Before the takeover")
    again = new_page("again", agent.url, viewport=VIEWPORT)

    expect(again.locator("#status")).to_have_text("In 2 conversations")
    expect(again.locator("#mine .mine-item strong")).to_have_text(["Ann Smith", "Cid Moreau"])
    expect(again.locator(f"{THREAD.format('r-ann2')} .msg-bubble")).to_have_text(["My router blinks red"])
    expect(again.locator(f"{THREAD.format('r-cid2')} .msg-bubble")).to_have_text(
        ["I was billed twice", "Before the takeover"]
    )
    expect(agent.locator("#banner")).to_have_text("The console was opened in another tab; this one is offline.")

    expect(again.locator("#customer-name")).to_have_text("Ann Smith")  # the first one, in a fresh tab
    send(cid, "Hello again")
    expect(again.locator(f"{item('r-cid2')} .unread-count")).to_have_text("1")
    send(again, "Still with you, Ann")
    expect(ann.locator(".msg.role-agent .msg-bubble")).to_have_text(["Still with you, Ann"])
    again.click(item("r-cid2"))
    expect(again.locator(f"{SHOWN} .msg.other .msg-bubble")).to_have_text(["I was billed twice", "Hello again"])
    send(again, "And with you, Cid")
    expect(cid.locator(".msg.role-agent .msg-bubble")).to_have_text(["Before the takeover", "And with you, Cid"])
    for page in (ann, cid):  # the customers never saw the agent go
        expect(page.locator(".msg.system", has_text="left")).to_have_count(0)
        expect(page.locator("#escalate")).to_have_text("An agent is here")


def test_a_reload_of_the_console_takes_over_both_conversations(desk_gateway: GatewayProcess, new_page: NewPage) -> None:
    """A reload brings both conversations back, the one on screen still on screen: the old
    websocket closes (1001) before the new page joins, and the gateway keeps the agent's
    place for --reconnect-grace-seconds (default 5). The selection comes from sessionStorage."""
    agent, ann, cid = desk(desk_gateway, new_page, "a-desk3", "ann3", "cid3")
    agent.click(item("r-ann3"))
    send(agent, "Before the reload")
    agent.reload()

    expect(agent.locator("#status")).to_have_text("In 2 conversations", timeout=3000)
    expect(agent.locator("#customer-name")).to_have_text("Ann Smith")  # the one that was on screen
    expect(agent.locator(f"{SHOWN} .msg-bubble")).to_have_text(["My router blinks red", "Before the reload"])
    for page in (ann, cid):
        expect(page.locator(".msg.system", has_text="left")).to_have_count(0)


def test_with_capacity_one_a_second_accept_is_refused_clearly(gateway: GatewayProcess, new_page: NewPage) -> None:
    """On a gateway with the default --agent-capacity 1 the console keeps one conversation on
    screen and no list; a second customer can be taken only after closing the first."""
    agent, ann = (
        new_page("agent", token_url(gateway, "a-cap1", "agent", name="Sam Lee"), viewport=VIEWPORT),
        waiting_customer(gateway, new_page, "cap1a", "Ann Smith", "hello"),
    )
    waiting_customer(gateway, new_page, "cap1b", "Cid Moreau", "hi")
    agent.locator(".queue-item", has_text="Ann Smith").locator("button.accept").click()
    expect(agent.locator("#customer-name")).to_have_text("Ann Smith")
    second = agent.locator(".queue-item", has_text="Cid Moreau").locator("button.accept")
    if second.is_enabled():  # a gateway that does not say its capacity: the refusal teaches it
        second.click()
        expect(agent.locator("#banner")).to_have_text("Close your current conversation before accepting another.")
    expect(second).to_be_disabled()
    expect(second).to_have_attribute("title", "Close your current conversation first")
    expect(agent.locator("#mine")).to_be_hidden()
    expect(agent.locator("#customer-name")).to_have_text("Ann Smith")
    agent.click("#leave")
    expect(ann.locator(".msg.system", has_text="Sam Lee left")).to_be_visible()
    second.click()
    expect(agent.locator("#customer-name")).to_have_text("Cid Moreau")

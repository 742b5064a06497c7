"""The customer page and the agent console in real headless Chromium."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from gateway import tokens
from tests.browser.conftest import SECRET, NewPage
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.browser
VIEWPORT = {"width": 1100, "height": 680}


def token_url(
    gw: GatewayProcess,
    identity: str,
    role: str,
    room: str | None = None,
    name: str | None = None,
    profile: dict[str, Any] | None = None,
) -> str:
    token = tokens.issue(SECRET, identity=identity, role=role, room=room, name=name, profile=profile)
    return f"{gw.url}{'/agent' if role == 'agent' else '/'}?token={token}"


def send(page: Page, text: str) -> None:
    page.fill("#chat-input", text)
    page.click("#send")


def test_customer_escalates_and_agent_takes_over(gateway: GatewayProcess, new_page: NewPage) -> None:
    agent = new_page("agent", token_url(gateway, "a1", "agent", name="Sam Lee"), viewport=VIEWPORT)
    expect(agent.locator("#status")).to_have_text("Available")
    expect(agent.locator("#queue-empty")).to_be_visible()

    customer = new_page(
        "customer", token_url(gateway, "u1", "customer", room="r-browser", name="Ann Smith"), viewport=VIEWPORT
    )
    expect(customer.locator("#status")).to_have_text("Agents available on request")
    send(customer, "My internet keeps dropping")
    expect(customer.locator(".msg.own .msg-bubble")).to_have_text(["My internet keeps dropping"])
    expect(customer.locator("#chat-input")).to_have_value("")

    customer.click("#escalate")
    expect(customer.locator("#escalate")).to_have_text("Waiting for an agent…")
    expect(customer.locator("#escalate")).to_be_disabled()

    item = agent.locator(".queue-item", has_text="Ann Smith")
    expect(item).to_be_visible()
    expect(item).to_contain_text("customer request")
    expect(agent.locator("#queue-count")).to_have_text("1")
    item.locator("button.accept").click()

    # The agent sees the history, including what the customer typed before escalating.
    expect(agent.locator("#customer-name")).to_have_text("Ann Smith")
    expect(agent.locator("#status")).to_have_text("In a conversation")
    expect(agent.locator("#messages .msg.other .msg-bubble").first).to_have_text("My internet keeps dropping")
    expect(agent.locator("#queue-count")).to_have_text("0")
    expect(customer.locator("#escalate")).to_have_text("An agent is here")
    expect(customer.locator(".msg.system", has_text="Sam Lee joined")).to_be_visible()

    send(agent, "Hi Ann, I'm Sam. Let's look at your router.")
    expect(customer.locator(".msg.other.role-agent .msg-bubble")).to_have_text(
        ["Hi Ann, I'm Sam. Let's look at your router."]
    )
    expect(customer.locator(".msg.other .msg-author")).to_have_text(["Sam Lee"])
    send(customer, "Thank you!")
    expect(agent.locator(".msg.other .msg-bubble")).to_have_text(["My internet keeps dropping", "Thank you!"])
    if folder := os.environ.get("TALKGATE_SCREENSHOTS"):  # how docs/img is made
        customer.screenshot(path=f"{folder}/customer.png")
        agent.screenshot(path=f"{folder}/agent.png")

    agent.click("#leave")
    expect(agent.locator("#no-conversation")).to_be_visible()
    expect(agent.locator("#status")).to_have_text("Available")
    expect(customer.locator(".msg.system", has_text="Sam Lee left")).to_be_visible()
    expect(customer.locator("#escalate")).to_be_enabled()


def test_chat_text_is_shown_as_text_not_html(gateway: GatewayProcess, new_page: NewPage) -> None:
    customer = new_page("customer", token_url(gateway, "u2", "customer", room="r-xss"))
    expect(customer.locator("#status")).to_have_text("Agents available on request")
    send(customer, "<img src=x onerror=alert(1)> <b>bold</b>")
    expect(customer.locator(".msg.own .msg-bubble")).to_have_text("<img src=x onerror=alert(1)> <b>bold</b>")
    assert customer.locator(".msg-bubble img, .msg-bubble b").count() == 0


def test_bad_token_shows_a_clear_message(gateway: GatewayProcess, new_page: NewPage) -> None:
    customer = new_page("customer", f"{gateway.url}/?token=expired-or-forged")
    expect(customer.locator("#banner")).to_contain_text("invalid or has expired")
    expect(customer.locator("#status")).to_have_text(re.compile("Not connected|Disconnected"))
    expect(customer.locator("#chat-input")).to_be_disabled()


def test_reload_resumes_the_conversation(gateway: GatewayProcess, new_page: NewPage) -> None:
    agent = new_page("agent", token_url(gateway, "a3", "agent", room="r-reload", name="Kim"))
    customer = new_page("customer", token_url(gateway, "u3", "customer", room="r-reload"))
    expect(customer.locator("#status")).to_have_text("You're chatting with an agent")
    send(customer, "before the reload")
    expect(agent.locator(".msg.other .msg-bubble")).to_have_text(["before the reload"])
    customer.reload()
    expect(customer.locator(".msg.own .msg-bubble")).to_have_text(["before the reload"])
    send(customer, "after the reload")
    expect(agent.locator(".msg.other .msg-bubble")).to_have_text(["before the reload", "after the reload"])


def test_demo_mode_needs_no_tokens(dev_gateway: GatewayProcess, new_page: NewPage) -> None:
    agent = new_page("agent", f"{dev_gateway.url}/agent")
    agent.fill("#agent-name", "Dee Demo")
    agent.click("#signin-form button")
    expect(agent.locator("#me-name")).to_have_text("Dee Demo")

    customer = new_page("customer", dev_gateway.url + "/", viewport={"width": 390, "height": 844})
    expect(customer.locator("#status")).to_have_text("Echo bot is answering")
    expect(customer.locator("#intro")).to_have_text(
        "Hi! Echo bot answers right away. Press Talk to a human to reach a person."
    )
    box = customer.locator("#widget").bounding_box()
    assert box is not None and box["width"] == 390  # the widget fills a phone screen
    send(customer, "Is anybody there?")
    # The demo's bot answers first.
    expect(customer.locator(".msg.role-bot .msg-bubble")).to_have_text(["You said: Is anybody there?"])
    customer.click("#escalate")
    agent.locator(".queue-item button.accept").click()
    expect(agent.locator("#messages .msg.role-customer .msg-bubble")).to_have_text(["Is anybody there?"])
    expect(agent.locator("#messages .msg.role-bot .msg-bubble")).to_have_text(["You said: Is anybody there?"])
    send(agent, "Yes, Dee here.")
    expect(customer.locator(".msg.role-agent .msg-bubble")).to_have_text(["Yes, Dee here."])


def test_without_a_bot_the_widget_says_how_to_reach_a_person(gateway: GatewayProcess, new_page: NewPage) -> None:
    """Bug: on a gateway without a bot the widget said "Online" and "Ask us anything about your
    service", though nobody answers until the customer presses "Talk to a human"."""
    customer = new_page("customer", token_url(gateway, "u-nobot", "customer", room="r-nobot"))
    expect(customer.locator("#status")).to_have_text("Agents available on request")
    expect(customer.locator("#intro")).to_have_text("Hi! Press Talk to a human and an agent will join this chat.")
    customer.click("#escalate")
    expect(customer.locator("#status")).to_have_text("Waiting for an agent")


def test_agent_console_without_a_token_asks_for_a_sign_in_link(gateway: GatewayProcess, new_page: NewPage) -> None:
    """Bug: on a production gateway (no --dev) the agent console opened without a token showed the
    development name form, and after a name was picked claimed that the sign-in link had expired."""
    agent = new_page("agent", f"{gateway.url}/agent")
    expect(agent.locator("#need-link")).to_be_visible()
    expect(agent.locator("#need-link")).to_contain_text("needs a sign-in link from your app")
    expect(agent.locator("#signin")).to_be_hidden()
    expect(agent.locator("#console")).to_be_hidden()
    expect(agent.locator("#banner")).to_be_hidden()

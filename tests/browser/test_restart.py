"""Restarts in real Chromium: the gateway restarting under a live page, and the browser
restarting while the gateway lives."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from gateway import tokens
from tests.browser.conftest import SECRET, NewPage
from tests.gateway_process import RTC_LOOPBACK_ARGS, GatewayProcess

pytestmark = pytest.mark.browser


def serve(port: int | str = 0) -> GatewayProcess:
    return GatewayProcess(
        "serve", "--port", str(port), "--drain-seconds", "1", *RTC_LOOPBACK_ARGS, env={"TALKGATE_SECRET": SECRET}
    )


def page_url(gw: GatewayProcess, identity: str, role: str, room: str | None) -> str:
    token = tokens.issue(SECRET, identity=identity, role=role, room=room)
    return f"{gw.url}{'/agent' if role == 'agent' else '/'}?token={token}"


def test_the_page_reconnects_by_itself_when_the_gateway_restarts(new_page: NewPage) -> None:
    first = serve()
    port = urlsplit(first.url).port
    assert port is not None
    second: GatewayProcess | None = None
    try:
        customer = new_page("customer", page_url(first, "u-restart", "customer", "r-restart"))
        expect(customer.locator("#status")).to_have_text("Agents available on request")
        customer.fill("#chat-input", "before the restart")
        customer.click("#send")
        expect(customer.locator(".msg.own .msg-bubble")).to_have_text(["before the restart"])

        log = first.stop()  # SIGTERM: shutdown{retry_after_ms} to the page, drain, exit 0
        assert "draining: 1 conversations" in log
        expect(customer.locator("#status")).to_contain_text("Reconnecting")
        second = serve(port)  # the same address, a new process
        expect(customer.locator("#status")).to_have_text("Agents available on request", timeout=20_000)
        expect(customer.locator("#chat-input")).to_be_enabled()

        # The page is back in its conversation on the new process: an agent sees it there.
        customer.fill("#chat-input", "after the restart")
        customer.click("#send")
        agent = new_page("agent", page_url(second, "a-restart", "agent", "r-restart"))
        expect(agent.locator("#customer-name")).to_have_text("u-restart")
        # The old process's memory went with it; what was said since is all there.
        expect(agent.locator("#messages .msg.other .msg-bubble")).to_have_text(["after the restart"])
    finally:
        if second is not None:
            second.stop()
        if first.proc.poll() is None:
            first.stop()


def test_a_restarted_browser_finds_its_chat_again(new_page: NewPage) -> None:
    gw = serve()
    try:
        url = page_url(gw, "u-browser", "customer", "r-browser")
        before = new_page("before", url)
        expect(before.locator("#status")).to_have_text("Agents available on request")
        before.fill("#chat-input", "my order number is 1234")
        before.click("#send")
        expect(before.locator(".msg.own .msg-bubble")).to_have_text(["my order number is 1234"])
        before.context.close()  # the browser is gone: the conversation empties

        after = new_page("after", url)  # a fresh browser context: no state of its own
        expect(after.locator("#status")).to_have_text("Agents available on request")
        expect(after.locator(".msg.own .msg-bubble")).to_have_text(["my order number is 1234"])
    finally:
        gw.stop()

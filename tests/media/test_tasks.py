"""Task ownership: named tasks, failures logged and counted, bounded close."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from media.tasks import FailureLog, TaskOwner, cancel_and_wait, wait_closed


class Count:
    """A ``Tally`` as the gateway's Prometheus counters are one."""

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


async def fail(message: str) -> None:
    await asyncio.sleep(0)
    raise RuntimeError(message)


async def stubborn(release: asyncio.Event) -> None:
    """Ignores cancellation until released (a task stuck in cleanup)."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue


async def test_a_failed_task_is_logged_with_its_name_and_traceback_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bug: task failures vanished (``gather(..., return_exceptions=True)``, or never awaited)."""
    count = Count()
    owner = TaskOwner("bot r1", logging.getLogger("test.tasks"), failures=count)
    task = owner.spawn(fail("boom"), "talkgate-bot-r1")
    assert task.get_name() == "talkgate-bot-r1" and len(owner) == 1
    with caplog.at_level(logging.ERROR):
        await asyncio.wait({task})
        await asyncio.sleep(0)  # done callbacks run
    assert len(owner) == 0  # finished tasks drop out
    assert owner.failed == 1 and count.value == 1
    [record] = [r for r in caplog.records if r.name == "test.tasks"]
    assert "talkgate-bot-r1" in record.getMessage() and "boom" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is task.exception()


async def test_returned_and_cancelled_tasks_are_not_failures(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("broker")
    done = owner.spawn(asyncio.sleep(0), "quick")
    sleeping = owner.spawn(asyncio.sleep(10), "sleeping")
    await done
    with caplog.at_level(logging.WARNING):
        assert await owner.close(1.0) == set()
    assert sleeping.cancelled() and owner.failed == 0 and len(owner) == 0
    assert not caplog.records


async def test_close_cancels_everything_and_logs_what_does_not_finish_in_time(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("broker")
    release = asyncio.Event()
    stuck = owner.spawn(stubborn(release), "stuck")
    owner.spawn(asyncio.sleep(10), "sleeping")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING):
        unfinished = await owner.close(0.05)
    assert unfinished == {stuck}
    assert any("stuck" in r.getMessage() and "did not finish" in r.getMessage() for r in caplog.records)
    assert owner.tasks == {stuck}  # still tracked: it has not ended
    release.set()
    await stuck
    assert len(owner) == 0


async def test_a_closed_owner_starts_nothing() -> None:
    owner = TaskOwner("broker")
    assert await owner.close() == set()
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        owner.spawn(coro, "late")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # not left to warn "never awaited"
    assert await owner.close() == set()  # idempotent


async def test_closing_from_one_of_its_own_tasks_does_not_wait_for_itself() -> None:
    owner = TaskOwner("bot r1")
    other = owner.spawn(asyncio.sleep(10), "other")

    async def stop_myself() -> str:
        await owner.close(1.0)
        return "returned"

    me = owner.spawn(stop_myself(), "me")
    assert await asyncio.wait_for(me, 2) == "returned"
    assert other.cancelled()


async def test_cancel_and_wait_logs_failures_other_than_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    """Bug: ``task.cancel(); gather(task, return_exceptions=True)`` dropped a cleanup's exception."""

    async def fails_in_cleanup() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            raise ValueError("cleanup failed")

    count = Count()
    failing = asyncio.create_task(fails_in_cleanup(), name="writer")
    quiet = asyncio.create_task(asyncio.sleep(10), name="quiet")
    already = asyncio.create_task(fail("before"), name="already")
    await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR):
        assert await cancel_and_wait([failing, quiet, already, None], None, "bot r1", failures=count) == set()
    messages = [r.getMessage() for r in caplog.records]
    assert any("writer" in m and "cleanup failed" in m for m in messages)
    assert any("already" in m and "before" in m for m in messages)
    assert not any("quiet" in m for m in messages)
    assert count.value == 2


async def test_cancel_and_wait_returns_what_did_not_finish() -> None:
    release = asyncio.Event()
    stuck = asyncio.create_task(stubborn(release))
    await asyncio.sleep(0)
    assert await cancel_and_wait([stuck], timeout=0.05) == {stuck}
    release.set()
    await stuck


async def test_wait_closed_runs_every_close_and_reports_each_failure(caplog: pytest.LogCaptureFixture) -> None:
    """One failing close must neither hide the others' failures nor stop them."""
    closed: list[int] = []

    async def close(i: int) -> None:
        await asyncio.sleep(0)
        if i % 2:
            raise OSError(f"close {i} failed")
        closed.append(i)

    count = Count()
    with caplog.at_level(logging.ERROR):
        failed = await wait_closed([close(i) for i in range(4)], None, "relay close", failures=count)
    assert failed == 2 and count.value == 2 and sorted(closed) == [0, 2]
    assert sum("relay close failed" in r.getMessage() for r in caplog.records) == 2
    assert await wait_closed([]) == 0


async def test_wait_closed_cancels_a_close_that_hangs() -> None:
    hang = asyncio.create_task(asyncio.sleep(10))
    assert await wait_closed([hang], timeout=0.05) == 1
    await asyncio.sleep(0)
    assert hang.cancelled()


def test_a_repeating_failure_is_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    count = Count()
    failures = FailureLog("relay subscriber", failures=count, interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR):
        for i in range(500):  # 10 s of 20 ms frames
            now[0] = i * 0.02
            failures.failure(RuntimeError(f"frame {i}"))
        now[0] = 10.0
        failures.failure(RuntimeError("again"))
    assert failures.failed == 501 and count.value == 501
    assert len(caplog.records) == 2
    assert caplog.records[0].exc_info is not None
    assert "499 more" in caplog.records[1].getMessage()

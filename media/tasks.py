"""Tasks with an owner, and failures that never vanish.

Every task the gateway starts belongs to something that ends it (STYLE.md: nothing
outlives its owner), and every exception a task ends with is logged with the task's
name and traceback and counted, instead of being dropped by
``gather(..., return_exceptions=True)`` or left for the garbage collector to mention.
Modelled on pipecat's ``TaskManager`` (``utils/asyncio/task_manager.py``).

- ``TaskOwner``: ``spawn(coro, name)`` starts a named task and keeps it in a set
  (finished ones drop out); a task's failure is logged and counted the moment it
  ends; ``close(timeout)`` cancels what is left and waits for it, logging the tasks
  that did not finish in time.
- ``cancel_and_wait(tasks, logger, what)``: the same ending for tasks held elsewhere
  (one attribute): cancel, wait with a timeout, log and count every failure.
- ``wait_closed(closings, logger, what)``: run several close coroutines at once
  (``[relay.close() for relay in relays]``), log every one that failed, bounded in time.
- ``FailureLog``: for a failure that can repeat on every 20 ms frame (a relay
  subscriber, a playback step): the first is logged with its traceback, then at most
  one line per interval saying how many more there were.

Counting goes through ``Tally`` (anything with ``inc()``, such as a
``prometheus_client`` counter or a labelled child of one): this module is the lowest
layer and knows nothing of the gateway's metrics.

The ``timeout`` parameters are grace periods after a cancel, not deadlines for the
caller (what ruff's ASYNC109 would have ``asyncio.timeout`` for): a task that does not
end in time is logged and left, the caller goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol, TypeAlias, TypeVar

T = TypeVar("T")

Logger: TypeAlias = "logging.Logger | logging.LoggerAdapter[Any]"

log = logging.getLogger("talkgate.media.tasks")

#: How long ``close`` and ``cancel_and_wait`` wait for cancelled tasks by default.
CLOSE_TIMEOUT = 5.0


class Tally(Protocol):
    """Something that counts: a ``prometheus_client.Counter`` (or a child of one) fits."""

    def inc(self, amount: float = 1) -> None: ...


class Timer(Protocol):
    """Where timings go (a ``prometheus_client.Histogram`` fits)."""

    def observe(self, seconds: float) -> None: ...


def report_failure(task: asyncio.Task[Any], logger: Logger | None = None, *, failures: Tally | None = None) -> bool:
    """Log (with traceback) and count a *finished* task's exception; True if it had one.

    A task that returned or was cancelled is not a failure. Retrieving the exception
    here also keeps asyncio from warning later that it was never retrieved.
    """
    if not task.done() or task.cancelled():
        return False
    exc = task.exception()
    if exc is None:
        return False
    (logger or log).error("task %s failed: %r", task.get_name(), exc, exc_info=exc)
    if failures is not None:
        failures.inc()
    return True


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any] | None],
    logger: Logger | None = None,
    what: str = "",
    *,
    timeout: float = CLOSE_TIMEOUT,  # noqa: ASYNC109  (a grace period after cancelling, not a deadline)
    failures: Tally | None = None,
) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` (None entries skipped) and wait up to ``timeout`` s for them to end.

    What replaces ``task.cancel(); await asyncio.gather(task, return_exceptions=True)``.
    Each task that ended with an exception other than ``CancelledError`` (before or
    after the cancel) is logged with its traceback and counted in ``failures``; the
    ones still running after ``timeout`` are logged (with ``what``) and returned
    (empty: all ended). The calling task itself, if listed, is neither cancelled nor
    waited for. If the caller is cancelled while waiting, its ``CancelledError``
    propagates (the tasks keep their cancel requests).
    """
    current = asyncio.current_task()
    pending = {task for task in tasks if task is not None and task is not current}
    if not pending:
        return set()
    for task in pending:
        task.cancel()
    done, unfinished = await asyncio.wait(pending, timeout=timeout)
    for task in done:
        report_failure(task, logger, failures=failures)
    for task in unfinished:
        (logger or log).warning(
            "task %s%s did not finish within %g s of being cancelled",
            task.get_name(),
            f" ({what})" if what else "",
            timeout,
        )
    return unfinished


async def wait_closed(
    closings: Iterable[Awaitable[Any]],
    logger: Logger | None = None,
    what: str = "close",
    *,
    timeout: float = CLOSE_TIMEOUT,  # noqa: ASYNC109  (closings still running then are cancelled)
    failures: Tally | None = None,
) -> int:
    """Await ``closings`` concurrently; log (and count) each that raised; return how many failed.

    What replaces ``await asyncio.gather(*closings)`` (one failure hid the others and
    cut the caller's cleanup short) and ``gather(..., return_exceptions=True)`` (every
    failure vanished). Closings still running after ``timeout`` s are cancelled,
    logged and counted as failed.
    """
    tasks = [asyncio.ensure_future(closing) for closing in closings]
    if not tasks:
        return 0
    try:
        _, unfinished = await asyncio.wait(tasks, timeout=timeout)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        raise
    failed = 0
    for task in tasks:
        if task in unfinished:
            task.cancel()
            (logger or log).warning("%s did not finish within %g s; cancelled", what, timeout)
        elif task.cancelled() or (exc := task.exception()) is None:
            continue
        else:
            (logger or log).error("%s failed: %r", what, exc, exc_info=exc)
        failed += 1
        if failures is not None:
            failures.inc()
    return failed


class TaskOwner:
    """Starts, tracks and ends one owner's tasks (the broker, a call, a bot link).

    ``spawn(coro, name)`` starts a named task; finished tasks drop out of the set. A
    task's failure is logged (name and traceback) and counted the moment it ends, not
    when the owner closes: ``failed`` counts them, and ``failures`` (if given, e.g.
    ``metrics.task_failures_by_owner["bot"]``) too. ``close(timeout)`` cancels the rest.
    """

    def __init__(self, name: str, logger: Logger | None = None, *, failures: Tally | None = None) -> None:
        #: For logs: whose tasks these are ("broker", "bot r1").
        self.name = name
        self._log: Logger = logger or log
        self._failures = failures
        #: Live tasks; a finished task drops out (its done callback removes it).
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Tasks that ended with an exception other than CancelledError.
        self.failed = 0
        #: Set by ``close()``: no new tasks from then on.
        self.closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start ``coro`` as a task named ``name``, owned (and ended) by this owner.

        Raises ``RuntimeError`` once the owner is closed (the coroutine is closed unrun).
        """
        if self.closed:
            coro.close()  # never started: no "coroutine was never awaited" warning
            raise RuntimeError(f"{self.name} is closed: cannot start {name}")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        """The tasks still running."""
        return frozenset(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if report_failure(task, self._log, failures=self._failures):
            self.failed += 1

    async def cancel(self, task: asyncio.Task[Any], timeout: float = CLOSE_TIMEOUT) -> bool:  # noqa: ASYNC109
        """Cancel one owned task and wait up to ``timeout`` s; False if it did not end.

        Its failure, if any, is logged by the owner as it ends (once).
        """
        task.cancel()
        if task is asyncio.current_task():
            return False
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            self._log.warning(
                "task %s of %s did not finish within %g s of being cancelled", task.get_name(), self.name, timeout
            )
        return bool(done)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> set[asyncio.Task[Any]]:  # noqa: ASYNC109
        """Refuse new tasks, cancel every owned task and wait up to ``timeout`` s.

        Idempotent. Failures are logged (once) as each task ends; tasks still running
        after ``timeout`` are logged and returned (empty: all ended). Closed from one of
        its own tasks (a bot link stopping itself), that task is neither cancelled nor
        waited for: it ends by returning.
        """
        self.closed = True
        tasks = self._tasks - {asyncio.current_task()}
        if not tasks:
            return set()
        for task in tasks:
            task.cancel()
        _, unfinished = await asyncio.wait(tasks, timeout=timeout)
        for task in unfinished:
            self._log.warning(
                "task %s of %s did not finish within %g s of being cancelled", task.get_name(), self.name, timeout
            )
        return unfinished


class FailureLog:
    """Logs a failure that may repeat every frame without flooding the log.

    The first failure is logged with its traceback; later ones are counted and at most
    one line per ``interval`` seconds says how many there were since (with the latest
    exception's traceback). ``failed`` counts them all; ``failures`` is incremented too.
    """

    def __init__(
        self,
        what: str,
        *,
        logger: Logger | None = None,
        failures: Tally | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: What failed, for the log line ("relay audio-… subscriber", "playback step").
        self.what = what
        self._log: Logger = logger or log
        self._failures = failures
        self.interval = interval
        self._clock = clock
        #: Failures seen in all.
        self.failed = 0
        #: Failures since the last line written, and when that was.
        self._unlogged = 0
        self._logged_at = -float("inf")

    def failure(self, exc: BaseException, detail: str = "") -> None:
        """Count one failure; log it if none was logged in the last ``interval`` seconds."""
        self.failed += 1
        if self._failures is not None:
            self._failures.inc()
        now = self._clock()
        if now - self._logged_at < self.interval:
            self._unlogged += 1
            return
        since = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        self._log.error("%s failed%s%s: %r", self.what, f" ({detail})" if detail else "", since, exc, exc_info=exc)
        self._unlogged = 0
        self._logged_at = now

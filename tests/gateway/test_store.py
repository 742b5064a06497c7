"""The in-memory store's atomic steps (a Redis store must pass the same tests)."""

from __future__ import annotations

from gateway.messages import ChatMessage, Participant, QueueEntry
from gateway.store import InMemoryStore

ANN = Participant("u1", "customer", "Ann")
BOB = Participant("a1", "agent", "Bob")


async def test_last_leave_removes_conversation_history_and_queue_entry() -> None:
    store = InMemoryStore(history_limit=2)
    assert await store.add_participant("r1", ANN) == [ANN]
    for i in range(3):
        await store.append_chat("r1", ChatMessage(str(i), ANN, f"m{i}", i))
    assert [m.text for m in await store.history("r1")] == ["m1", "m2"]
    assert await store.enqueue(QueueEntry("r1", ANN, 1, "why"))
    assert not await store.enqueue(QueueEntry("r1", ANN, 2, "again"))
    result = await store.remove_participant("r1", "u1")
    assert result.left and result.conversation_removed and result.queue_changed
    assert await store.participants("r1") is None
    assert await store.history("r1") == []
    assert await store.waiting() == []
    assert await store.conversation_count() == 0


async def test_take_is_won_once_and_queue_is_fifo() -> None:
    store = InMemoryStore()
    for room in ("r1", "r2"):
        await store.add_participant(room, ANN)
        await store.enqueue(QueueEntry(room, ANN, 0, "x"))
    assert [e.conversation for e in await store.waiting()] == ["r1", "r2"]
    assert (await store.take("r1")) is not None
    assert (await store.take("r1")) is None
    assert not await store.enqueue(QueueEntry("nope", ANN, 0, "x"))


async def test_queue_entry_goes_when_no_customer_remains() -> None:
    store = InMemoryStore()
    await store.add_participant("r1", ANN)
    await store.add_participant("r1", BOB)
    await store.enqueue(QueueEntry("r1", ANN, 0, "x"))
    result = await store.remove_participant("r1", "u1")
    assert result.left and result.queue_changed and not result.conversation_removed
    assert await store.participants("r1") == [BOB]
    assert not (await store.remove_participant("r1", "u1")).left


async def test_history_outlives_the_last_participant_for_the_retention_time() -> None:
    now = [0.0]
    store = InMemoryStore(retention_seconds=60, retained_limit=2, clock=lambda: now[0])
    await store.add_participant("r1", ANN)
    await store.append_chat("r1", ChatMessage("1", ANN, "my router blinks", 1))
    assert (await store.remove_participant("r1", "u1")).conversation_removed
    assert await store.conversation_count() == 0  # not a live conversation any more
    now[0] = 59.0
    assert [m.text for m in await store.history("r1")] == ["my router blinks"]  # a browser restart finds it
    await store.add_participant("r1", ANN)  # back: the history is the conversation's again
    now[0] = 1000.0
    assert [m.text for m in await store.history("r1")] == ["my router blinks"]
    await store.remove_participant("r1", "u1")
    now[0] = 1060.0
    assert await store.history("r1") == []  # forgotten after the retention time


async def test_only_the_newest_emptied_conversations_are_remembered() -> None:
    store = InMemoryStore(retention_seconds=60, retained_limit=2)
    for room in ("r1", "r2", "r3"):
        await store.add_participant(room, ANN)
        await store.append_chat(room, ChatMessage(room, ANN, room, 1))
        await store.remove_participant(room, "u1")
    assert await store.history("r1") == []
    assert [m.text for m in await store.history("r2")] == ["r2"]
    assert [m.text for m in await store.history("r3")] == ["r3"]

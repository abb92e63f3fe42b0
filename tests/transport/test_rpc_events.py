"""The RPC events are immutable values: equality, repr, hashing and matching over their fields.

They were frozen dataclasses; they are now slot classes with ``Final`` fields, compiled with the
cores (``transport.accel``), because a frozen dataclass's ``__init__`` was ~38% of the compiled
core's ``next_event`` for a unary call.
"""

from __future__ import annotations

import pytest

import transport.rpc._events as events_module
from transport.rpc import (
    ConnectionEnded,
    GoAwayReceived,
    MessageReceived,
    PongReceived,
    RequestReceived,
    StreamCancelled,
    StreamEnded,
    StreamErrored,
    StreamOpened,
    WindowUpdated,
)

SAMPLES = [
    StreamOpened(1, "echo", {"k": 1}),
    MessageReceived(1, {"x": b"1"}, 9, True),
    RequestReceived(3, "echo", {}, [1, 2], 4, True),
    StreamEnded(5),
    StreamCancelled(5),
    StreamErrored(7, "not_found", "no such model"),
    WindowUpdated(9, 16, 1 << 20),
    GoAwayReceived(11, "ok", "bye"),
    PongReceived(b"12345678"),
    ConnectionEnded(),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_an_event_equals_its_copy_and_shows_its_fields(event: object) -> None:
    cls = type(event)
    fields = cls.__match_args__  # type: ignore[attr-defined]
    copy = cls(*(getattr(event, f) for f in fields))
    assert copy == event
    assert (copy != event) is False  # __ne__ follows __eq__
    assert repr(event) == f"{cls.__name__}(" + ", ".join(
        f"{f}={getattr(event, f)!r}" for f in fields
    ) + ")"


def test_events_differ_by_class_and_by_every_field() -> None:
    assert StreamEnded(1) != StreamCancelled(1)  # same fields, another event
    assert MessageReceived(1, "m", 3, True) != MessageReceived(1, "m", 3, False)
    assert MessageReceived(1, "m", 3) == MessageReceived(1, "m", 3, end=False)
    assert StreamEnded(1) != (1,)  # not a tuple
    assert ConnectionEnded() == ConnectionEnded()


def test_hashing_follows_the_fields() -> None:
    assert len({StreamEnded(1), StreamEnded(1), StreamEnded(2)}) == 2
    assert hash(StreamEnded(1)) == hash(StreamEnded(1))
    with pytest.raises(TypeError):  # a dict field is unhashable, as with frozen dataclasses
        hash(StreamOpened(1, "m", {}))


def test_events_match_positionally() -> None:
    match MessageReceived(3, {"y": 2}, 7, True):
        case MessageReceived(stream_id, message, size, end):
            assert (stream_id, message, size, end) == (3, {"y": 2}, 7, True)
        case _:
            raise AssertionError("no match")


def test_compiled_events_refuse_assignment() -> None:
    """Compiled (the host build), a Final field refuses assignment at run time; interpreted,
    mypy enforces it (tests/transport/test_accel.py covers which build runs)."""
    event = MessageReceived(1, "m", 3)
    if not str(events_module.__file__).endswith(".so"):
        pytest.skip("the interpreted events: Final is enforced by mypy, not at run time")
    with pytest.raises(AttributeError):
        event.size = 4  # type: ignore[misc]
    assert event.size == 3

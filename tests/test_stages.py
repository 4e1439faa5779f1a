"""The pipeline's thread stages: order, bounded slots, errors and early stops."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from safelora_cli.run.stages import on_thread


def _live(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


class Tracked:
    """An input iterator that records whether it was closed."""

    def __init__(self, n: int) -> None:
        self.closed = False
        self._items = iter(range(n))

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        return next(self._items)

    def close(self) -> None:
        self.closed = True


def test_results_in_order_and_a_slot_is_never_reused_while_held() -> None:
    held: set[int] = set()
    lock = threading.Lock()

    def work(item: int, slot: list[int]) -> tuple[int, int]:
        with lock:
            assert id(slot) not in held, "a slot was handed out again before its result was released"
        slot[0] = item * item
        return item, id(slot)

    got = []
    stage = on_thread(iter(range(50)), work, [[0], [0]], "test-stage")
    for (item, slot_id), release in stage:
        with lock:
            held.add(slot_id)
        got.append(item)
        with lock:
            held.discard(slot_id)
        release()
    assert got == list(range(50))
    assert not _live("test-stage")


def test_an_error_on_the_thread_is_raised_in_the_consumer() -> None:
    items = Tracked(10)

    def work(item: int, slot: None) -> int:
        if item == 3:
            raise ValueError("bad item 3")
        return item

    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item, release in on_thread(items, work, [None, None], "test-stage"):
            seen.append(item)
            release()
    assert seen == [0, 1, 2]
    assert items.closed
    assert not _live("test-stage")


def test_stopping_early_stops_every_stage() -> None:
    source = Tracked(1000)
    first = on_thread(source, lambda item, slot: item, [None, None], "test-first")

    def second_work(got: tuple[int, Callable[[], None]], slot: None) -> int:
        item, release = got
        release()
        return item

    second = on_thread(first, second_work, [None, None], "test-second")
    for item, release in second:
        release()
        if item == 5:
            break
    second.close()
    assert source.closed
    assert not _live("test-first") and not _live("test-second")

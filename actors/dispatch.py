"""Parts of a pass handed to a pool of Ray actors on demand.

Each actor holds at most ``in_flight`` parts (two: one working, one queued, so it never waits for the
driver) and is given the next part when one of its own finishes. A slow actor (a smaller GPU, a busy
node) or one restarting after a crash takes a smaller share instead of holding up the pass, as a fixed
round-robin split would.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray


def map_on_idle_actors(
    actors: Sequence[Any],
    parts: Sequence[Any],
    submit: Callable[[Any, Any], Any],
    in_flight: int = 2,
    on_done: Callable[[int], None] | None = None,
) -> list:
    """The results of ``submit(actor, part)`` (an ObjectRef) for every part, in the order of ``parts``.
    ``on_done(i)`` is called as part ``i`` finishes. The first part to fail raises its error at once."""
    if not actors:
        raise ValueError("map_on_idle_actors: no actors")
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    waiting = deque(range(len(parts)))
    running: dict = {}  # ObjectRef -> (part index, actor)

    def give_work(actor) -> None:
        if waiting:
            index = waiting.popleft()
            running[submit(actor, parts[index])] = (index, actor)

    for _ in range(in_flight):
        for actor in actors:
            give_work(actor)
    results = [None] * len(parts)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        index, actor = running.pop(ref)
        results[index] = ray.get(ref)
        if on_done is not None:
            on_done(index)
        give_work(actor)
    return results

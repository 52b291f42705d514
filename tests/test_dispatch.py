"""Parts handed to actors on demand (actors.dispatch): results in part order, each part once, and a
stalled actor does not hold up the pass (deterministic: the stall is a gate the test opens)."""

import asyncio
import threading

import pytest
import ray

from actors.dispatch import map_on_idle_actors

pytestmark = pytest.mark.slow  # starts Ray


@ray.remote(num_cpus=0)
class Gate:
    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def wait(self) -> None:
        await self.opened.wait()

    async def open(self) -> None:
        self.opened.set()


@ray.remote(num_cpus=0)
class Worker:
    def __init__(self, name: str, gate=None) -> None:
        self.name, self.gate = name, gate

    def work(self, part: int) -> tuple[int, str]:
        if self.gate is not None:
            ray.get(self.gate.wait.remote())
        if part < 0:
            raise ValueError(f"part {part} is negative")
        return part * part, self.name


def submit(actor, part):
    return actor.work.remote(part)


def test_every_part_is_done_once_and_the_results_come_in_part_order(local_ray):
    actors = [Worker.remote(f"w{i}") for i in range(3)]
    done = []
    results = map_on_idle_actors(actors, list(range(20)), submit, on_done=done.append)
    assert [square for square, _ in results] == [part * part for part in range(20)]
    assert sorted(done) == list(range(20))
    assert {name for _, name in results} == {"w0", "w1", "w2"}


def test_a_stalled_actor_keeps_only_its_first_parts_and_the_others_do_the_rest(local_ray):
    gate = Gate.remote()
    stalled, free = Worker.remote("stalled", gate), Worker.remote("free")
    parts = list(range(12))
    finished = []

    def on_done(index: int) -> None:
        finished.append(index)
        if len(finished) == len(parts) - 2:  # all but the stalled actor's two: let it go on
            gate.open.remote()

    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            results=map_on_idle_actors([stalled, free], parts, submit, in_flight=2, on_done=on_done)
        ),
        daemon=True,
    )
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        gate.open.remote()
        pytest.fail("the pass waited on the stalled actor: its share was fixed in advance")
    by_actor = {part: name for part, (_, name) in zip(parts, outcome["results"], strict=True)}
    assert [part for part, name in by_actor.items() if name == "stalled"] == [0, 2]
    assert finished[-2:] in ([0, 2], [2, 0])


def test_a_failing_part_raises_its_error(local_ray):
    with pytest.raises(ValueError, match="part -3 is negative"):
        map_on_idle_actors([Worker.remote("w")], [1, 2, -3, 4], submit)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no actors"):
        map_on_idle_actors([], [1], submit)
    with pytest.raises(ValueError, match="in_flight must be at least 1"):
        map_on_idle_actors([object()], [1], submit, in_flight=0)


def test_no_parts_gives_no_results(local_ray):
    assert map_on_idle_actors([Worker.remote("w")], [], submit) == []

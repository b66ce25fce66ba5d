"""Snapshots and replay across growth (issue 16): a durable engine that
grows at nearly every step (tests/support/growth.py) snapshots while an index
is between two tables, restarts from that snapshot and the journal after it
to the digest of an engine sized up front, keeps growing after the load,
and replays a journal without a snapshot to the same digest too.

Run: .venv/bin/python -m pytest tests/storage/test_growth_storage.py
"""
from __future__ import annotations

import tempfile

from hypothesis import event, given, settings, strategies as st

from engine.storage.snapshot import list_snapshots

from support.growth import STEPS_MAX, World, mid_resize, tiny_growth


def run_steps(world: World, data, steps: int, snapshot_mid_resize: bool = False) -> bool:
    """`steps` random steps; with `snapshot_mid_resize`, a snapshot at the
    first step after which an index is between two tables. True if taken."""
    taken = False
    for _ in range(steps):
        world.step(data)
        if snapshot_mid_resize and not taken and mid_resize(world.eng.grown):
            world.eng.grown.snapshot()
            taken = True
    return taken


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_a_snapshot_taken_mid_resize_restarts_to_the_same_state(data):
    with tiny_growth(), tempfile.TemporaryDirectory() as path:
        world = World(data, path)
        if not run_steps(world, data, data.draw(st.integers(2, STEPS_MAX)),
                         snapshot_mid_resize=True):
            world.eng.grown.snapshot()          # none was under way: one at the end
            event("snapshot after the steps")
        run_steps(world, data, data.draw(st.integers(0, 4)))    # a journal tail
        world.eng.reopen(path)
        assert list_snapshots(path)
        assert world.eng.grown.digest() == world.eng.sized.digest()
        run_steps(world, data, data.draw(st.integers(1, 6)))    # grows on from the load
        world.eng.digest()                                      # compared by the Twin
        world.eng.grown.close()


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_a_journal_replayed_across_growth_gives_the_same_state(data):
    with tiny_growth(), tempfile.TemporaryDirectory() as path:
        world = World(data, path)
        run_steps(world, data, data.draw(st.integers(2, STEPS_MAX)))
        assert not list_snapshots(path)
        world.eng.reopen(path)                  # every entry replayed, growing as it goes
        assert world.eng.grown.digest() == world.eng.sized.digest()
        run_steps(world, data, data.draw(st.integers(1, 4)))
        world.eng.digest()
        world.eng.grown.close()

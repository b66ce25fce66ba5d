"""Kept top-ups: loaded ones searched in their array, newer ones in a dict."""
import numpy as np
import pytest

from engine.core.topups import TOPUPS, Topups


def test_loaded_and_new_topups_answer_alike_and_round_trip():
    loaded = np.array([(30, 3, 300), (10, 1, 100), (20, 2, 200)], TOPUPS)   # any order
    kept = Topups(loaded)
    kept[15] = (5, 50)
    assert len(kept) == 4 and kept
    assert all(i in kept for i in (10, 15, 20, 30))
    assert all(i not in kept for i in (0, 11, 31, 2**64 - 1))
    assert kept[20] == (2, 200) and kept[15] == (5, 50)
    with pytest.raises(KeyError):
        kept[25]
    with pytest.raises(AssertionError):
        kept[15] = (5, 50)                  # a kept id is never replaced
    again = Topups(kept.to_array())
    assert sorted(again.items()) == sorted(kept.items()) == [
        (10, (1, 100)), (15, (5, 50)), (20, (2, 200)), (30, (3, 300))]
    assert not Topups()


def test_loaded_topups_with_an_id_twice_are_refused_with_a_real_error():
    """Loaded input (a snapshot) is checked by a ValueError, which the load
    turns into a refusal, not by an assert that python -O drops."""
    twice = np.array([(10, 1, 100), (20, 2, 200), (10, 3, 300)], TOPUPS)
    with pytest.raises(ValueError, match="id twice"):
        Topups(twice)

"""The group-commit rule: how long the sync thread waits before an fsync.

One fsync runs at a time, and every command journaled while it runs shares
the next one, so under load batches grow by themselves with no wait at all.
A wait before an fsync (the window, up to `commit_interval_us` after the
previous fsync started) gathers still more into it: fewer fsyncs, and fewer
release rounds, each costing a wake-up of the event loop and one reply
write per connection. That pays only while many requesters keep arriving;
for a caller that waits for each reply before sending the next, it is pure
delay (nothing else will come), and it made a lone caller wait the rest of
the window on every payment.

So, like PostgreSQL's `commit_delay`, which sleeps only while at least
`commit_siblings` other transactions are active, the window is taken only
when the fsync about to start covers at least `commit_siblings` requesters
(reply destinations: a connection's share of a batch, a map request) that
were journaled while the previous fsync ran. That many arriving during one
fsync says that more are arriving now, and that the window will gather
them. A request that finds the sync thread idle is synced at once, and so
is a group too small to say so. `commit_siblings = 0` is the fixed window:
every fsync, idle or not, starts at least the interval after the previous
one started (the behaviour before this rule, kept to compare against).
"""

COMMIT_SIBLINGS_DEFAULT = 5     # requesters in one fsync that make the window worth it


def commit_wait_s(interval_s: float, siblings_min: int, idle: bool, requesters: int,
                  since_last_start_s: float) -> float:
    """Seconds to wait before starting the next fsync (0.0: start it now).

    interval_s: the group-commit window (commit_interval_us / 1e6; 0: never wait).
    siblings_min: commit_siblings (0: always wait, the fixed window).
    idle: the sync thread was idle when the first of these requests came.
    requesters: the requesters journaled so far that this fsync will cover.
    since_last_start_s: time since the previous fsync started."""
    if interval_s < 0 or siblings_min < 0 or requesters < 0:
        raise ValueError(f"commit_wait_s: negative argument ({interval_s}, {siblings_min}, "
                         f"{requesters})")
    if interval_s == 0:
        return 0.0
    if siblings_min > 0 and (idle or requesters < siblings_min):
        return 0.0
    # Bounded: never more than one window, whatever the clock says.
    return min(interval_s, max(0.0, interval_s - since_last_start_s))

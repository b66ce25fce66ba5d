"""The group-commit rule: how long the sync thread waits before an fsync.

One fsync runs at a time, and every command journaled while it runs shares
the next one, so under load batches grow by themselves with no wait at all.
A wait before an fsync (the window, up to `commit_interval_us` after the
previous fsync started) gathers still more into it: fewer fsyncs, and fewer
release rounds, each costing a wake-up of the event loop and one reply
write per connection, and it lets the writer queue a batch's replies for
the sender thread before its fsync returns. That pays only while many
requesters keep arriving; for a caller that waits for each reply before
sending the next, it is pure delay (nothing else will come), and it made a
lone caller wait the rest of the window on every payment.

So, like PostgreSQL's `commit_delay`, which sleeps only while at least
`commit_siblings` other transactions are active, the window is taken only
when the fsync about to start covers at least `commit_siblings`
requesters (reply destinations: a connection's share of a batch, a map
request). That many in one fsync says that more are arriving now and that
the window will gather them. A lone request, or a group too small to say
so, is synced at once: a request that finds the journal idle waits for one
fdatasync and nothing else. `commit_siblings = 0` is the fixed window: every
fsync, whatever it covers, starts at least the interval after the previous
one started (the rule before this one, kept to compare against).
"""

COMMIT_SIBLINGS_DEFAULT = 5     # requesters in one fsync that make the window worth it


def commit_wait_s(interval_s: float, siblings_min: int, requesters: int,
                  since_last_start_s: float) -> float:
    """Seconds to wait before starting the next fsync (0.0: start it now).

    interval_s: the group-commit window (commit_interval_us / 1e6; 0: never wait).
    siblings_min: commit_siblings (0: always wait, the fixed window).
    requesters: the requesters journaled so far that this fsync will cover.
    since_last_start_s: time since the previous fsync started."""
    if interval_s < 0 or siblings_min < 0 or requesters < 0:
        raise ValueError(f"commit_wait_s: negative argument ({interval_s}, {siblings_min}, "
                         f"{requesters})")
    if interval_s == 0 or requesters < siblings_min:
        return 0.0
    # Bounded: never more than one window, whatever the clock says.
    return min(interval_s, max(0.0, interval_s - since_last_start_s))

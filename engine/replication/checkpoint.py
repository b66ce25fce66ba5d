"""Checkpoints: divergence is detected, not assumed away.

At every command seq that is a multiple of `every`, the leader and each
follower compute the SHA-256 of their whole state (Engine.digest's
canonical form) right after applying that command. The digest is computed
in a forked child from a copy-on-write image, so the writer pauses only for
the fork. The leader appends its digest to the stream as a checkpoint
record once the command is in the stream; a follower that reads the record
compares it with its own and stops loudly if they differ.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time

from engine.core import canonical, export

log = logging.getLogger("scanpay.replication")

DIGESTS_KEPT = 16                   # our recent digests, for records that come later
CHILDREN_MAX = 4                    # digest children at once; beyond, a checkpoint is skipped
DIGEST_NICE = 10                    # the child yields the cores to the engine
DIGEST_HEX_BYTES = 64
# A digest of even a large state takes seconds; a child still running after
# this is stuck (or starved): it is killed and its checkpoint counted as
# skipped, so that a stuck child cannot hold one of CHILDREN_MAX slots, and
# with four of them every later checkpoint, for ever.
DIGEST_TIMEOUT_S = 300.0


class DigestMismatch(Exception):
    pass


class Checkpoints:
    """The digests of one node (thread-safe: the writer forks, the sync
    thread or the event loop collects)."""

    def __init__(self, every: int):
        assert every >= 0
        self.every = every
        self.lock = threading.Lock()
        self.children = {}          # seq -> (pid, read fd, started at: monotonic s)
        self.digests = {}           # seq -> our digest (hex)
        self.claims = {}            # seq -> the leader's digest, ours not ready yet
        self.appended = 0           # the last seq whose record the leader appended
        self.last = None            # {"seq", "digest"}: the last appended or verified
        self.skipped = 0

    def applied(self, state, seq: int) -> None:
        """The writer applied command `seq`: fork a digest child if it is a checkpoint."""
        if not self.every or seq % self.every:
            return
        with self.lock:
            if len(self.children) >= CHILDREN_MAX:
                self.skipped += 1
                log.warning("checkpoint %d skipped: %d digests are still being computed",
                            seq, len(self.children))
                return
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                digest_child(state, write_fd)       # never returns
            os.close(write_fd)
            self.children[seq] = (pid, read_fd, time.monotonic())

    def collect(self) -> None:
        """Read the digests of the children that are done."""
        with self.lock:
            for seq, (pid, fd, started) in list(self.children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    if time.monotonic() - started > DIGEST_TIMEOUT_S:
                        self.kill_child(seq)
                        self.skipped += 1
                        log.error("checkpoint %d skipped: its digest child ran over %.0f s "
                                  "and was killed (a machine this busy checks fewer "
                                  "checkpoints)", seq, DIGEST_TIMEOUT_S)
                    continue
                with os.fdopen(fd, "rb") as pipe:
                    digest = pipe.read().decode()
                del self.children[seq]
                if os.waitstatus_to_exitcode(status) != 0 or len(digest) != DIGEST_HEX_BYTES:
                    log.error("checkpoint %d: the digest child failed (exit %s)", seq,
                              os.waitstatus_to_exitcode(status))
                    continue
                self.digests[seq] = digest
                for old in sorted(self.digests)[:-DIGESTS_KEPT]:
                    del self.digests[old]

    def ready(self, durable_seq: int) -> list:
        """The leader: (seq, digest) to append now (their command is in the stream)."""
        self.collect()
        with self.lock:
            return [(seq, self.digests[seq]) for seq in sorted(self.digests)
                    if self.appended < seq <= durable_seq]

    def appended_record(self, seq: int, digest: str) -> None:
        assert seq > self.appended, (seq, self.appended)
        self.appended = seq
        self.last = {"seq": seq, "digest": digest}

    def claim(self, seq: int, digest: str) -> None:
        """A follower read the leader's record: compared now or once ours is
        done. The record is in the stream: were this node to lead, it would
        not append one for `seq` or an older checkpoint again."""
        with self.lock:
            self.claims[seq] = digest
            self.appended = max(self.appended, seq)
        self.verify()

    def verify(self) -> None:
        """Compare every claim whose digest we have; DigestMismatch if one differs."""
        self.collect()
        with self.lock:
            for seq, theirs in sorted(self.claims.items()):
                ours = self.digests.get(seq)
                if ours is None:
                    if seq not in self.children:
                        del self.claims[seq]    # not computed here (replayed, or skipped)
                    continue
                del self.claims[seq]
                if ours != theirs:
                    raise DigestMismatch(f"checkpoint at command {seq}: the leader's state "
                                         f"digest is {theirs}, this node's is {ours}")
                # Children finish in any order: an older checkpoint checked
                # late must not hide a newer one checked before it.
                if self.last is None or seq > self.last["seq"]:
                    self.last = {"seq": seq, "digest": ours}

    def forget_after(self, seq: int) -> None:
        """After a rebuild: digests of commands that were dropped are void
        (and so are the children computing them)."""
        self.collect()
        with self.lock:
            for old in [s for s in self.children if s > seq]:
                self.kill_child(old)
            for old in [s for s in self.digests if s > seq]:
                del self.digests[old]
            self.appended = min(self.appended, seq)

    def kill_child(self, seq: int) -> None:
        """(Holding the lock.) Stop the digest child of `seq`, and forget it."""
        pid, fd, _started = self.children.pop(seq)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)


def digest_child(state, write_fd: int) -> None:
    """In the forked child: the digest to the pipe, then leave, touching
    nothing the server's threads may hold (as the snapshot child)."""
    code = 1
    try:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, limit)
        os.nice(DIGEST_NICE)
        digest = canonical.digest(export.canonical(state))
        os.write(write_fd, digest.encode())
        code = 0
    finally:
        os._exit(code)

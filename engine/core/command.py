"""What the journal holds: one state-changing command per entry.

A command is everything its apply depends on: the op, the engine time it was
stamped with, the random draws made for it outside the apply (payment codes),
and the request body exactly as applied (raw records for PAY/ISSUE, the
MessagePack map for map ops). Replaying commands in order rebuilds the state
byte for byte, with no clock and no randomness.

Layout (little-endian): u16 op, u16 reserved (0), u32 draw count, i64 now,
u64 draws[count], body.
"""
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<HHIq")
DRAWS_MAX = 1024


@dataclass(frozen=True)
class Command:
    op: int
    now: int
    draws: tuple
    body: bytes

    def encode(self) -> bytes:
        assert len(self.draws) <= DRAWS_MAX
        head = HEADER.pack(self.op, 0, len(self.draws), self.now)
        draws = struct.pack(f"<{len(self.draws)}Q", *self.draws)
        return b"".join((head, draws, self.body))


def decode(payload) -> Command:
    payload = memoryview(payload)
    op, reserved, count, now = HEADER.unpack_from(payload)
    if reserved != 0 or count > DRAWS_MAX:
        raise ValueError(f"not a command entry (reserved {reserved}, draws {count})")
    end = HEADER.size + 8 * count
    draws = struct.unpack_from(f"<{count}Q", payload, HEADER.size)
    return Command(op, now, tuple(draws), payload[end:])

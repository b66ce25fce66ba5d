# Stub of the frame fast path (ext/framing.pyx): the surface Python uses.
from typing_extensions import Buffer, disjoint_base
from typing import Any

import numpy as np
from numpy.typing import NDArray

@disjoint_base
class PayBatch:
    """Runs of PAY frames copied from read buffers straight into one batch."""
    records: int
    frames: int
    records_max: int
    parts: list[Any]
    opened_at: float
    def __init__(self, records_max: int, record_bytes: int, frame_bytes_max: int,
                 op: int) -> None: ...
    @property
    def room(self) -> int: ...
    # (records taken, frames taken, where they end, size of the frame that did not fit)
    def take(self, buffer: Buffer, at: int, member: int,
             records_room: int) -> tuple[int, int, int, int]: ...
    def body(self) -> bytes: ...
    def replies(self, results: Buffer) -> tuple[bytes, NDArray[np.int64]]: ...
    def request_ids(self, member: int) -> NDArray[np.uint64]: ...

def intake_pay(writer: Any, conn: Any, buffer: Buffer, at: int) -> int: ...
def check_map_body(data: Buffer, depth_max: int) -> None: ...

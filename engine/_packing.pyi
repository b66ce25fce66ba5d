# Stub of the byte planes of record batches (ext/packing.pyx): the surface
# engine/replication/packing.py uses.
from _typeshed import ReadableBuffer, WriteableBuffer

STRIDE_MAX: int

def varying(records: ReadableBuffer, stride: int) -> bytes: ...
def gather(records: ReadableBuffer, flags: ReadableBuffer) -> bytes: ...
def scatter(records: WriteableBuffer, first: ReadableBuffer, flags: ReadableBuffer,
            planes: ReadableBuffer) -> None: ...

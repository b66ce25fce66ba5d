# Stub of precision marketing's passes (ext/marketing.pyx): the surface Python uses.
import numpy as np
import numpy.typing as npt

HOLDOUT_SCALE: int
PAYMENT_ROW_BYTES: int

ACC_COUNT: int
ACC_GMV: int
ACC_LAST: int
ACC_FLAGS: int
ACC_FIELDS: int
FLAG_EVER: int
FLAG_BEFORE: int

def scan_payments(rows: npt.NDArray[np.uint8], in_scope: npt.NDArray[np.uint8], from_ms: int,
                  until_ms: int, acc: npt.NDArray[np.int64]) -> None: ...
def coupon_discount(rows: npt.NDArray[np.uint8], coupon_mask: npt.NDArray[np.uint8],
                    from_ms: int, until_ms: int) -> tuple[int, int]: ...
def siphash(k0: int, k1: int, m0: int, m1: int) -> int: ...
def holdout(users: npt.NDArray[np.uint64], k0: int, k1: int, campaign: int, holdout_bps: int,
            out: npt.NDArray[np.uint8]) -> None: ...

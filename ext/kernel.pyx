# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The ledger kernel: state tables and the batch apply of PAY and ISSUE.

State is a set of numpy arrays (one row per wallet, merchant, stock, coupon,
payment, payment code) with u64-id hash indexes. `pay` and `issue` apply a
whole batch of wire records in one call without the GIL and without a
Python object per record. The apply is deterministic: it reads no clock and
no randomness; the caller passes the batch's engine time.

Rules: docs/reference/rules.md, "Paying" and "Coupon stocks and coupons". Step numbers in
comments refer to "Paying".
"""
cimport cython
cimport numpy as cnp
import numpy as np
from libc.stdint cimport uint8_t, uint32_t, int32_t, int64_t, uint64_t
from libc.string cimport memcmp, memset

from tables cimport (PayRecord, PayResult, IssueRecord, IssueResult, User,
                     COUPONS_PER_PAYMENT_MAX, TAGS_PER_MERCHANT_MAX,
                     CaptureRecord, RefundRecord, RefundResult,
                     Program, Membership, Earning, Visit, Redemption,
                     Merchant, Stock, Coupon, Payment, Code, Refund, Tombstone)
from index cimport (Entry, Index, index_get, index_put, index_prefetch, index_guess,
                   index_put_hashed, index_size, mix64, row_id, LOAD_MAX_PCT, INDEX_LAYOUT,
                   __builtin_prefetch, prefetch_row, prefetch_for_write)

from engine.protocol import limits as _limits, records as _records
from engine.protocol.status import Status as _Status
from engine.protocol.records import PAY_RECORD, PAY_RESULT

cnp.import_array()

# One compilation unit, in parts (as asyncpg's protocol.pyx): module-level
# constants and helpers, then the Ledger class built up part by part; each
# part is a base class of the next so that a part calls only the parts above it.
include "kernel/consts.pxi"
include "kernel/layout.pxi"
include "kernel/dtypes.pxi"
include "kernel/rowspace.pxi"
include "kernel/index.pxi"
include "kernel/rules.pxi"
include "kernel/tables.pxi"
include "kernel/invariants.pxi"
include "kernel/select.pxi"
include "kernel/issue.pxi"
include "kernel/membership.pxi"
include "kernel/pay.pxi"
include "kernel/lifecycle.pxi"
include "kernel/refunds.pxi"
include "kernel/settle.pxi"
include "kernel/quote.pxi"
include "kernel/maps.pxi"


cdef class Ledger(_Maps):
    """All state of one engine, and the batch apply over it."""


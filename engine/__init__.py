"""Scanpay: a scan-to-pay payment and coupon settlement engine."""
from .engine import Engine
from .errors import BadBody, EngineError, UnknownOp
from .records import ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT
from .status import ErrorCode, Status

__all__ = ["Engine", "EngineError", "BadBody", "UnknownOp", "ErrorCode", "Status",
           "PAY_RECORD", "PAY_RESULT", "ISSUE_RECORD", "ISSUE_RESULT"]

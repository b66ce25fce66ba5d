"""Scanpay: a scan-to-pay payment and coupon settlement engine."""
from engine.core.engine import Engine
from engine.protocol.errors import BadBody, EngineError, UnknownOp
from engine.protocol.records import ISSUE_RECORD, ISSUE_RESULT, PAY_RECORD, PAY_RESULT
from engine.protocol.status import ErrorCode, Status

__all__ = ["Engine", "EngineError", "BadBody", "UnknownOp", "ErrorCode", "Status",
           "PAY_RECORD", "PAY_RESULT", "ISSUE_RECORD", "ISSUE_RESULT"]

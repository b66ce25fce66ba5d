"""Errors that refuse a whole request (docs/reference/protocol.md error frames).

Per-record and per-item outcomes are not exceptions: they are status codes in
the results. These exceptions are what the server turns into error frames and
what the embedded `Engine` raises.
"""
from engine.protocol.status import ErrorCode


class EngineError(Exception):
    code: ErrorCode = ErrorCode.bad_body
    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def name(self) -> str:
        return self.code.name

    def to_map(self) -> dict:
        """The body of the error frame."""
        return {"code": int(self.code), "name": self.name,
                "message": self.message, "retryable": self.retryable}


class UnknownOp(EngineError):
    code = ErrorCode.unknown_op


class BadBody(EngineError):
    code = ErrorCode.bad_body


class Busy(EngineError):
    code = ErrorCode.busy
    retryable = True


class Unavailable(EngineError):
    code = ErrorCode.unavailable
    retryable = True


class BadFrame(EngineError):
    code = ErrorCode.bad_frame


class FrameTooLarge(EngineError):
    code = ErrorCode.frame_too_large


class NotAuthenticated(EngineError):
    code = ErrorCode.not_authenticated


class Forbidden(EngineError):
    code = ErrorCode.forbidden


class UnsupportedProtocol(EngineError):
    code = ErrorCode.unsupported_protocol


class NotLeader(EngineError):
    """This node is a replicated follower: retry on the leader, whose
    address the message names (docs/reference/protocol.md error frames)."""
    code = ErrorCode.not_leader
    retryable = True

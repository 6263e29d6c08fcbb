"""The Realtime protocol's `error` event, and how a gRPC status (ours) becomes one."""

from __future__ import annotations

import secrets

# gRPC status names (funchat's `Error.code`) -> the Realtime error's `type`
SERVER_SIDE = {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS", "DEADLINE_EXCEEDED"}


def event_id() -> str:
    return "event_" + secrets.token_hex(8)


class RealtimeError(Exception):
    """A client event this server refuses: sent as an `error` event; the call goes on."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.event_id, self.type = code, message, param, event_id, type

    def event(self) -> dict:
        return {"type": "error", "event_id": event_id(),
                "error": {"type": self.type, "code": self.code, "message": self.message, "param": self.param,
                          "event_id": self.event_id}}


def from_status(code: str, message: str, client_event_id: str | None) -> RealtimeError:
    """funchat's `Error` (a gRPC status name and its message) as a Realtime error; the code is kept
    in lower case (`invalid_argument`, `resource_exhausted`, ...)."""
    kind = "server_error" if code in SERVER_SIDE else "invalid_request_error"
    return RealtimeError(code.lower(), message, event_id=client_event_id, type=kind)

"""The one error type of the client: every failed RPC, and every reply it cannot assemble."""


class FunchatClientError(Exception):
    """An RPC that failed (code: the gRPC status name) or a reply this client cannot assemble.

    The client's own base class, not funchat.errors.FunchatError: the client package imports
    nothing of the rest of funchat but the generated protos.

    unreachable: the channel never got a connection to the server (as opposed to a server that
    answered UNAVAILABLE itself, e.g. because a model service is down)."""

    def __init__(self, code: str, message: str, unreachable: bool = False):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.unreachable = unreachable

"""The public API's gRPC method handlers as Ray Serve's gRPC proxy registers them
(`grpc_servicer_functions` names `add_FunchatServicer_to_server` of this module).

The generated `funchat_pb2_grpc.add_FunchatServicer_to_server`, except for one thing: a request
message that is not valid protobuf reaches the replica as an `UnparsableMessage` instead of failing
inside Ray's proxy. There, with the generated deserializers, Respond's random bytes ended with
UNKNOWN ("Unexpected DecodeError") and a Converse stream of random bytes simply stopped, and the
call ended OK: Ray's proxy treats a message it cannot read as the end of the stream. The service
answers an `UnparsableMessage` with INVALID_ARGUMENT saying what could not be parsed
(`FunchatService.parsed`).

This module is imported by Ray's proxy actor: it keeps to grpc, protobuf and the generated code.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from funchat.api import SERVICE_NAME, pb


@dataclass(frozen=True)
class UnparsableMessage:
    """A request message whose bytes are not a valid `message_type`; sent to the replica in its
    place (picklable, like the messages themselves)."""

    message_type: str  # the protobuf full name, e.g. funchat.v1.ClientEvent
    size: int          # bytes received

    def explain(self) -> str:
        """What the caller is told (INVALID_ARGUMENT). (protobuf's own reason says no more than this.)"""
        return (f"a {self.size}-byte message could not be parsed as {self.message_type}: send messages "
                f"serialized from funchat/v1/funchat.proto")


def lenient(message_class):
    """A request deserializer: the parsed message, or an UnparsableMessage."""
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            return UnparsableMessage(message_class.DESCRIPTOR.full_name, len(data))
    return parse


def add_FunchatServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated code's name)
    """Register the four methods of `funchat.v1.Funchat` on `server` with lenient deserializers."""
    handlers = {
        "Converse": grpc.stream_stream_rpc_method_handler(
            servicer.Converse, request_deserializer=lenient(pb.ClientEvent),
            response_serializer=pb.ServerEvent.SerializeToString),
        "Respond": grpc.unary_stream_rpc_method_handler(
            servicer.Respond, request_deserializer=lenient(pb.RespondRequest),
            response_serializer=pb.ServerEvent.SerializeToString),
        "GetSession": grpc.unary_unary_rpc_method_handler(
            servicer.GetSession, request_deserializer=lenient(pb.GetSessionRequest),
            response_serializer=pb.Session.SerializeToString),
        "DeleteSession": grpc.unary_unary_rpc_method_handler(
            servicer.DeleteSession, request_deserializer=lenient(pb.DeleteSessionRequest),
            response_serializer=pb.DeleteSessionResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

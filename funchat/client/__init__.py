"""A Python client of the funchat public API (protos/funchat/v1/funchat.proto) over gRPC.

    from funchat.client import AsyncClient, Client, session_config, stream_call

    reply = Client("127.0.0.1:50051").respond(audio16k, session_config(greedy=True))
    reply.text, reply.audio            # the text and the spoken reply (24 kHz, or the config's
                                       # output_encoding= / output_sample_rate=, at reply.sample_rate)

    async with AsyncClient(target) as client:
        async with client.converse(session_config(turn_detection="manual")) as call:
            await call.send_audio(audio16k)
            await call.commit()
            reply = await call.next_reply()

API keys: every RPC carries the client's API key as the metadata `authorization: Bearer <key>`.
Clients take it as `api_key=` (Client, AsyncClient; Conversation and stream_call use their
AsyncClient's), else from the environment variable FUNCHAT_API_KEY; `api_key=""` sends none. A key
comes from `funchat keys create` (`make up` writes one to .run/api_key: `export
FUNCHAT_API_KEY=$(cat .run/api_key)`). A server refusing the key (none, wrong, revoked) answers
UNAUTHENTICATED, raised as FunchatClientError with the server's message. The key is never in a repr,
a log record or an error message. `authed_stub(stub, api_key)` makes a generated stub of one's own
send it too.

TLS: Client and AsyncClient take `tls=True` (the system's root certificates) or
`tls=TlsOptions(ca_file=, cert_file=, key_file=)` (a private CA, a client certificate for mTLS); by
default the environment decides (FUNCHAT_TLS_CA_FILE, FUNCHAT_TLS_CLIENT_CERT_FILE /
FUNCHAT_TLS_CLIENT_KEY_FILE, FUNCHAT_TLS=1; none of them: plaintext). See funchat.client.tls.

Every failure of an RPC is raised as `FunchatClientError(code, message)`, `code` being the gRPC
status name (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE...); problems this client finds in what the
server sent (a reply whose audio chunks are not numbered 0, 1, 2...) are raised the same way with
code DATA_LOSS.

The package imports only grpc (with its health service), numpy, soxr and the generated protos
(funchat.api): it installs as `funchat[client]`, without torch. Its modules, in the order a call
uses them: config (SessionConfig from plain values), audio (samples <-> API bytes), auth (the API
key and its metadata), events and replies (server events -> Reply), async_client and conversation
(AsyncClient, Converse calls), sync_client (Client), call (stream_call: a file played as a live
call), errors.
"""

from funchat.client.async_client import AsyncClient
from funchat.client.audio import decode_audio, decode_delta, decode_pcm16, encode_audio
from funchat.client.auth import API_KEY_ENV, auth_metadata, authed_stub, resolve_api_key
from funchat.client.call import ACK_INTERVAL_S, CallResult, stream_call
from funchat.client.config import (ENCODINGS, INPUT_SAMPLE_RATE, MAX_CHUNK_S, MODES, OUTPUT_SAMPLE_RATE,
                                   TURN_DETECTION, config_mode, output_format, session_config)
from funchat.client.conversation import Conversation
from funchat.client.errors import FunchatClientError
from funchat.client.events import RESPONSE_EVENTS, describe_event, response_id_of
from funchat.client.replies import Reply, collect_reply
from funchat.client.sync_client import Client
from funchat.client.tls import TlsOptions, open_channel, resolve_tls

__all__ = [
    "ACK_INTERVAL_S", "API_KEY_ENV", "ENCODINGS", "INPUT_SAMPLE_RATE", "MAX_CHUNK_S", "MODES", "OUTPUT_SAMPLE_RATE",
    "RESPONSE_EVENTS", "TURN_DETECTION",
    "AsyncClient", "CallResult", "Client", "Conversation", "FunchatClientError", "Reply", "TlsOptions",
    "auth_metadata", "authed_stub", "collect_reply", "config_mode", "decode_audio", "decode_delta", "decode_pcm16",
    "describe_event", "encode_audio", "open_channel", "output_format", "resolve_api_key", "resolve_tls",
    "response_id_of", "session_config", "stream_call",
]

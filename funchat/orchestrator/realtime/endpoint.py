"""The HTTP side of a replica (Ray Serve's HTTP ingress, a FastAPI app): the OpenAI
Realtime-compatible WebSocket `GET /v1/realtime?model=...`, and the web page at `/`.

Authentication is the gRPC API's: the same API keys, sent as `Authorization: Bearer <key>` (the
`openai` SDK does so) or, from a browser, which cannot set headers on a WebSocket, as the
subprotocol `openai-insecure-api-key.<key>` beside `realtime` (what OpenAI's browser clients send).
A missing or wrong key gets an `error` event and the socket is closed with 1008 (policy).
A browser should not hold an API key: its backend asks `POST /v1/realtime/client_secrets` (with the
key) for a short-lived secret `ek_...` (client_secrets.py), which the browser sends in its place.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse

from funchat.api_keys import AuthError, parse_authorization, parse_key
from funchat.orchestrator.realtime import client_secrets
from funchat.orchestrator.realtime.call import RealtimeCall, check_config
from funchat.orchestrator.realtime.errors import RealtimeError
from funchat.orchestrator.realtime.session import RealtimeSession

if TYPE_CHECKING:
    from funchat.orchestrator.service import FunchatService

KEY_PROTOCOL = "openai-insecure-api-key."
WEB_DIR = Path(__file__).parent / "web"
CLOSE_POLICY = 1008  # refused: a wrong key, an unknown model, a call over a limit
CLOSE_NORMAL = 1000


def caller_metadata(websocket: WebSocket) -> list[tuple[str, str]]:
    """The gRPC-style metadata Converse reads the caller's key from."""
    authorization = websocket.headers.get("authorization", "")
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(KEY_PROTOCOL):
            authorization = "Bearer " + protocol[len(KEY_PROTOCOL):]
    return [("authorization", authorization)] if authorization else []


async def serve_websocket(service: FunchatService, websocket: WebSocket, model: str | None) -> None:
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)

    async def send(event: dict) -> None:
        await websocket.send_json(event)

    served = service.settings.model_name
    if model is not None and model != served:
        await send(RealtimeError("model_not_found", f"model {model[:64]!r} is not served here: use "
                                                    f"?model={served}", param="model").event())
        await websocket.close(CLOSE_POLICY)
        return
    metadata = caller_metadata(websocket)
    try:
        tenant, session = client_secret_of(service, metadata, served)
    except RealtimeError as exc:
        await send(exc.event())
        await websocket.close(CLOSE_POLICY)
        return
    call = RealtimeCall(service, send, metadata, served, tenant=tenant, session=session)
    try:
        if not await call.start():  # refused (its error was sent): a wrong key, a limit
            await websocket.close(CLOSE_POLICY)
            return
        await pump_client_events(websocket, call)
    except WebSocketDisconnect:
        pass
    finally:
        await call.abort()  # the socket is closed either way: nothing left to answer


async def pump_client_events(websocket: WebSocket, call: RealtimeCall) -> None:
    """The client's messages into the call until it disconnects, or the call ends (then close)."""
    ended = asyncio.ensure_future(call.ended.wait())
    try:
        while True:
            receive = asyncio.ensure_future(websocket.receive())
            await asyncio.wait({receive, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                receive.cancel()
                await websocket.close(CLOSE_NORMAL)  # the call ended (its error event says why)
                return
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            await call.handle(text if text is not None else message.get("bytes", b""))
    finally:
        ended.cancel()


def client_secret_of(service: FunchatService, metadata: list[tuple[str, str]], model: str
                     ) -> tuple[str | None, RealtimeSession | None]:
    """(tenant, the session it opens with) for a caller authenticating with a client secret; (None, None)
    for an API key (Converse checks it); RealtimeError unauthenticated for a bad or expired secret, or one
    whose API key was revoked since."""
    token = metadata[0][1].partition(" ")[2].strip() if metadata else ""
    if service.keys is None or not token.startswith(client_secrets.PREFIX):
        return None, None
    try:
        secret = client_secrets.verify(service.resume_secret.get_secret_value().encode(), token)
        tenant = service.keys.active_tenant(secret.key_id)
    except client_secrets.ClientSecretError as exc:
        raise RealtimeError("unauthenticated", str(exc)) from None
    except AuthError as exc:
        raise RealtimeError("unauthenticated", f"the client secret's {exc}") from None
    if tenant != secret.tenant:
        raise RealtimeError("unauthenticated", "the client secret's API key now belongs to another tenant")
    return tenant, RealtimeSession(model=model).update(secret.session)


async def create_client_secret(service: FunchatService, request: Request) -> JSONResponse:
    """POST /v1/realtime/client_secrets with `Authorization: Bearer <API key>` and optionally
    {"session": {...}, "expires_after": {"anchor": "created_at", "seconds": N}} -> {"value", "expires_at",
    "session"}, as OpenAI's endpoint answers."""
    def refused(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"type": "invalid_request_error", "code": code, "message": message,
                                       "param": param}}, status_code=status)

    tenant, key_id = "", ""
    if service.keys is not None:
        try:
            key = parse_authorization(request.headers.get("authorization"))
            tenant, key_id = service.keys.verify_key(key), parse_key(key)
        except AuthError as exc:
            return refused(401, "invalid_api_key", str(exc))
    try:
        body = await request.json() if await request.body() else {}
    except ValueError:
        return refused(400, "invalid_json", "the body is not valid JSON")
    if not isinstance(body, dict):
        return refused(400, "invalid_json", "the body must be a JSON object")
    try:
        ttl_s = client_secrets.expiry_seconds(body)
    except ValueError as exc:
        return refused(400, "invalid_value", str(exc), "expires_after")
    fields = body.get("session") or {}
    model = service.settings.model_name
    try:
        session = RealtimeSession(model=model).update(fields)
        check_config(service, session)
    except RealtimeError as exc:
        return refused(400, exc.code, exc.message, exc.param)
    value, expires_at = client_secrets.issue(service.resume_secret.get_secret_value().encode(), tenant, key_id,
                                             fields, ttl_s)
    return JSONResponse({"value": value, "expires_at": expires_at, "session": session.to_json("")})


def web_page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")

"""The HTTP side of a replica (Ray Serve's HTTP ingress, a FastAPI app): the OpenAI
Realtime-compatible WebSocket `GET /v1/realtime?model=...`, and the web page at `/`.

Authentication is the gRPC API's: the same API keys, sent as `Authorization: Bearer <key>` (the
`openai` SDK does so) or, from a browser, which cannot set headers on a WebSocket, as the
subprotocol `openai-insecure-api-key.<key>` beside `realtime` (what OpenAI's browser clients send).
A missing or wrong key gets an `error` event and the socket is closed with 1008 (policy).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse

from funchat.orchestrator.realtime.call import RealtimeCall
from funchat.orchestrator.realtime.errors import RealtimeError

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
    call = RealtimeCall(service, send, caller_metadata(websocket), served)
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


def web_page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")

"""The OpenAI Realtime-compatible WebSocket endpoint (`/v1/realtime`), served by the orchestrator's
replicas through Ray Serve's HTTP ingress and run on the Converse call machinery:

    endpoint.py       the WebSocket (and the web page): authentication, the client's messages
    call.py           one Realtime call as a Converse call of the same replica
    session.py        the Realtime session object <-> the call's SessionConfig
    server_events.py  Converse's events -> the Realtime protocol's server events
    errors.py         the `error` event
"""

"""Per-field size limits of the public API: instructions, tools and function outputs are refused
when oversized, with the limit in the message, before any prompt work; the call goes on."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from funchat.api import pb
from funchat.orchestrator.call_config import (MAX_FUNCTION_OUTPUT_BYTES, MAX_INSTRUCTIONS_CHARS, MAX_TOOLS,
                                              MAX_TOOLS_JSON_BYTES, CallConfig, parse_config)
from funchat.orchestrator.converse import ConverseCall
from funchat.orchestrator.errors import ApiError


def refused(cfg: pb.SessionConfig) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse_config(cfg, set(), 512)
    return err.value


def test_instructions_at_the_limit_pass_and_over_it_are_refused():
    assert parse_config(pb.SessionConfig(instructions="a" * MAX_INSTRUCTIONS_CHARS), set(), 512).instructions
    err = refused(pb.SessionConfig(instructions="a" * (MAX_INSTRUCTIONS_CHARS + 1)))
    assert err.code == "INVALID_ARGUMENT" and f"over the {MAX_INSTRUCTIONS_CHARS} limit" in err.message
    assert "aaaa" not in err.message  # never echoed back


def test_too_many_or_too_large_tools_are_refused():
    many = [pb.Tool(name=f"t{i}") for i in range(MAX_TOOLS + 1)]
    assert f"over the limit of {MAX_TOOLS}" in refused(pb.SessionConfig(tools=many)).message
    large = [pb.Tool(name="t", description="d" * MAX_TOOLS_JSON_BYTES)]
    assert f"{MAX_TOOLS_JSON_BYTES}-byte limit" in refused(pb.SessionConfig(tools=large)).message


def test_an_oversized_function_output_is_refused_and_the_call_goes_on():
    async def main():
        service = SimpleNamespace(settings=SimpleNamespace(max_chunk_ms=1000, max_turn_s=60.0, encode_while_speaking=False))
        call = ConverseCall(service, "sid", CallConfig(vad=None))
        big = pb.FunctionCallOutput(call_id="call_1", output="x" * (MAX_FUNCTION_OUTPUT_BYTES + 1))
        await call.handle(pb.ClientEvent(function_call_output=big))
        await call.handle(pb.ClientEvent(clear=pb.InputAudioClear()))  # still served
        return [e.error for e in call.outbox.items]
    (error,) = asyncio.run(main())
    assert (error.code, error.event) == ("INVALID_ARGUMENT", "function_call_output")
    assert f"{MAX_FUNCTION_OUTPUT_BYTES}-byte limit" in error.message

"""Every session-store failure becomes a status (`errors.store_call`): none escapes a turn handler
as an unexplained exception, which left Converse replies unfinished and Respond ending OK."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from funchat.orchestrator.errors import ApiError, store_call
from funchat.orchestrator.sessions import (ExpiredResumeToken, LeaseLost, SessionBusy, SessionError, SessionNotFound,
                                           StoreUnavailable)


async def failing(exc: BaseException):
    raise exc


@pytest.mark.parametrize("exc, code, words", [
    (SessionNotFound("no session 'x'"), "NOT_FOUND", "no session"),
    (StoreUnavailable("cannot reach Redis"), "UNAVAILABLE", "unavailable"),
    (SessionError("session s: write abandoned after 8 attempts"), "ABORTED", "retry"),
    (SessionBusy("session s: another turn of this session is in progress"), "ABORTED", "another turn"),
    (LeaseLost("session s: this turn lost its lease on the session"), "ABORTED", "lost its lease"),
    (ExpiredResumeToken("resume token for session s expired: ...; resume with the newest one"), "NOT_FOUND",
     "newest"),
    (ResponseError("READONLY You can't write against a read only replica."), "UNAVAILABLE", "retry shortly"),
    (ResponseError("LOADING Redis is loading the dataset in memory"), "UNAVAILABLE", "retry shortly"),
    (ResponseError("OOM command not allowed when used memory > 'maxmemory'."), "RESOURCE_EXHAUSTED", "out of memory"),
    (ResponseError("NOAUTH Authentication required."), "INTERNAL", "FUNCHAT_REDIS_PASSWORD"),
    (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), "INTERNAL", "WRONGTYPE"),
    (RedisConnectionError("Connection closed by server."), "UNAVAILABLE", "retry"),
])
def test_store_failures_become_statuses(exc, code, words):
    with pytest.raises(ApiError) as err:
        asyncio.run(store_call(failing(exc)))
    assert err.value.code == code and words in err.value.message


def test_other_exceptions_are_not_hidden():
    with pytest.raises(ZeroDivisionError):  # a bug stays a bug (counted INTERNAL by the RPC wrapper)
        asyncio.run(store_call(failing(ZeroDivisionError())))

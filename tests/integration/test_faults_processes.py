"""Process faults survived, on one stack started the way `make up` starts it (funchat.dev.stack: a
persistent redis-server, the four tritonservers, the orchestrator with two Ray Serve replicas), on
free 127.0.0.1 ports, through the public API with the real client and an API key.

Each fault is a SIGKILL of a real process in the middle of a caller's turn: a model server, an
orchestrator replica, redis-server. Each test records what the caller saw and how long recovery
took (printed: run with -s to see the table), then checks that

- the caller got a clear status (an `error` event naming the part that failed and a failed
  `response_done`, or the call's gRPC status), and the session is not left "responding";
- `python -m funchat.dev.stack restart SERVICE` (`make restart`) brings the part back on the same
  ports, and the next turn of the same session completes with the oracle's greedy tokens;
- no KV slot leaked: the llm and refined_head `funchat_<service>_live_sequences` gauges are back to 0;
- no acknowledged turn was lost: every reply that ended `completed` is in GetSession's history (the
  last test checks every session of the module, after the Redis restart).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis

from funchat.client import AsyncClient, FunchatClientError, session_config
from funchat.dev import stack as dev_stack
from funchat.dev.tritonserver import free_port, tail
from funchat.oracle.generation import GenerationConfig
from funchat.orchestrator.model_clients import RECONNECT_BACKOFF_MS
from funchat.turn.schedule import Mode
from tests.integration.pcm import pcm16_samples

MAX_NEW = 48  # long enough that a kill after the first delta lands mid-turn
STATEFUL = ("llm", "refined_head")  # the services holding KV cache rows
FAULTS: list[dict] = []  # one row per fault, printed at the end of the module


@dataclass
class Stack:
    run_dir: Path
    target: str
    endpoints: dict
    acknowledged: dict[str, list[str]] = field(default_factory=dict, repr=False)  # session id -> completed replies

    def state(self) -> dict:
        return json.loads((self.run_dir / dev_stack.STACK_FILE).read_text())

    def servers(self) -> dict:
        return json.loads((self.run_dir / "triton" / "servers.json").read_text())

    def triton_pid(self, model: str) -> int:
        return json.loads((self.run_dir / "triton" / "pids.json").read_text())[model]

    def restart(self, service: str) -> float:
        """`python -m funchat.dev.stack restart SERVICE`, as `make restart` runs it -> seconds it took."""
        t = time.monotonic()
        rc = dev_stack.main(["restart", service, "--run-dir", str(self.run_dir), "--timeout", "180"])
        assert rc == 0, f"restart {service} failed (rc {rc})"
        return time.monotonic() - t

    def log_tails(self) -> str:
        logs = [self.run_dir / "orchestrator.log", self.run_dir / "redis" / "redis.log",
                *sorted((self.run_dir / "triton").glob("*.log"))]
        return "\n".join(f"---- {p} ----\n{tail(p, 60)}" for p in logs)

    @contextmanager
    def logs_on_failure(self):
        try:
            yield
        except BaseException as exc:
            raise AssertionError(f"{type(exc).__name__}: {exc}\n\nlogs of the stack:\n{self.log_tails()}") from exc


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults-stack")
    args = ["--run-dir", str(run_dir)]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FUNCHAT_API_KEY", raising=False)
        # A call waits, silent, while a model server restarts (a minute and more on a loaded 2-core
        # machine): longer than the default idle timeout, which would end it (what it is for)
        mp.setenv("FUNCHAT_IDLE_TIMEOUT_S", "600")
        for attempt in range(2):  # Ray's own 30 s start-up limit can pass on a loaded machine: once more
            rc = dev_stack.main(["up", *args, "--checkpoint", str(tiny_checkpoint), "--grpc-port", str(free_port()),
                                 "--replicas", "2", "--timeout", "300"])
            if rc == 0 or "node timed out during startup" not in tail(run_dir / "orchestrator.log", 5):
                break
        try:
            assert rc == 0, "make up's stack did not start:\n" + Stack(run_dir, "", {}).log_tails()
            endpoints = json.loads((run_dir / "endpoints.json").read_text())
            mp.setenv("FUNCHAT_API_KEY", dev_stack.read_api_key(run_dir))  # the clients' key, as a user's shell
            yield Stack(run_dir, endpoints["orchestrator"], endpoints)
        finally:
            dev_stack.main(["down", *args])
            if FAULTS:
                print("\n| fault | what the caller saw | status after (ms) | restart (s) | to next turn done (s) |")
                print("|---|---|---|---|---|")
                for f in FAULTS:
                    print(f"| {f['fault']} | {f['saw']} | {f['status_ms']:.0f} | {f['restart_s']:.1f} | "
                          f"{f['recovered_s']:.1f} |")


def config(**kw):
    return session_config(turn_detection="manual", greedy=True, seed=0, max_new_tokens=MAX_NEW, **kw)


def oracle_tokens(pipeline, audio: np.ndarray, history: list[np.ndarray | str]) -> list[int]:
    """The oracle's greedy text tokens for `audio` after `history`: user speech (arrays) and
    assistant replies (texts), oldest first."""
    turns = [{"role": "assistant" if isinstance(t, str) else "user", "content": t} for t in history]
    return pipeline.respond(audio, history=turns, gen=GenerationConfig.greedy(Mode.S2S, MAX_NEW)).text_tokens


def live_sequences(stack: Stack) -> dict[str, float | None]:
    """The llm's and refined_head's `funchat_<service>_live_sequences` (None: not exported)."""
    servers, values = stack.servers(), {}
    for service in STATEFUL:
        text = urllib.request.urlopen(f"http://{servers[service]['metrics']}/metrics", timeout=10).read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith(f"funchat_{service}_live_sequences")]
        values[service] = float(lines[0].rsplit(" ", 1)[1]) if lines else None
    return values


def assert_no_live_sequences(stack: Stack, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (live := live_sequences(stack)) != dict.fromkeys(STATEFUL, 0.0):
        assert time.monotonic() < deadline, f"KV slots still held {timeout:g} s after the calls ended: {live}"
        time.sleep(0.2)


def orchestrator_tasks(stack: Stack) -> float:
    """`funchat_orchestrator_tasks`, summed over the live replicas: call and turn tasks still running."""
    target = json.loads((stack.run_dir / "endpoints.json").read_text())["orchestrator_metrics"]
    text = urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("funchat_orchestrator_tasks")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def assert_no_leaked_tasks(stack: Stack, timeout: float = 20.0) -> None:
    """Once no call is open, no task of a call or a turn is left in any replica (the tenant-limit
    renewer ends within a third of FUNCHAT_TENANT_SLOT_LEASE_S of the last call)."""
    deadline = time.monotonic() + timeout
    while (tasks := orchestrator_tasks(stack)) != 0:
        assert time.monotonic() < deadline, f"{tasks:g} tasks still running {timeout:g} s after the calls ended"
        time.sleep(0.5)


async def get_session(stack: Stack, session_id: str):
    async with AsyncClient(stack.target, timeout=10) as client:
        return await client.get_session(session_id)


def history_of(session) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in session.turns]


def kill_group(pid: int) -> None:
    """SIGKILL a process and its group (a tritonserver with its Python backend stubs: a lost container)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        os.kill(pid, signal.SIGKILL)


async def turn(call, audio: np.ndarray, stack: Stack, on_event=None):
    """Send one turn, read events to its response_done (on_event(kind, t) sees each one as it comes)."""
    replies = len(call.replies)
    await call.send_audio(audio)
    await call.commit()
    async for event in call.events():
        kind = event.WhichOneof("event")
        if on_event is not None:
            await on_event(kind, time.monotonic())
        if kind == "response_done":
            break
    assert len(call.replies) > replies, "the call ended OK without answering the turn"
    reply = call.replies[-1]
    if reply.status == "completed":
        stack.acknowledged.setdefault(call.session.session_id, []).append(reply.text)
    return reply


# ---- a model server killed mid-turn ----

# When to kill each one: the audio tokenizer only works between the commit and the first reply
# event (killed at the commit); the llm and refined head after the first text of the reply; the
# vocoder after the first audio chunk. One replica each: the caller hears the failure, the session
# is idle again, and the next turn works once `restart` has brought the server back.
KILL_AT = {"audio_tokenizer": "commit", "llm": "text_delta", "refined_head": "text_delta",
           "vocoder": "audio_delta"}


@pytest.mark.parametrize("model", list(KILL_AT))
def test_model_server_killed_mid_turn(stack, model, tiny_pipeline, speech):
    a, b = pcm16_samples(speech[:40000]), pcm16_samples(speech[40000:88000])

    async def main():
        async with AsyncClient(stack.target) as client:
            async with client.converse(config()) as call:
                first = await turn(call, a, stack)
                killed = {}

                async def kill_on(kind, t):
                    if kind == KILL_AT[model] and not killed:
                        kill_group(stack.triton_pid(model))
                        killed["at"] = time.monotonic()

                if KILL_AT[model] == "commit":
                    await call.send_audio(b)
                    kill_group(stack.triton_pid(model))
                    killed["at"] = time.monotonic()
                    await call.commit()
                    async for event in call.events():
                        if event.WhichOneof("event") == "response_done":
                            break
                    failed = call.replies[-1]
                else:
                    failed = await turn(call, b, stack, kill_on)
                status_ms = (time.monotonic() - killed["at"]) * 1000
                during = await get_session(stack, call.session.session_id)
                restart_s = stack.restart(model)
                live_after_restart = live_sequences(stack)
                # the orchestrator's channel to the server retries at least every RECONNECT_BACKOFF_MS
                # (jittered by up to 20%): then it has found the server again
                await asyncio.sleep(RECONNECT_BACKOFF_MS * 1.5 / 1000)
                again = await turn(call, b, stack)
                recovered_s = time.monotonic() - killed["at"]
                return call.session, first, failed, during, status_ms, restart_s, live_after_restart, again, \
                    recovered_s

    with stack.logs_on_failure():
        created, first, failed, during, status_ms, restart_s, live_after, again, recovered_s = asyncio.run(main())
        assert first.status == "completed"
        # a clear status: the turn failed, naming the service, UNAVAILABLE (worth a retry)
        assert failed.status == "failed", (failed.status, failed.errors)
        assert [e.code for e in failed.errors] == ["UNAVAILABLE"], failed.errors
        words = model.replace("_", " ") if model == "audio_tokenizer" else model
        assert words in failed.errors[0].message, failed.errors[0].message
        # the session is not stuck "responding"; the acknowledged turn is there. The failed caller turn
        # is kept when its speech was encoded (the next turn is answered with it), not when the
        # encoding failed (the caller sends it again)
        assert during.state == "listening", during.state
        kept = model != "audio_tokenizer"
        assert history_of(during) == [("user", ""), ("assistant", first.text)] + [("user", "")] * kept
        assert live_after == dict.fromkeys(STATEFUL, 0.0), f"KV slots held after the failed turn: {live_after}"
        # the next turn on the same call completes, as the oracle answers it
        assert again.status == "completed", (again.status, again.errors)
        assert first.text_tokens == oracle_tokens(tiny_pipeline, a, [])
        assert again.text_tokens == oracle_tokens(tiny_pipeline, b, [a, first.text] + [b] * kept)
        assert_no_live_sequences(stack)
        assert_no_leaked_tasks(stack)
        session = asyncio.run(get_session(stack, created.session_id))
        assert [text for role, text in history_of(session) if role == "assistant"] == [first.text, again.text]
        assert session.state == "listening"
    FAULTS.append({"fault": f"kill -9 {model} (at {KILL_AT[model]})",
                   "saw": f"error {failed.errors[0].code} + response_done failed", "status_ms": status_ms,
                   "restart_s": restart_s, "recovered_s": recovered_s})
    print(f"{model}: failed turn's status {status_ms:.0f} ms after the kill; restart {restart_s:.1f} s; next turn "
          f"done {recovered_s:.1f} s after the kill")


# ---- an orchestrator replica killed mid-call ----

def redis_client(stack: Stack) -> redis.Redis:
    """A client of the stack's redis-server (password and TLS CA from the files `up` names)."""
    ep = stack.endpoints
    return redis.Redis.from_url(ep["redis"], password=Path(ep["redis_password_file"]).read_text().strip() or None,
                                ssl_ca_certs=ep.get("redis_ca_file"))


def serving_replica(stack: Stack, session_id: str) -> int:
    """The pid of the Ray Serve replica running the session's turn (the session's owner, "host:pid")."""
    client = redis_client(stack)
    try:
        meta = json.loads(client.get(f"funchat:session:{session_id}"))
    finally:
        client.close()
    assert meta["state"] == "responding" and meta["owner"], meta
    pid = int(meta["owner"].rsplit(":", 1)[1])
    title = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"ServeReplica" in title, f"the owner {pid} is not a Ray Serve replica: {title!r}"
    return pid


def test_orchestrator_replica_killed_mid_call(stack, tiny_pipeline, speech):
    """Two replicas (`up --replicas 2`): the one serving the call is SIGKILLed while it generates. The
    caller hears the call end with a status, resumes the session with its resume token in a new
    call (on the surviving replica: Ray Serve restarts the dead one meanwhile), and the turn sent
    again is answered with the history intact."""
    a, b = pcm16_samples(speech[:40000]), pcm16_samples(speech[40000:88000])

    async def main():
        async with AsyncClient(stack.target) as client:
            call = client.converse(config())
            await call.start()
            first = await turn(call, a, stack)
            killed = {}

            async def kill_on(kind, t):
                if kind == "text_delta" and not killed:
                    killed["pid"] = serving_replica(stack, call.session.session_id)
                    os.kill(killed["pid"], signal.SIGKILL)
                    killed["at"] = time.monotonic()

            try:
                await asyncio.wait_for(turn(call, b, stack, kill_on), 60)
                saw = f"the turn ended {call.replies[-1].status}"
            except FunchatClientError as exc:
                saw = exc
            status_ms = (time.monotonic() - killed["at"]) * 1000
            call.abort()
            # resume in a new call; a call routed to the dead replica before Serve notices is refused
            attempts = []
            while True:
                again_call = client.converse(config(resume_token=call.session.resume_token))
                try:
                    await again_call.start()
                    break
                except FunchatClientError as exc:
                    attempts.append(exc)
                    assert time.monotonic() - killed["at"] < 60, f"could not resume: {attempts}"
                    await asyncio.sleep(0.5)
            resumed_s = time.monotonic() - killed["at"]
            during = await get_session(stack, call.session.session_id)
            # the dead replica's turn held the session's lease: until it lapses the turn is refused
            # ABORTED (one turn at a time), and the caller sends it again
            refused = []
            while (again := await turn(again_call, b, stack)).status != "completed":
                refused.append(again)
                assert again.errors and again.errors[0].code == "ABORTED", (again.status, again.errors)
                assert time.monotonic() - killed["at"] < 60, "the session stayed busy for a minute"
                await asyncio.sleep(1.0)
            recovered_s = time.monotonic() - killed["at"]
            await again_call.close()
            return call.session, again_call.session, first, saw, status_ms, attempts, resumed_s, during, refused, \
                again, recovered_s

    with stack.logs_on_failure():
        created, resumed, first, saw, status_ms, attempts, resumed_s, during, refused, again, recovered_s = \
            asyncio.run(main())
        assert first.status == "completed"
        # the call ended with a gRPC status the caller can act on (not a hang, not OK)
        assert isinstance(saw, FunchatClientError), saw
        # the gateway turns Ray's "actor died" INTERNAL into UNAVAILABLE with what to do (forward.py)
        assert saw.code == "UNAVAILABLE" and "resume_token" in saw.message, saw
        assert resumed.session_id == created.session_id and resumed.resumed and resumed.turns == 2
        assert history_of(during)[:2] == [("user", ""), ("assistant", first.text)]
        assert again.text_tokens == oracle_tokens(tiny_pipeline, b, [a, first.text])
        session = asyncio.run(get_session(stack, created.session_id))
        assert [text for role, text in history_of(session) if role == "assistant"] == [first.text, again.text]
        assert session.state == "listening"
        assert_no_live_sequences(stack)
        assert_no_leaked_tasks(stack)  # the surviving replica's; the dead one's gauge is dropped
    print(f"orchestrator replica: the call ended {saw.code} {status_ms:.0f} ms after the kill "
          f"({saw.message[:120]!r}); resumed after {resumed_s:.1f} s ({len(attempts)} refused: "
          f"{sorted({f'{e.code}: {e.message[:100]}' for e in attempts})}); state while "
          f"resumed {during.state!r}; {len(refused)} turns refused ABORTED; next turn done {recovered_s:.1f} s "
          "after the kill")
    FAULTS.append({"fault": "kill -9 orchestrator replica (mid-turn, 2 replicas)",
                   "saw": f"call ended {saw.code} (Ray: the actor died); resuming refused ABORTED until the dead "
                          f"turn's session lease lapsed ({len(attempts)} tries), then the turn resent completed",
                   "status_ms": status_ms, "restart_s": resumed_s, "recovered_s": recovered_s})


# ---- redis-server killed and restarted ----

def test_redis_killed_then_restarted_keeps_the_sessions(stack, tiny_pipeline, speech):
    """SIGKILL redis-server between two turns of a call: the turn tried while it is down fails
    UNAVAILABLE naming the session store, the call stays open; `restart redis` brings it back with
    its append-only file, the session's history is all there and the turn sent again is answered."""
    a, b = pcm16_samples(speech[:40000]), pcm16_samples(speech[40000:88000])

    async def main():
        async with AsyncClient(stack.target) as client:
            async with client.converse(config()) as call:
                first = await turn(call, a, stack)
                kill_group(stack.state()["redis_pid"])
                t_kill = time.monotonic()
                failed = await turn(call, b, stack)
                status_ms = (time.monotonic() - t_kill) * 1000
                with pytest.raises(FunchatClientError) as get_err:
                    await get_session(stack, call.session.session_id)
                restart_s = stack.restart("redis")
                during = await get_session(stack, call.session.session_id)
                again = await turn(call, b, stack)
                recovered_s = time.monotonic() - t_kill
                return call.session, first, failed, status_ms, get_err.value, restart_s, during, again, recovered_s

    with stack.logs_on_failure():
        created, first, failed, status_ms, get_err, restart_s, during, again, recovered_s = asyncio.run(main())
        assert first.status == "completed"
        assert failed.status == "failed" and [e.code for e in failed.errors] == ["UNAVAILABLE"], failed.errors
        assert "session store" in failed.errors[0].message, failed.errors[0].message
        assert get_err.code == "UNAVAILABLE" and "session store" in get_err.message, get_err
        # the acknowledged turn survived the SIGKILL (the append-only file), nothing of the failed one
        assert history_of(during) == [("user", ""), ("assistant", first.text)], history_of(during)
        assert during.state == "listening"
        assert again.status == "completed", (again.status, again.errors)
        assert again.text_tokens == oracle_tokens(tiny_pipeline, b, [a, first.text])
    print(f"redis: the turn failed {failed.errors[0].code} {status_ms:.0f} ms after the kill "
          f"({failed.errors[0].message[:100]!r}); restart {restart_s:.1f} s; next turn done {recovered_s:.1f} s")
    FAULTS.append({"fault": "kill -9 redis-server (between turns)",
                   "saw": "error UNAVAILABLE (session store) + response_done failed; call stayed open",
                   "status_ms": status_ms, "restart_s": restart_s, "recovered_s": recovered_s})


def test_no_acknowledged_turn_was_lost_and_no_kv_slot_leaked(stack):
    """Last: every reply of this module that ended `completed` is in its session's history, after all
    the faults above (the Redis restart among them) and a `restart orchestrator` (a new process on
    the same port: Ray, Serve, the gateway); no llm / refined_head sequence and no orchestrator task is left."""
    assert stack.acknowledged, "no turn was acknowledged: the tests above did not run"
    assert_no_leaked_tasks(stack)  # after every fault above, the Redis restart among them
    old_pid = stack.state()["orchestrator_pid"]
    with stack.logs_on_failure():
        restart_s = stack.restart("orchestrator")
    assert stack.state()["orchestrator_pid"] != old_pid
    assert json.loads((stack.run_dir / "endpoints.json").read_text())["orchestrator"] == stack.target
    print(f"restart orchestrator: serving again after {restart_s:.1f} s")
    for session_id, texts in stack.acknowledged.items():
        session = asyncio.run(get_session(stack, session_id))
        assert [text for role, text in history_of(session) if role == "assistant"] == texts, session_id
    assert_no_live_sequences(stack)

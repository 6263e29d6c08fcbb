"""Shared test fixtures: where ../shared is, a tiny checkpoint written once per session, API keys."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("FUNCHAT_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    assert path.is_dir(), f"the shared folder is missing at {path} (set FUNCHAT_SHARED)"
    return path


@pytest.fixture(scope="session")
def example_wav(shared: Path) -> Path:
    return shared / "data" / "fun-audio-chat-example-16k-f32.wav"


@pytest.fixture(scope="session")
def speech(example_wav):
    """The recording's samples (float32, 16 kHz)."""
    from funchat.audio_io import load_audio

    return load_audio(example_wav)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from funchat.model.init_checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from funchat.oracle.pipeline import ReferencePipeline

    return ReferencePipeline(tiny_checkpoint)


# What a package build reads: a copy of these builds like the checkout, without its generated API code.
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "protos", "funchat"]


def copy_build_inputs(dst: Path) -> Path:
    """A copy of the package's build inputs in dst (no generated code, no caches) -> dst."""
    generated = REPO / "funchat" / "v1"

    def leave_out(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__" or n.endswith(".pyc") or Path(folder, n) == generated]

    dst.mkdir(parents=True)
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=leave_out)
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="session")
def copy_sources():
    """copy_build_inputs, for the tests that build the package."""
    return copy_build_inputs


@pytest.fixture
def no_funchat_env(monkeypatch):
    """Only what a test sets: no FUNCHAT_* from the shell running the tests."""
    for name in list(os.environ):
        if name.startswith("FUNCHAT_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def make_api_key():
    """make_api_key(run_dir, tenant="dev") -> (keys_file, key): a real API key (funchat.api_keys.create_key)
    added to run_dir/api_keys, the key file an orchestrator reads (FUNCHAT_API_KEYS_FILE). Calls send
    it with `funchat.client.authed_stub(stub, key)`, a client's `api_key=`, or FUNCHAT_API_KEY."""
    def make(run_dir: Path, tenant: str = "dev") -> tuple[Path, str]:
        from funchat.api_keys import create_key

        keys_file = Path(run_dir) / "api_keys"
        key, _ = create_key(keys_file, tenant)
        return keys_file, key
    return make


STAND_IN_KEY = "fck_abcdefgh23_" + "k" * 52  # the shape of a key (funchat.api_keys)


@pytest.fixture
def stand_in():
    """A funchat server stand-in on a free 127.0.0.1 port (`.target`), for the client side's tests:
    it records each RPC's authorization metadata in `.seen` as (method, values) and answers
    UNAUTHENTICATED unless it is exactly `Bearer <.key>`, as the orchestrator does; the health
    check needs no key. Respond and a committed Converse turn answer one completed reply "hi";
    GetSession finds any session, DeleteSession deletes it."""
    import itertools
    import threading
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from funchat.api import pb, pb_grpc

    class StandIn(pb_grpc.FunchatServicer):
        key = STAND_IN_KEY
        refused = "missing authorization metadata: send `authorization: Bearer <key>`"

        def __init__(self):
            self.seen: list[tuple[str, list[str]]] = []
            self.lock = threading.Lock()
            self.target = ""

        def record(self, method: str, context) -> list[str]:
            values = [v for k, v in context.invocation_metadata() if k == "authorization"]
            with self.lock:
                self.seen.append((method, values))
            return values

        def check(self, method: str, context) -> None:
            if self.record(method, context) != [f"Bearer {self.key}"]:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, self.refused)

        def GetSession(self, request, context):
            self.check("GetSession", context)
            return pb.Session(session_id=request.session_id, state="listening")

        def DeleteSession(self, request, context):
            self.check("DeleteSession", context)
            return pb.DeleteSessionResponse(deleted=True)

        def _reply(self):
            yield pb.ServerEvent(response_created=pb.ResponseCreated(response_id="resp_1"))
            yield pb.ServerEvent(text_delta=pb.TextDelta(response_id="resp_1", delta="hi"))
            yield pb.ServerEvent(audio_delta=pb.AudioDelta(response_id="resp_1", sequence=0, pcm16=b"\0\0" * 2400,
                                                           sample_rate_hz=24000))
            yield pb.ServerEvent(response_done=pb.ResponseDone(response_id="resp_1", status="completed", text="hi",
                                                               audio_ms=100))

        def Respond(self, request, context):
            self.check("Respond", context)
            yield pb.ServerEvent(session_created=pb.SessionCreated(session_id="sess_1"))
            yield from self._reply()

        def Converse(self, request_iterator, context):
            # the first event is read before the check: a status sent before the client's first write
            # lands can be replaced by INTERNAL "Internal error from Core" on the client (grpc/grpc#36066)
            first = next(request_iterator, None)
            self.check("Converse", context)
            for event in itertools.chain([first] if first is not None else [], request_iterator):
                kind = event.WhichOneof("event")
                if kind == "session":
                    yield pb.ServerEvent(session_created=pb.SessionCreated(session_id="sess_2"))
                elif kind == "commit":
                    yield from self._reply()
                elif kind == "end":
                    return

    class Health(health.HealthServicer):
        def Check(self, request, context):
            servicer.record("Check", context)
            return super().Check(request, context)

    servicer = StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    pb_grpc.add_FunchatServicer_to_server(servicer, server)
    health_servicer = Health()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    servicer.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    server.stop(None)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Certificates for TLS tests, made with the `cryptography` package: two CAs ("ca", the one the
    clients trust, and "other"), each with a server certificate for localhost / 127.0.0.1 and a
    client certificate. Returns {"root": folder, "ca_file", "other_ca_file": PEM paths, "server",
    "other_server", "client", "other_client": (cert, key) PEM paths, "issue": issue(ca_name, folder,
    cn, client) for more}. Each pair is a folder holding tls.crt and tls.key, as a mounted
    Kubernetes TLS Secret does."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1)))

    cas = {}
    root = tmp_path_factory.mktemp("pki")
    for ca_name in ("ca", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(f"funchat test {ca_name}", name(f"funchat test {ca_name}"), key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        cas[ca_name] = (cert, key)
        (root / f"{ca_name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(ca_name: str, folder: Path, cn: str = "localhost", client: bool = False) -> tuple[Path, Path]:
        ca_cert, ca_key = cas[ca_name]
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = builder(cn, ca_cert.subject, key.public_key()).add_extension(x509.ExtendedKeyUsage([usage]),
                                                                             critical=False)
        if not client:
            cert = cert.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tls.crt").write_bytes(cert.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        (folder / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        return folder / "tls.crt", folder / "tls.key"

    return {"root": root, "ca_file": root / "ca.pem", "other_ca_file": root / "other.pem", "issue": issue,
            "server": issue("ca", root / "server"), "other_server": issue("other", root / "other-server"),
            "client": issue("ca", root / "client", "caller", client=True),
            "other_client": issue("other", root / "other-client", "stranger", client=True)}


@pytest.fixture(scope="session")
def tool_checkpoint(tiny_checkpoint, speech, tmp_path_factory) -> Path:
    """`tiny_checkpoint` with its LLM fine-tuned (a few seconds on CPU) so that the greedy reply to
    `tool_clip(speech)` (the recording's first 3 s, as PCM16), with `WEATHER_TOOL` as the only tool,
    is exactly the call get_weather(city="Paris") (funchat.dev.tool_checkpoint)."""
    from funchat.dev.tool_checkpoint import build_tool_checkpoint, tool_clip

    return build_tool_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("tool-ckpt"), tool_clip(speech)).checkpoint

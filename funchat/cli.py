"""The `funchat` command line.

Each command imports what it needs when it runs: `chat`, `call` and `keys` (and `--help`) work with
only `funchat[client]` installed (no torch), the other commands import the model, the oracle or the
vocoder.

`chat` and `call` send the API key from the environment variable FUNCHAT_API_KEY (or the file
--api-key-file names; never a flag holding the key, which `ps` would show to every user); a server
that refuses it (UNAUTHENTICATED) gets a one-line error saying what to set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from funchat.errors import FunchatError  # no dependencies; AudioInputError and the model's errors derive from it


class CommandError(Exception):
    """A failure a command reports as its one-line error message (exit status 2)."""


# The extra (pyproject.toml) that installs a third-party module a command imports, for the message
# of a command run where its extra is not installed.
EXTRA_OF_MODULE = {"grpc": "client", "grpc_health": "client", "google": "client",
                   "torch": "models", "safetensors": "models", "tokenizers": "models", "yaml": "models"}


def _cmd_init_checkpoint(args: argparse.Namespace) -> None:
    from funchat.model.init_checkpoint import init_checkpoint

    t0 = time.perf_counter()
    out = init_checkpoint(args.preset, args.out, seed=args.seed,
                          max_shard_bytes=int(args.shard_mb * 2**20) if args.shard_mb else None,
                          vocoder=not args.no_vocoder)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out} in {time.perf_counter() - t0:.2f} s")


def _cmd_respond(args: argparse.Namespace) -> None:
    import torch

    from funchat.audio_io import load_audio
    from funchat.oracle.generation import GenerationConfig
    from funchat.model.sampling import GREEDY, SamplingParams
    from funchat.oracle.pipeline import ReferencePipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipeline = ReferencePipeline(args.checkpoint, dtype=args.dtype, device=args.device)
    t_load = time.perf_counter() - t0
    audio = load_audio(args.input)
    tools = json.loads(Path(args.tools).read_text()) if args.tools else None
    speech = GREEDY if args.greedy else SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                                       top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    gen = GenerationConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, text=GREEDY, speech=speech,
                           seed=args.seed)
    vocoder = None
    if args.output:  # load the vocoder first: a missing one should fail before the turn runs
        from funchat.vocoder.checkpoint import pick_speaker
        from funchat.vocoder.synthesize import load_any_vocoder

        vocoder, speakers = load_any_vocoder(args.checkpoint)
        xvec = pick_speaker(speakers, args.speaker)
    result = pipeline.respond(audio, mode=args.mode, system_prompt=args.system_prompt, tools=tools, gen=gen)
    payload = dict(result.to_json(), checkpoint=str(args.checkpoint), input=str(args.input),
                   greedy=args.greedy, seed=args.seed)
    if args.output_tokens:
        Path(args.output_tokens).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_tokens).write_text(json.dumps(payload, ensure_ascii=False) + "\n")
    t = result.timings
    print(f"input      {args.input} ({len(audio) / 16000:.2f} s, {result.prompt_tokens} prompt tokens)")
    print(f"mode       {result.mode}  greedy={args.greedy}  seed={args.seed}")
    shown = result.text if len(result.text) <= 160 else result.text[:160] + f"… ({len(result.text)} characters)"
    print(f"text       {shown!r}")
    print(f"tokens     {len(result.text_tokens)} text, {len(result.speech_tokens)} speech "
          f"({len(result.vocoder_tokens)} for the vocoder)")
    print("time (ms)  load {:.1f} | mel {:.1f} | encoder {:.1f} | LLM prefill {:.1f} | SRH prefill {:.1f} | "
          "LLM step {:.2f} | SRH step {:.2f} | decode {:.1f} | turn {:.1f}".format(
              t_load * 1e3, t["mel"] * 1e3, t["encoder"] * 1e3, t["llm_prefill"] * 1e3, t["srh_prefill"] * 1e3,
              t["llm_step_mean"] * 1e3, t["srh_step_mean"] * 1e3, t["decode"] * 1e3, t["total"] * 1e3))
    if args.output_tokens:
        print(f"tokens written to {args.output_tokens}")
    if vocoder is not None:
        from funchat.vocoder.synthesize import synthesize, write_wav

        if not result.vocoder_tokens:
            print(f"no speech to write ({result.mode} mode, {len(result.speech_tokens)} speech tokens)")
            return
        t0 = time.perf_counter()
        wav, info = synthesize(vocoder, result.speech_tokens, xvec, stream=args.stream)
        took = time.perf_counter() - t0
        write_wav(args.output, wav, vocoder.cfg.sample_rate)
        seconds = wav.numel() / vocoder.cfg.sample_rate
        print(f"speech     {args.output}: {seconds:.2f} s at {vocoder.cfg.sample_rate} Hz, vocoder {took * 1e3:.1f} ms "
              f"(RTF {took / seconds:.3f}), {info['dropped_codes']} special codes dropped")


def _cmd_synthesize(args: argparse.Namespace) -> None:
    import torch

    from funchat.vocoder.checkpoint import load_speaker_file, pick_speaker
    from funchat.vocoder.synthesize import load_any_vocoder, read_tokens, synthesize, write_wav

    if args.threads:
        torch.set_num_threads(args.threads)
    model, speakers = load_any_vocoder(args.checkpoint)
    xvec = torch.from_numpy(load_speaker_file(args.speaker_embedding)) if args.speaker_embedding \
        else pick_speaker(speakers, args.speaker)
    tokens = read_tokens(args.tokens)
    t0 = time.perf_counter()
    wav, info = synthesize(model, tokens, xvec, stream=args.stream, mode=args.stream_mode)
    took = time.perf_counter() - t0
    write_wav(args.output, wav, model.cfg.sample_rate)
    seconds = wav.numel() / model.cfg.sample_rate
    how = f"streamed ({args.stream_mode}, {info['chunks']} chunks)" if args.stream else "offline"
    print(f"wrote {args.output}: {seconds:.2f} s at {model.cfg.sample_rate} Hz from {len(tokens)} tokens, {how}, "
          f"{took * 1e3:.1f} ms (RTF {took / seconds:.3f}); {info['dropped_codes']} codes outside 0..{model.cfg.codes - 1} dropped")


def _cmd_vocoder_dump(args: argparse.Namespace) -> None:
    import numpy as np

    from funchat.vocoder.checkpoint import load_speaker_file
    from funchat.vocoder.synthesize import load_any_vocoder, read_tokens, vocoder_dump

    model, _ = load_any_vocoder(args.checkpoint)
    arrays = vocoder_dump(model, read_tokens(args.tokens), load_speaker_file(args.speaker_embedding), args.stream_mode)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"wrote {len(arrays)} arrays to {args.out}: {arrays['off_wav'].shape[1]} samples, "
          f"{len(arrays['st_calls'])} {args.stream_mode} streaming calls")


def _cmd_import_cosyvoice(args: argparse.Namespace) -> None:
    from funchat.vocoder.checkpoint import VOCODER_DIR, import_cosyvoice

    out = Path(args.out)
    target = out / VOCODER_DIR if (out / "config.json").exists() and not (out / "flow.pt").exists() else out
    import_cosyvoice(args.src, target)
    print(f"imported {args.src} into {target}")


def _cmd_reference_dump(args: argparse.Namespace) -> None:
    from funchat.oracle.reference_dump import run_reference_dump

    arrays = run_reference_dump(args.checkpoint, args.features, args.prompt_ids, args.out, mode=args.mode,
                                max_new_tokens=args.max_new_tokens)
    print(f"wrote {len(arrays)} arrays to {args.out}: {len(arrays['gen_text_ids'][0])} text ids, "
          f"{arrays['gen_speech_ids'].shape[1]} speech ids")


def _server_address(value: str) -> str:
    """argparse type of --server: HOST:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


API_KEY_HELP = ("file holding the API key to send (default: the environment variable FUNCHAT_API_KEY; "
                "there is no flag for the key itself: a command line is visible to every user in `ps`)")


class _RefuseKeyFlag(argparse.Action):
    """`--api-key`: refused (a key on a command line leaks into `ps`), without repeating the value.
    It exists so that `--api-key KEY` is not taken for an abbreviation of --api-key-file."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("there is no --api-key flag (a command line is visible to every user in `ps`): set the "
                     "environment variable FUNCHAT_API_KEY, or give --api-key-file PATH")


def _api_key(args: argparse.Namespace) -> tuple[str, str]:
    """(the API key chat/call send, where it came from): --api-key-file, else $FUNCHAT_API_KEY; ("", "")
    when neither gives one. Messages name the file, never its content."""
    from funchat.client import API_KEY_ENV, resolve_api_key

    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise CommandError(f"cannot read the API key file {path}: {reason}") from None
        try:
            key = resolve_api_key(text)
        except ValueError:
            raise CommandError(f"the API key file {path} does not hold a key alone (whitespace or non-ASCII "
                               f"characters inside): it must hold the key as `funchat keys create` prints "
                               f"it") from None
        if not key:
            raise CommandError(f"the API key file {path} is empty")
        return key, f"--api-key-file {path}"
    try:
        key = resolve_api_key(None)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return (key, f"${API_KEY_ENV}") if key else ("", "")


def _tls(args: argparse.Namespace):
    """chat/call's TLS: the flags, else the environment (FUNCHAT_TLS_CA_FILE, FUNCHAT_TLS_CLIENT_CERT_FILE /
    _KEY_FILE, FUNCHAT_TLS=1); a TlsOptions, or False for plaintext."""
    from funchat.client import TlsOptions

    files = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
    if args.tls or any(files):
        return TlsOptions(*(Path(f) if f else None for f in files))
    return TlsOptions.from_env() or False


def _server_error(exc, server: str, key_source: str = "") -> CommandError:
    """A FunchatClientError (the client's own error type, not a FunchatError) as the command's message.
    key_source: where the API key sent came from ("" when none was sent), for UNAUTHENTICATED."""
    if exc.unreachable:
        return CommandError(f"cannot reach funchat server at {server} ({exc.code}): {exc.message}")
    if exc.code == "UNAUTHENTICATED":
        if key_source:
            hint = (f"the API key from {key_source} was refused; set FUNCHAT_API_KEY (or --api-key-file) to an "
                    f"active key of this server (`funchat keys list` shows them)")
        else:
            hint = ("no API key was sent: set FUNCHAT_API_KEY to a key of this server (`funchat keys create "
                    "--tenant NAME` makes one; for `make up`'s stack: export FUNCHAT_API_KEY=$(cat .run/api_key)) "
                    "or give --api-key-file")
        return CommandError(f"funchat server at {server} answered UNAUTHENTICATED: {exc.message}; {hint}")
    return CommandError(f"funchat server at {server} answered {exc.code}: {exc.message}")


def _client_config(args: argparse.Namespace):
    from funchat.client import session_config

    encoding, rate = args.output_format
    return session_config(mode=args.mode, instructions=args.system, voice=args.voice, greedy=args.greedy,
                          seed=args.seed, max_new_tokens=args.max_new_tokens, output_encoding=encoding,
                          output_sample_rate=rate)


def _output_format(text: str) -> tuple[str, int]:
    """--output-format ENCODING[:RATE] -> (encoding, rate); the rate defaults to 8000 for G.711 (the
    telephone's), else 24000 (the vocoder's). The server checks the rate's range."""
    from funchat.client.config import ENCODINGS, OUTPUT_SAMPLE_RATE

    encoding, _, rate = text.partition(":")
    if encoding not in ENCODINGS:
        raise argparse.ArgumentTypeError(f"unknown encoding {encoding!r}; use one of {', '.join(sorted(ENCODINGS))}")
    if not rate:
        return encoding, 8000 if encoding in ("pcmu", "pcma") else OUTPUT_SAMPLE_RATE
    if not rate.isdigit() or int(rate) <= 0:
        raise argparse.ArgumentTypeError(f"the rate must be a positive integer (Hz), got {rate!r}")
    return encoding, int(rate)


def _write_pcm16_wav(path: str | Path, samples, sample_rate: int) -> None:
    # As funchat.vocoder.synthesize.write_wav writes them (PCM16 via soundfile), without importing
    # torch into a network client.
    import numpy as np
    import soundfile as sf

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(samples, dtype=np.float32), sample_rate, subtype="PCM_16")


def _cmd_chat(args: argparse.Namespace) -> None:
    from funchat.audio_io import load_audio
    from funchat.client import Client, FunchatClientError

    key, key_source = _api_key(args)
    audio = load_audio(args.input)
    config = _client_config(args)
    try:
        client = Client(args.server, timeout=args.timeout, api_key=key, tls=_tls(args))
        reply = client.respond(audio, config, session_id=args.session)
    except FunchatClientError as exc:
        raise _server_error(exc, args.server, key_source) from None
    payload = dict(reply.tokens_json(), server=args.server, input=str(args.input), greedy=args.greedy,
                   seed=args.seed, session_id=reply.session_id, status=reply.status)
    if args.output_tokens:
        Path(args.output_tokens).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_tokens).write_text(json.dumps(payload, ensure_ascii=False) + "\n")
    if args.output_text:
        Path(args.output_text).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_text).write_text(reply.text + "\n")
    print(f"server     {args.server}  session {reply.session_id}")
    print(f"input      {args.input} ({len(audio) / 16000:.2f} s, {payload['prompt_tokens']} prompt tokens)")
    print(f"mode       {reply.mode}  greedy={args.greedy}  seed={args.seed}  status={reply.status}")
    shown = reply.text if len(reply.text) <= 160 else reply.text[:160] + f"… ({len(reply.text)} characters)"
    print(f"text       {shown!r}")
    for call in reply.function_calls:
        print(f"function   {call['name']}({call['arguments_json']})  call_id={call['call_id']}")
    print(f"tokens     {len(reply.text_tokens)} text, {len(reply.speech_tokens)} speech "
          f"({len(reply.vocoder_tokens)} for the vocoder)")
    first = f"{reply.first_audio_s * 1e3:.1f} ms" if reply.first_audio_s is not None else "- (no audio)"
    stages = " | ".join(f"{k} {v:.1f}" for k, v in reply.latency_ms.items())
    print(f"latency    first audio {first} (client)" + (f"; server (ms): {stages}" if stages else ""))
    if args.output_tokens:
        print(f"tokens written to {args.output_tokens}")
    if args.output_text:
        print(f"text written to {args.output_text}")
    if args.output:
        if not len(reply.audio):
            print(f"no speech to write ({reply.mode} mode, {len(reply.speech_tokens)} speech tokens)")
            return
        # the reply as it came (e.g. G.711 at 8 kHz, decoded), written as PCM16 at its own rate
        _write_pcm16_wav(args.output, reply.audio, reply.sample_rate)
        print(f"speech     {args.output}: {reply.audio_s:.2f} s at {reply.sample_rate} Hz")


def _cmd_call(args: argparse.Namespace) -> None:
    import asyncio

    from funchat.audio_io import load_audio
    from funchat.client import AsyncClient, FunchatClientError, describe_event, stream_call

    if not 1 <= args.chunk_ms <= 1000:
        raise ValueError(f"--chunk-ms must be 1..1000 (the server takes at most 1 s per chunk), got {args.chunk_ms}")
    key, key_source = _api_key(args)
    tls = _tls(args)
    audio = load_audio(args.input)
    config = _client_config(args)

    def show(t: float, event) -> None:
        print(f"{t:8.3f} s  {describe_event(event)}", flush=True)

    async def run():
        async with AsyncClient(args.server, api_key=key, tls=tls) as client:
            return await stream_call(client, config, audio, realtime=not args.no_realtime, chunk_ms=args.chunk_ms,
                                     trailing_silence_ms=args.trailing_silence_ms, on_event=show,
                                     timeout_s=args.timeout)

    print(f"calling {args.server} with {args.input} ({len(audio) / 16000:.2f} s, "
          f"{'real time' if not args.no_realtime else 'as fast as possible'}, {args.chunk_ms} ms chunks)")
    try:
        result = asyncio.run(run())
    except FunchatClientError as exc:
        raise _server_error(exc, args.server, key_source) from None
    for i, reply in enumerate(result.replies):
        first = f"{reply.first_audio_s * 1e3:.0f} ms" if reply.first_audio_s is not None else "-"
        print(f"reply {i}    {reply.status}  first audio {first}  {reply.audio_s:.2f} s audio  text {reply.text!r}")
    if result.timed_out:
        print(f"timed out: replies still in progress after {args.timeout:g} s; the call was ended")
    if args.output:
        _write_pcm16_wav(args.output, result.audio, result.sample_rate)
        print(f"call       {args.output}: {len(result.audio) / result.sample_rate:.2f} s at {result.sample_rate} Hz "
              f"({len(result.replies)} replies)")


def _keys_file(args: argparse.Namespace) -> Path:
    from funchat.api_keys import default_keys_file

    return Path(args.keys_file) if args.keys_file else default_keys_file()


def _cmd_keys_create(args: argparse.Namespace) -> None:
    from funchat.api_keys import create_key

    path = _keys_file(args)
    key, entry = create_key(path, args.tenant)
    print(key)  # alone on stdout, for `KEY=$(funchat keys create ...)`
    print(f"funchat keys create: key id {entry.key_id} for tenant {entry.tenant}; its SHA-256 was added to {path} "
          f"(the key itself is not stored: keep it now)", file=sys.stderr)


def _cmd_keys_list(args: argparse.Namespace) -> None:
    from funchat.api_keys import list_keys

    path = _keys_file(args)
    entries = list_keys(path)
    if not entries:
        print(f"no keys in {path}")
        return
    width = max(len("TENANT"), *(len(e.tenant) for e in entries))
    print(f"{'KEY ID':<10}  {'TENANT':<{width}}  {'CREATED':<20}  STATUS")
    for e in entries:
        status = "active" if e.active else f"revoked {e.revoked}"
        print(f"{e.key_id:<10}  {e.tenant:<{width}}  {e.created:<20}  {status}")


def _cmd_keys_revoke(args: argparse.Namespace) -> None:
    from funchat.api_keys import RELOAD_INTERVAL_S, revoke_key

    path = _keys_file(args)
    entry, was_active = revoke_key(path, args.key_id)
    if was_active:
        print(f"revoked key {entry.key_id} (tenant {entry.tenant}) in {path}; servers reading this file reject it "
              f"within {RELOAD_INTERVAL_S:g} s")
    else:
        print(f"key {entry.key_id} (tenant {entry.tenant}) was already revoked on {entry.revoked}")


def _cmd_keys_limits(args: argparse.Namespace) -> None:
    from funchat.api_keys import RELOAD_INTERVAL_S, set_tenant_limits

    path = _keys_file(args)
    limits = set_tenant_limits(path, args.tenant, clear=args.clear, max_calls=args.max_calls,
                               rate_per_s=args.rate, burst=args.burst)
    own = ", ".join(f"{field} {value:g}" for field, value in limits.items()) or "none (the server's defaults)"
    print(f"tenant {args.tenant} in {path}: own limits {own}; servers reading this file apply them within "
          f"{RELOAD_INTERVAL_S:g} s")


def _add_keys_commands(sub) -> None:
    """`funchat keys create|list|revoke|limits`: the API key file (funchat.api_keys)."""
    keys = sub.add_parser("keys", help="API keys: create, list or revoke the keys of a key file; set a tenant's "
                                       "limits")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    file_help = "the key file (default: $FUNCHAT_API_KEYS_FILE, else .run/api_keys)"

    p = keys_sub.add_parser("create", help="print a new key for a tenant and add its hash to the key file")
    p.add_argument("--tenant", required=True, help="the tenant the key names: a-z 0-9 _ . -, at most 63 characters")
    p.add_argument("--keys-file", default=None, help=file_help)
    p.set_defaults(func=_cmd_keys_create, command="keys create")

    p = keys_sub.add_parser("list", help="the key ids, tenants and creation times of the key file")
    p.add_argument("--keys-file", default=None, help=file_help)
    p.set_defaults(func=_cmd_keys_list, command="keys list")

    p = keys_sub.add_parser("revoke", help="revoke a key (by its id, as `keys list` shows it)")
    p.add_argument("key_id", metavar="KEY_ID", help="the key id (a whole key works too)")
    p.add_argument("--keys-file", default=None, help=file_help)
    p.set_defaults(func=_cmd_keys_revoke, command="keys revoke")

    p = keys_sub.add_parser("limits", help="set a tenant's own limits (others keep the server's FUNCHAT_TENANT_* "
                                           "defaults); prints the tenant's limits")
    p.add_argument("--tenant", required=True, help="the tenant")
    p.add_argument("--max-calls", type=int, default=None, help="calls at once across all servers (0: no limit)")
    p.add_argument("--rate", type=float, default=None, help="RPCs per second, sustained (0: no limit)")
    p.add_argument("--burst", type=int, default=None, help="RPCs at once after a quiet spell (>= 1)")
    p.add_argument("--clear", action="store_true", help="remove the tenant's own limits (then the flags above)")
    p.add_argument("--keys-file", default=None, help=file_help)
    p.set_defaults(func=_cmd_keys_limits, command="keys limits")


def _add_client_args(p: argparse.ArgumentParser) -> None:
    """Flags `chat` and `call` share: the server, the API key's file and the session's settings."""
    p.add_argument("--server", required=True, type=_server_address, help="the funchat API, HOST:PORT")
    p.add_argument("--api-key-file", default=None, metavar="PATH", help=API_KEY_HELP)
    p.add_argument("--api-key", nargs="?", action=_RefuseKeyFlag, help=argparse.SUPPRESS)
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates (default: plaintext, "
                                                      "unless FUNCHAT_TLS=1 or the files below are set)")
    p.add_argument("--tls-ca-file", default=None, metavar="PEM",
                   help="TLS, trusting this CA (default: $FUNCHAT_TLS_CA_FILE)")
    p.add_argument("--tls-cert-file", default=None, metavar="PEM",
                   help="client certificate for a server asking for one, mTLS (default: $FUNCHAT_TLS_CLIENT_CERT_FILE)")
    p.add_argument("--tls-key-file", default=None, metavar="PEM",
                   help="its private key (default: $FUNCHAT_TLS_CLIENT_KEY_FILE)")
    p.add_argument("--input", required=True, help="WAV or FLAC, any rate, mono or stereo")
    p.add_argument("--mode", choices=["s2t", "s2s"], default="s2s")
    p.add_argument("--greedy", action="store_true", help="argmax for text and speech (no sampling)")
    p.add_argument("--seed", type=int, default=None, help="fixed seed for the draws (default: the server picks)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="reply length cap (0: the server's default)")
    p.add_argument("--system", default=None, help="persona appended to the mode instruction")
    p.add_argument("--voice", default=None, help="vocoder speaker name (default: the checkpoint's default)")
    p.add_argument("--output-format", type=_output_format, default=("pcm16", 24000), metavar="ENCODING[:RATE]",
                   help="the reply audio's format: pcm16, float32, pcmu or pcma, at RATE Hz (default pcm16:24000; "
                        "pcmu / pcma default to 8000, telephony); --output WAVs are written at that rate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funchat", description="Fun-Audio-Chat serving tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-checkpoint", help="write a random checkpoint directory in the public layout")
    p.add_argument("--preset", required=True, help="tiny, mid or 8b")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=float, default=None, help="split the weights into shards of this size")
    p.add_argument("--no-vocoder", action="store_true", help="do not write vocoder weights")
    p.set_defaults(func=_cmd_init_checkpoint)

    p = sub.add_parser("respond", help="one turn in process (the oracle): speech in, text and speech tokens out")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="WAV or FLAC, any rate, mono or stereo")
    p.add_argument("--mode", choices=["s2t", "s2s"], default="s2s")
    p.add_argument("--greedy", action="store_true", help="argmax for text and speech (no sampling)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-prompt", default=None, help="persona appended to the mode instruction")
    p.add_argument("--tools", default=None, help="JSON file with a list of tool definitions")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--output-tokens", default=None, help="write text, text_tokens, speech_tokens as JSON here")
    p.add_argument("--output", default=None, help="write the spoken reply (24 kHz WAV) here")
    p.add_argument("--speaker", default=None, help="vocoder speaker name (default: the checkpoint's default)")
    p.add_argument("--stream", action="store_true", help="vocode in streaming chunks (incremental mode)")
    p.set_defaults(func=_cmd_respond)

    p = sub.add_parser("synthesize", help="speech tokens -> 24 kHz WAV with the CosyVoice 3 vocoder")
    p.add_argument("--checkpoint", required=True, help="funchat checkpoint (its vocoder/ folder) or a vocoder folder")
    p.add_argument("--tokens", required=True, help="JSON as written by `funchat respond` (speech_tokens)")
    p.add_argument("--output", required=True)
    p.add_argument("--speaker", default=None, help="speaker name stored with the checkpoint")
    p.add_argument("--speaker-embedding", default=None, help=".npy 192-d x-vector instead of a named speaker")
    p.add_argument("--stream", action="store_true", help="synthesise chunk by chunk as a live call would")
    p.add_argument("--stream-mode", choices=["incremental", "reference"], default="incremental")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=_cmd_synthesize)

    p = sub.add_parser("vocoder-dump", help="tokens + x-vector through our vocoder; golden array names")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--speaker-embedding", required=True, help=".npy with 192 values")
    p.add_argument("--out", required=True)
    p.add_argument("--stream-mode", choices=["reference", "incremental"], default="reference")
    p.set_defaults(func=_cmd_vocoder_dump)

    p = sub.add_parser("import-cosyvoice", help="import a released CosyVoice 3 folder as our vocoder checkpoint")
    p.add_argument("--src", required=True, help="folder with cosyvoice3.yaml, flow.pt, hift.pt, spk2info.pt")
    p.add_argument("--out", required=True, help="a funchat checkpoint (written into its vocoder/) or a new folder")
    p.set_defaults(func=_cmd_import_cosyvoice)

    p = sub.add_parser("reference-dump", help="features + prompt ids through our model; golden array names")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--features", required=True, help=".npz with input_features [N, mels, F] (+ mask, speech_lengths)")
    p.add_argument("--prompt-ids", required=True, help="JSON: a list of ids or {input_ids, expand_audio}")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["s2s", "s2t"], default="s2s")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=_cmd_reference_dump)

    p = sub.add_parser("chat", help="one turn through a funchat server (Respond): speech in, text and speech out")
    _add_client_args(p)
    p.add_argument("--output", default=None, help="write the spoken reply (a WAV at the reply's rate) here")
    p.add_argument("--session", default=None, help="continue this session (its id, printed by an earlier chat)")
    p.add_argument("--output-tokens", default=None, help="write text and tokens as JSON here (as `respond` does)")
    p.add_argument("--output-text", default=None, help="write the reply text here")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of the request in seconds")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("call", help="stream a file into a live call (Converse) and record the replies")
    _add_client_args(p)
    p.add_argument("--output", default=None, help="write the call's reply audio timeline (a WAV at the reply's "
                                                  "rate) here")
    p.add_argument("--no-realtime", action="store_true", help="send the audio as fast as possible")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio per chunk sent (1..1000 ms)")
    p.add_argument("--trailing-silence-ms", type=int, default=1500,
                   help="silence sent after the file so that server VAD ends the last turn")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the replies after the audio is sent")
    p.set_defaults(func=_cmd_call)

    _add_keys_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    # FunchatError: bad input (audio files, checkpoints, key files); CommandError: the server's answer (chat, call);
    # ValueError: invalid option values, vocoder input errors (VocoderInputError).
    except (FunchatError, CommandError, ValueError) as exc:
        print(f"funchat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"funchat {args.command}: error: needs {exc.name}, which is not installed; "
              f"install funchat[{extra}]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

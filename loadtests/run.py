"""`make loadtest`: Locust headless against the local stack (`make up`) or HOST, outputs in one folder.

    python loadtests/run.py [--host HOST:PORT] [--users N] [--duration S] [--shape steady|step|spike]
        [--first-audio-p95-ms MS] [--max-underrun-turns N] [--max-error-rate R] [--out .run/loadtest]
        [-- more locust options, e.g. --barge-in-share 0.3 --turns 3]

Without --host, the target is "orchestrator" in .run/endpoints.json (written by `make up`). The
callers send the API key in FUNCHAT_API_KEY; when it is unset and the target is the local stack's,
the key `make up` wrote (endpoints.json's "api_key_file", .run/api_key). The target must answer its
health check and take the key first: otherwise one line says why and the exit code is 2.
Then `locust -f loadtests/locustfile.py --headless` runs with the CSV files (locust_*.csv) and the
HTML report (report.html) in --out, where the locustfile also writes summary.json, turns.jsonl and
plot.png. The exit code is Locust's, which the locustfile sets from the SLO verdict: 0 passed, 1 failed
(make turns any failure of a recipe into its own exit code 2, naming the script's in "Error N").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUTPUTS = ("summary.json", "turns.jsonl", "plot.png", "report.html", "locust_stats.csv",
           "locust_stats_history.csv", "locust_failures.csv", "locust_exceptions.csv")


def fail(message: str) -> int:
    print(f"loadtest: {message}", file=sys.stderr)
    return 2


def target_of(host: str | None, endpoints: Path) -> str:
    if host:
        return host
    try:
        return json.loads(endpoints.read_text())["orchestrator"]
    except (OSError, ValueError, KeyError):
        raise LookupError(f"no target: {endpoints} names no orchestrator; start the stack with `make up` "
                          f"or give HOST=host:port") from None


def local_api_key(target: str, endpoints: Path) -> str | None:
    """The key of `make up`'s stack when `target` is its orchestrator: the file endpoints.json names
    ("api_key_file"), else api_key next to endpoints.json; None otherwise."""
    try:
        local = json.loads(endpoints.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(local, dict) or local.get("orchestrator") != target:
        return None
    path = Path(local.get("api_key_file") or endpoints.parent / "api_key")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python loadtests/run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="", help="host:port of the public API (default: .run/endpoints.json)")
    ap.add_argument("--endpoints", default=str(REPO / ".run" / "endpoints.json"))
    ap.add_argument("--users", type=int, default=2, help="concurrent calls (the step shape's largest level)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--shape", default="steady", choices=("steady", "step", "spike"))
    ap.add_argument("--first-audio-p95-ms", type=float, default=1000.0)
    ap.add_argument("--max-underrun-turns", type=int, default=0)
    ap.add_argument("--max-error-rate", type=float, default=0.0)
    ap.add_argument("--stop-timeout", type=float, default=30.0,
                    help="seconds the calls in progress at the end may take to finish (their turns count)")
    ap.add_argument("--out", default=str(REPO / ".run" / "loadtest"))
    args, extra = ap.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if args.users < 1 or args.duration < 1:
        return fail(f"USERS must be >= 1 and DURATION >= 1 s (got {args.users} and {args.duration:g})")

    from funchat.client.auth import API_KEY_ENV, resolve_api_key
    from funchat.loadgen.probe import auth_problem, unreachable_reason
    try:
        target = target_of(args.host, Path(args.endpoints))
    except LookupError as exc:
        return fail(str(exc))
    reason = unreachable_reason(target)
    if reason:
        return fail(f"{reason}; start the stack with `make up` or give HOST=host:port")
    env, source = dict(os.environ), API_KEY_ENV
    try:
        key = resolve_api_key(None)
    except ValueError as exc:
        return fail(str(exc))
    if not key:
        key, source = local_api_key(target, Path(args.endpoints)), "the local stack's key file"
    if key:
        env[API_KEY_ENV] = key  # Locust's callers read it (funchat.loadgen)
    reason = auth_problem(target, key or "", source=source)
    if reason:
        return fail(reason)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a failed run must not leave the previous run's results looking current
        (out / name).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--only-summary",
           "--host", target, "--users", str(args.users), "--spawn-rate", str(args.users),
           "--run-time", f"{int(round(args.duration))}s", "--stop-timeout", f"{int(round(args.stop_timeout))}",
           "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
           "--load-shape", args.shape, "--first-audio-p95-ms", str(args.first_audio_p95_ms),
           "--max-underrun-turns", str(args.max_underrun_turns), "--max-error-rate", str(args.max_error_rate),
           "--summary-dir", str(out), *extra]
    print(f"loadtest: {args.shape}, {args.users} user(s), {args.duration:g} s against {target}; outputs in {out}",
          flush=True)
    return subprocess.run(cmd, cwd=str(REPO), env=env).returncode


if __name__ == "__main__":
    sys.exit(main())

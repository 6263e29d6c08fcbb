"""The load generator: simulated callers of the public API, measured turn by turn.

One core for every load tool of the project: Locust's users (loadtests/locustfile.py, `make
loadtest`) and `make bench-e2e` (funchat/benchmarks/e2e.py) both drive these callers and
summarise with these statistics. Client side only: gRPC's blocking API (under Locust made
cooperative with grpc.experimental.gevent.init_gevent()), numpy, soxr, soundfile and the public
client's helpers; never torch nor the server's code.

Modules, in the order a load test uses them:

- utterances: what callers say (a real recording cut at its pauses, espeak-ng sentences, cached);
- plan: a call's script (utterances; listen, barge in, go silent, hang up per reply), drawn seeded;
- settings: CallerSettings (session settings, realtime or as fast as possible, timeouts);
- converse: ConverseCaller, a live full-duplex call (microphone every 100 ms, playback acks);
- respond: respond_call, one Respond RPC;
- replies: each reply as heard (funchat call's loudspeaker model; underruns);
- records: TurnRecord / CallRecord, what was measured;
- stats: percentiles, turn summaries, SLOs, goodput, the largest concurrency that holds;
- shapes: steady / step / spike schedules; report: summary.json; plot: its PNG;
- probe: is a server answering at all, and does it take the API key.

Every caller sends the API key (`authorization: Bearer <key>`) from FUNCHAT_API_KEY unless given
one (`api_key=`); funchat.client.auth has the helpers.
"""

from funchat.loadgen.converse import ConverseCaller
from funchat.loadgen.plan import Shares, TurnPlan, plan_call
from funchat.loadgen.probe import auth_problem, unreachable_reason
from funchat.loadgen.records import BEHAVIOURS, CallRecord, TurnRecord
from funchat.loadgen.report import build_summary
from funchat.loadgen.respond import respond_call
from funchat.loadgen.settings import CallerSettings
from funchat.loadgen.shapes import SHAPES, Schedule
from funchat.loadgen.stats import Slo, call_misses, goodput, largest_holding, percentile, turn_summary
from funchat.loadgen.utterances import Utterance, UtteranceError, load_utterances

__all__ = [
    "BEHAVIOURS", "SHAPES", "CallRecord", "CallerSettings", "ConverseCaller", "Schedule", "Shares", "Slo",
    "TurnPlan", "TurnRecord", "Utterance", "UtteranceError", "auth_problem", "build_summary", "call_misses",
    "goodput", "largest_holding", "load_utterances", "percentile", "plan_call", "respond_call", "turn_summary",
    "unreachable_reason",
]

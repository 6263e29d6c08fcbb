"""A tiny checkpoint that answers one recording with one function call: real weights, overfitted on CPU.

The tiny random checkpoint (`funchat init-checkpoint --preset tiny`) never writes `<tool_call>`, so
nothing exercised function calling end to end. This module copies such a checkpoint and fine-tunes
its LLM until, for ONE recording and ONE tool list, the greedy reply's text is exactly one tool call
in the chat template's own format, and the turn then ends on <|im_end|>:

    <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>

As text tokens (as the oracle returns them): s2s `<|audio_bos|>` (forced), the call's tokens
(`<tool_call>` and `</tool_call>` are single added tokens of the tiny tokenizer), `<|im_end|>`; s2t
the same without `<|audio_bos|>`. In s2s the Speech Refined Head (its random weights untouched)
speaks along. Should it end its speech (a group with speech eos) before the call is said, the
schedule writes `<|audio_eos|>` over that step's text token, so the model is taught to say that
token again at the next step: the text still reads exactly the call. (With the tiny preset at seed
0 and the example recording it does not: the reply has no `<|audio_eos|>`.) Nothing in the
serving path knows about any of this: the oracle and the cluster load the result as any checkpoint.

    python -m funchat.dev.tool_checkpoint --base checkpoints/tiny --out checkpoints/tiny-tool \\
        --audio ../shared/data/fun-audio-chat-example-16k-f32.wav [--seconds 3] [--city Paris]

How (a few seconds on 2 cores; nothing is drawn at random: greedy decoding, full-batch Adam, so
the same inputs give the same weights):
- the prompt is built by the one prompt builder (`funchat.turn.prompt`), its audio rows by the
  frozen audio encoder, once;
- the turn is walked with its text forced to the plan (`_walk`, the oracle's loop step for step).
  In s2s each step's input is fused with the speech tokens the SRH chose, and those depend on the
  LLM being trained, so the turn is walked again after every few optimizer steps, and every
  distinct path seen is kept for training: the text must come out whatever the SRH makes of it;
- trained: the LLM's decoder layers, final norm and lm_head. Frozen: the text embeddings (the SRH
  and the fused step inputs read them), the audio encoder, the SRH and the vocoder;
- done when each walked step's argmax is the plan's token by a margin: greedy decoding then
  follows the walked path exactly (same choices, same inputs). The written checkpoint is checked
  once more with the oracle (`ReferencePipeline`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from funchat.audio_io import SAMPLE_RATE, load_audio
from funchat.model.checkpoint import load_model, save_checkpoint
from funchat.model.funaudiochat import FunAudioChat
from funchat.model.mel import log_mel_spectrogram
from funchat.text.chat import Message, encode_chat
from funchat.text.tokenizer import SPECIAL_TOKENS
from funchat.turn.prompt import PromptBuilder, TokenIds, speech_frames_for_samples
from funchat.turn.schedule import Mode, TurnSchedule

# The tool as the orchestrator hands it to the prompt builder (funchat.orchestrator.call_config turns a
# pb.Tool into this shape, key order included): the prompt's tool block is its JSON, so the ids match.
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city's name"}},
                   "required": ["city"]}}}
WEATHER_CALL: dict[str, Any] = {"name": "get_weather", "arguments": {"city": "Paris"}}
CLIP_SECONDS = 3.0  # the recording's first seconds: a short prompt, so the fine-tune is quick

MIN_MARGIN = 2.0  # logits: the plan's token must beat every other one by this much at every step
MAX_ROUNDS = 60
STEPS_PER_ROUND = 8
LEARNING_RATE = 3e-3
IGNORE = -100  # cross_entropy's ignore_index: positions with nothing to learn


class ToolCheckpointError(RuntimeError):
    """The fine-tune could not make the reply (the message says why)."""


@dataclass
class FineTuneReport:
    checkpoint: Path
    reply_text: str  # the tool call as the model writes it (special tokens left out)
    text_tokens: dict[str, list[int]]  # mode -> the greedy reply's text tokens, as the oracle returns them
    rounds: int
    optimizer_steps: int
    margin: float  # the smallest margin of the plan's token over the runner-up, over every step and mode
    seconds: float  # the fine-tune (without the copy, the save and the final oracle check)
    timings: dict[str, float] = field(default_factory=dict)


def tool_clip(audio: np.ndarray, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """The recording's first `seconds` at 16 kHz, as a PCM16 client sends it and the server decodes it
    (x 32767, rounded, / 32768): the oracle and the cluster then hear the very same samples."""
    cut = np.asarray(audio, dtype=np.float32)[: int(round(seconds * SAMPLE_RATE))]
    return (np.clip(cut, -1, 1) * 32767.0).round().astype(np.int16).astype(np.float32) / 32768.0


def tool_call_text(tokenizer, call: Mapping[str, Any]) -> str:
    """The call as the chat template renders an assistant's tool call in later prompts
    (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`): the model is taught to write
    exactly what its history will show."""
    rendered = encode_chat(tokenizer, [Message("assistant", None, [dict(call)])], add_generation_prompt=False).text
    head, tail = f"{SPECIAL_TOKENS['im_start']}assistant\n", f"{SPECIAL_TOKENS['im_end']}\n"
    assert rendered.startswith(head) and rendered.endswith(tail), rendered
    return rendered[len(head):-len(tail)]


def call_tokens(builder: PromptBuilder, call: Mapping[str, Any]) -> list[int]:
    """The text the reply must say: the call's tokens, then <|im_end|> (s2s's <|audio_bos|> before
    them is forced by the schedule, not learnt)."""
    im_end = builder.special.im_end
    if im_end not in builder.token_ids.end_ids:
        raise ToolCheckpointError(f"<|im_end|> ({im_end}) does not end a turn for this checkpoint "
                                  f"(end ids {builder.token_ids.end_ids})")
    return builder.tokenizer.encode(tool_call_text(builder.tokenizer, call)) + [im_end]


@dataclass
class _Example:
    """One turn to learn: its prompt, the text it must say, and every path seen so far."""

    mode: Mode
    prompt_ids: list[int]
    prompt_embeds: torch.Tensor  # [1, L, E], frozen
    call_ids: list[int]  # the reply's text tokens after any forced ones: the call, then <|im_end|>
    seen: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # ([T, E] inputs, [T] labels)


@dataclass
class _Path:
    """A turn walked with its text forced (`_walk`)."""

    inputs: torch.Tensor  # [L + n - 1, E]: every forward's input rows (n forwards)
    labels: torch.Tensor  # [L + n - 1]: forward k's token at position L - 1 + k, IGNORE where forced
    margin: float  # min over the learnt steps of logit[label] - max(other logits)
    text_tokens: list[int]  # as the oracle returns them


@torch.no_grad()
def _walk(model: FunAudioChat, ex: _Example, ids: TokenIds, sil: int) -> _Path:
    """One turn as `funchat.oracle.generation.generate` runs it under greedy decoding, the LLM's
    text choices replaced by the plan: the call's tokens, then <|im_end|>.

    The SRH decides when speech ends (a group with speech eos); the schedule then writes
    <|audio_eos|> over that step's text, so the plan says that step's token again at the next step
    (and `<|sil|>`, "no text here", instead of ending the turn on it). The text then still reads
    exactly the call. margin > 0 means greedy decoding chooses the plan's token at every step; the
    SRH is greedy too, so it then walks this very path.
    """
    g = model.cfg.audio.group_size
    n_prompt = len(ex.prompt_ids)
    most = len(ex.call_ids) + 2  # the forced <|audio_bos|>, the call, one step lost to the speech end
    schedule = TurnSchedule(ids, ex.mode, most, prompt_last_token=ex.prompt_ids[-1])
    cache = model.new_llm_cache(1, capacity=n_prompt + most + 1)
    srh_state = model.new_srh_state(1, capacity=g * (n_prompt + most + 1)) if schedule.runs_srh else None

    inputs = ex.prompt_embeds  # [1, L, E], then [1, 1, E] per step
    input_ids = torch.tensor([ex.prompt_ids], dtype=torch.long)  # [1, L], then [1, 1]
    rows, labels, margin = [inputs[0]], [IGNORE] * (n_prompt - 1), float("inf")
    plan = list(ex.call_ids)
    while not schedule.finished:
        hidden, logits = model.llm_forward(inputs, cache)  # [1, T, E], [1, V]
        srh_tokens = None
        if schedule.runs_srh:
            chosen: list[int] = []

            def choose(_: int, srh_logits: torch.Tensor) -> torch.Tensor:  # greedy, as GREEDY's select
                token = torch.argmax(srh_logits, dim=-1)  # [1]
                chosen.append(int(token[0]))
                return token

            model.srh_forward(hidden, input_ids, srh_state, choose)
            srh_tokens = tuple(chosen)
        if schedule.steps == 0 and ex.mode is Mode.S2S:  # forced to <|audio_bos|> by the schedule
            want, label = ids.audio_bos, IGNORE
        else:
            ends_speech = schedule.speech_on and ids.speech_eos in srh_tokens
            if not plan:
                raise ToolCheckpointError(f"{ex.mode.value}: the turn did not end after the call")
            want = plan[0] if not (ends_speech and plan[0] in ids.end_ids) else sil
            if not ends_speech:  # else said again at the next step
                plan.pop(0)
            label = want
            others = logits[0].clone()
            others[want] = -float("inf")
            margin = min(margin, float(logits[0, want] - others.max()))
        schedule.observe(want, srh_tokens)
        labels.append(label)
        if schedule.finished:
            break
        nxt = schedule.next_input
        input_ids = torch.tensor([[nxt.text_token]], dtype=torch.long)
        group = torch.tensor([nxt.speech_group], dtype=torch.long) if nxt.speech_group else None  # [1, g]
        inputs = model.embed_step(input_ids[:, 0], group)  # [1, 1, E]: plain, or (E_text + G(group)) / 2
        rows.append(inputs[0])
    if plan:
        raise ToolCheckpointError(f"{ex.mode.value}: the turn ended before the call was said "
                                  f"({schedule.text_tokens})")
    return _Path(torch.cat(rows, dim=0), torch.tensor(labels, dtype=torch.long), margin, list(schedule.text_tokens))


def _batch(examples: Sequence[_Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every path seen, right-padded to one length -> inputs [D, T, E], labels [D, T]. The forward
    is causal, so the padding after a path changes none of its positions."""
    pairs = [pair for ex in examples for pair in ex.seen]
    width = max(seq.shape[0] for seq, _ in pairs)
    inputs = torch.zeros(len(pairs), width, pairs[0][0].shape[1])
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for i, (seq, lab) in enumerate(pairs):
        inputs[i, :seq.shape[0]], labels[i, :lab.shape[0]] = seq, lab
    return inputs, labels


def _trainable(model: FunAudioChat) -> list[torch.nn.Parameter]:
    """The LLM's decoder layers, final norm and lm_head; everything else stays as it was."""
    lm = model.language_model
    for p in model.parameters():
        p.requires_grad_(False)
    params = [*lm.model.layers.parameters(), *lm.model.norm.parameters(), *lm.lm_head.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def _one_thread():
    """Run on one CPU thread, then restore the process's setting. The tensors are tiny (64 wide):
    a second thread gains nothing, and on a busy 2-core machine the threads waiting on each other
    made the fine-tune 3-5x slower. One thread also keeps the float sums in one order, whatever
    the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _copy_checkpoint(base: Path, out: Path) -> None:
    """Everything of `base` (tokenizer, configs, vocoder/) but its model weights files, which are
    written whole after the fine-tune: a sharded base leaves no stale shards beside the new file."""
    def weights(folder: str, names: list[str]) -> list[str]:
        if Path(folder) != base:
            return []
        return [n for n in names if n.startswith("model") and (n.endswith(".safetensors") or n.endswith(".index.json"))]

    shutil.copytree(base, out, ignore=weights, dirs_exist_ok=True)


def _prompts(model: FunAudioChat, builder: PromptBuilder, audio: np.ndarray, tools: Sequence[Mapping[str, Any]],
             plan: list[int], modes: Sequence[Mode]) -> list[_Example]:
    """Each mode's prompt, its `<|AUDIO|>` rows from the frozen encoder, as the oracle builds them."""
    n_groups = builder.check_clip(len(audio))
    with torch.no_grad():
        mel = log_mel_spectrogram(audio, n_mels=model.cfg.audio.num_mel_bins)  # [n_mels, F]
        rows = model.encode_audio([mel], [speech_frames_for_samples(len(audio))])[0]  # [n_groups, E]
        examples = []
        for mode in modes:
            prompt = builder.build(mode.value, None, list(tools), [], n_groups, len(plan) + 2)
            embeds = model.embed_prompt(torch.tensor([prompt.ids], dtype=torch.long), [rows])  # [1, L, E]
            examples.append(_Example(mode, prompt.ids, embeds, plan))
    return examples


def _fine_tune(model: FunAudioChat, builder: PromptBuilder,
               examples: Sequence[_Example]) -> tuple[dict, int, int, float]:
    """Walk, train, walk again, until every walked step is the plan's by MIN_MARGIN
    -> (mode -> the reply's text tokens, rounds, optimizer steps, margin)."""
    optimizer = torch.optim.Adam(_trainable(model), lr=LEARNING_RATE)
    steps, replies, margin = 0, {}, -float("inf")
    for rounds in range(1, MAX_ROUNDS + 1):
        margin = float("inf")
        for ex in examples:
            path = _walk(model, ex, builder.token_ids, builder.special.sil)
            margin = min(margin, path.margin)
            replies[ex.mode.value] = path.text_tokens
            if not any(torch.equal(path.inputs, seq) and torch.equal(path.labels, lab) for seq, lab in ex.seen):
                ex.seen.append((path.inputs, path.labels))
        if margin >= MIN_MARGIN:
            return replies, rounds, steps, margin
        inputs, labels = _batch(examples)  # [D, T, E], [D, T]
        for _ in range(STEPS_PER_ROUND):
            hidden = model.language_model.model(inputs)  # [D, T, E]: one causal forward from position 0
            logits = model.language_model.lm_head(hidden)  # [D, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    raise ToolCheckpointError(f"no exact reply after {MAX_ROUNDS} rounds (margin {margin:.3f})")


def build_tool_checkpoint(base: str | Path, out: str | Path, audio: np.ndarray,
                          tools: Sequence[Mapping[str, Any]] = (WEATHER_TOOL,),
                          call: Mapping[str, Any] = WEATHER_CALL, modes: Sequence[str | Mode] = ("s2s", "s2t"),
                          verify: bool = True) -> FineTuneReport:
    """Copy the checkpoint `base` to `out` (new or empty) and fine-tune its LLM so that the greedy
    reply to `audio` (16 kHz mono; `tool_clip` gives what a PCM16 client sends) with `tools` in the
    system prompt is exactly `call`, in each of `modes`. verify: check the result with the oracle."""
    base, out = Path(base), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ToolCheckpointError(f"{out} is not empty")
    audio = np.asarray(audio, dtype=np.float32)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _copy_checkpoint(base, out)
    model = load_model(base)
    builder = PromptBuilder.from_checkpoint(base, model.cfg.raw)
    timings["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    with _one_thread():
        examples = _prompts(model, builder, audio, tools, call_tokens(builder, call), [Mode.parse(m) for m in modes])
        replies, rounds, steps, margin = _fine_tune(model, builder, examples)
    timings["fine_tune"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    save_checkpoint(model, out)
    timings["save"] = time.perf_counter() - t2
    report = FineTuneReport(out, tool_call_text(builder.tokenizer, call), replies, rounds, steps, margin,
                            timings["fine_tune"], timings)
    if verify:
        t3 = time.perf_counter()
        check_with_oracle(out, audio, tools, replies)
        timings["oracle_check"] = time.perf_counter() - t3
    return report


def check_with_oracle(checkpoint: str | Path, audio: np.ndarray, tools: Sequence[Mapping[str, Any]],
                      expected: Mapping[str, list[int]]) -> None:
    """The oracle, greedy, on the written checkpoint: the reply is exactly `expected[mode]`."""
    from funchat.oracle.generation import GenerationConfig
    from funchat.oracle.pipeline import ReferencePipeline

    oracle = ReferencePipeline(checkpoint)
    for mode, tokens in expected.items():
        # room for more than the call: the turn must end by itself, on <|im_end|>
        reply = oracle.respond(audio, mode=mode, tools=list(tools),
                               gen=GenerationConfig.greedy(Mode.parse(mode), len(tokens) + 8))
        if reply.text_tokens_emitted[-1] not in oracle.token_ids.end_ids:
            raise ToolCheckpointError(f"{mode}: the oracle's reply does not end the turn: {reply.text_tokens_emitted}")
        if reply.text_tokens != tokens:
            raise ToolCheckpointError(f"{mode}: the oracle replies {reply.text_tokens} ({reply.text!r}), "
                                      f"not {tokens}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m funchat.dev.tool_checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the checkpoint to start from (e.g. the tiny preset's)")
    ap.add_argument("--out", required=True, help="where to write the fine-tuned copy (new or empty)")
    ap.add_argument("--audio", required=True, help="the recording (any WAV/FLAC; resampled to 16 kHz mono)")
    ap.add_argument("--seconds", type=float, default=CLIP_SECONDS, help="use the recording's first seconds")
    ap.add_argument("--city", default=WEATHER_CALL["arguments"]["city"], help="the get_weather call's argument")
    args = ap.parse_args(argv)
    clip = tool_clip(load_audio(args.audio), args.seconds)
    call = {"name": WEATHER_CALL["name"], "arguments": {"city": args.city}}
    try:
        report = build_tool_checkpoint(args.base, args.out, clip, call=call)
    except ToolCheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.checkpoint}: fine-tune {report.seconds:.1f} s ({report.rounds} rounds, "
          f"{report.optimizer_steps} Adam steps, margin {report.margin:.2f})")
    print(f"reply to the first {len(clip) / SAMPLE_RATE:.2f} s of {args.audio} with tools "
          f"{json.dumps([WEATHER_TOOL])}:\n{report.reply_text}")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

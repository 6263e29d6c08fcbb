"""Qwen2/Qwen3-style byte-level BPE text tokenizer (the one Fun-Audio-Chat uses).

Token ids always come from the tokenizer files; nothing here hard-codes the Qwen numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from funchat.errors import CheckpointError

# Short name -> token text for the special tokens the chat format and the model need.
SPECIAL_TOKENS: dict[str, str] = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "audio": "<|AUDIO|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
    "audio_pad": "<|audio_pad|>",
    "sil": "<|sil|>",
}

# Pre-tokenizer split used by Qwen2/Qwen3 (copied from their tokenizer.json): contractions,
# letter runs with one optional leading non-letter, single digits, punctuation runs, newlines.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _apply_qwen2_pipeline(tok: Tokenizer) -> None:
    """Everything of a Qwen2 tokenizer.json except the BPE model and added tokens."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            # use_regex=False: the split above replaces GPT-2's own regex.
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


class TextTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the calls funchat needs."""

    def __init__(self, tok: Tokenizer, source: Path | None = None) -> None:
        self._tok = tok
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path) -> "TextTokenizer":
        """Load `tokenizer.json`, or build from `vocab.json` + `merges.txt` + `tokenizer_config.json`."""
        d = Path(path)
        if not d.is_dir():
            raise CheckpointError(f"tokenizer directory not found: {d}")
        tj = d / "tokenizer.json"
        if tj.is_file():
            try:
                return cls(Tokenizer.from_file(str(tj)), d)
            except Exception as e:  # the Rust loader raises a bare Exception on bad JSON
                raise CheckpointError(f"cannot load tokenizer file {tj}: {e}") from e
        needed = [d / "vocab.json", d / "merges.txt", d / "tokenizer_config.json"]
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"tokenizer directory {d} has no tokenizer.json and lacks {', '.join(missing)} "
                "(need tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json)"
            )
        return cls(_from_vocab_merges(*needed), d)

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids for `text`; added/special tokens written in the text map to their ids (as in HF)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (the model's embedding table may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> dict[str, int]:
        """Ids of the named special tokens (see SPECIAL_TOKENS) that this tokenizer has."""
        out = {}
        for name, text in SPECIAL_TOKENS.items():
            i = self._tok.token_to_id(text)
            if i is not None:
                out[name] = i
        return out

    def all_special_tokens(self) -> list[str]:
        """Text of every added token flagged special, in id order."""
        dec = self._tok.get_added_tokens_decoder()
        return [dec[i].content for i in sorted(dec) if dec[i].special]


def _from_vocab_merges(vocab: Path, merges: Path, config: Path) -> Tokenizer:
    """Rebuild a Qwen2 tokenizer from the slow-tokenizer files, as HF's Qwen2Tokenizer does."""
    try:
        v, m = models.BPE.read_file(str(vocab), str(merges))
        tok = Tokenizer(models.BPE(v, m, unk_token=None, fuse_unk=False, byte_fallback=False))
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except Exception as e:
        raise CheckpointError(f"cannot read tokenizer files in {vocab.parent}: {e}") from e
    _apply_qwen2_pipeline(tok)
    added = cfg.get("added_tokens_decoder", {})
    # Ids are assigned by tokenizers in insertion order, so add in id order and then check
    # that every token landed on the id the config declares (a gap would shift them).
    for key in sorted(added, key=int):
        spec = added[key]
        t = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", False),
        )
        if t.special:
            tok.add_special_tokens([t])
        else:
            tok.add_tokens([t])
        got = tok.token_to_id(spec["content"])
        if got != int(key):
            raise CheckpointError(
                f"{config}: added token {spec['content']!r} declared as id {key} but loads as {got} "
                "(added token ids must follow the vocab.json ids without gaps)"
            )
    return tok


# --- tiny deterministic tokenizer for tests and the tiny checkpoint --------------------------

# Special tokens at the top of the vocabulary, in this order (ids V-9 .. V-1).
TINY_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|text_pad|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|audio_pad|>",
    "<|sil|>",
]
# Added but not special (kept by decode), just below the specials, as in Qwen.
TINY_ADDED = ["<tool_call>", "</tool_call>"]

_TINY_CORPUS = """\
You are asked to generate text tokens.
You are asked to generate both text and speech tokens at the same time.
Hello! How are you today? I am fine, thank you. What can I do for you?
The weather is nice and the sun is shining, so we went for a walk in the park.
Please tell me a short story about a cat who wanted to learn how to sing.
Once upon a time there was a little cat. Every morning she listened to the birds,
and every evening she tried to sing their songs. Her friends laughed at first,
but after many days of practice her voice became clear and beautiful.
The numbers are 0 1 2 3 4 5 6 7 8 9, and the year is 2025. It costs $12.50 (about 90 yuan).
Speech recognition turns audio into text; speech synthesis turns text into audio.
The assistant listens to the user, thinks, and answers in a friendly voice.
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": "get_weather", "arguments": {"city": "Hangzhou"}}
</tool_call>
<tool_response>
{"temperature": 21, "condition": "sunny", "unit": "celsius"}
</tool_response>
system user assistant tool function name arguments description parameters properties required
你好！今天天气怎么样？今天是晴天，温度二十一度，很适合出去散步。
你的名字是小云。你是一位来自杭州的温柔友善的女孩，声音甜美，举止亲切。
你的回复语气自然友好，力求沟通简洁明了。你的回复简短，通常只有一到三句话。
请给我讲一个关于小猫学唱歌的故事。从前有一只小猫，每天早上听鸟儿唱歌，
每天晚上自己练习。朋友们一开始笑她，但是经过很多天的练习，她的声音变得清脆又好听。
语音识别把声音变成文字，语音合成把文字变成声音。我们一起学习中文和英文。
北京、上海、杭州、广州、深圳都是中国的大城市。谢谢你的帮助，再见！
"""


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Write a small deterministic Qwen2-layout tokenizer to `out_dir` and return the path.

    Ids 0..V-12 are the 256 byte tokens plus BPE merges, V-11/V-10 are `<tool_call>` and
    `</tool_call>`, V-9..V-1 are TINY_SPECIALS. Files: tokenizer.json, tokenizer_config.json,
    vocab.json, merges.txt (so both load paths of TextTokenizer.from_dir can be exercised).
    """
    n_bpe = vocab_size - len(TINY_SPECIALS) - len(TINY_ADDED)
    if n_bpe <= 256:
        raise ValueError(f"vocab_size {vocab_size} too small: need room for 256 byte tokens and merges")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _apply_qwen2_pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        show_progress=False,
        # All 256 byte symbols first (sorted by char, which is GPT-2's byte order), so every
        # string is encodable whatever the corpus holds.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(keepends=True), trainer)
    # A larger vocabulary than the corpus can fill (the `mid` preset's) gets reserved, never-produced
    # special tokens in the gap, so the chat specials still sit at the top of the id range.
    reserved = [f"<|reserved_{i}|>" for i in range(n_bpe - tok.get_vocab_size())]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in reserved])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TINY_ADDED])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in TINY_SPECIALS])

    tok.save(str(out / "tokenizer.json"), pretty=True)
    tok.model.save(str(out))  # vocab.json + merges.txt ("#version: 0.2" header, id order)

    dec = tok.get_added_tokens_decoder()
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": dec[i].content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": dec[i].special,
            }
            for i in sorted(dec)
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out

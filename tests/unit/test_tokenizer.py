"""TextTokenizer and the tiny deterministic tokenizer."""

import json
import shutil
import subprocess
import sys

import pytest

from funchat.errors import CheckpointError
from funchat.text.tokenizer import TINY_SPECIALS, TextTokenizer, build_tiny_tokenizer

SAMPLES = [
    "Hello! How are you today?",
    "The quick brown fox jumps over the lazy dog, it's 2025.",
    "你好，今天天气怎么样？我们一起去杭州散步吧。",
    "Mixed 中文 and English 混合 text: 123 + 456 = 579",
    "  leading spaces\n\n\ttabs\r\nand trailing  ",
    "emoji 🎧 and accents: café, naïve, Ω",  # bytes the corpus never saw
    "",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return TextTokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def slow_dir(tiny_dir, tmp_path_factory):
    """The same tokenizer without tokenizer.json: forces the vocab.json + merges.txt path."""
    d = tmp_path_factory.mktemp("tok") / "slow"
    d.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, d / name)
    return d


def test_tiny_layout(tiny_dir, tok):
    assert tok.vocab_size == 1024
    assert tok.special_ids() == {
        "endoftext": 1015,
        "im_start": 1016,
        "im_end": 1017,
        "audio": 1019,
        "audio_bos": 1020,
        "audio_eos": 1021,
        "audio_pad": 1022,
        "sil": 1023,
    }
    assert tok.token_to_id("<|text_pad|>") == 1018
    assert tok.token_to_id("<tool_call>") == 1013
    assert tok.token_to_id("</tool_call>") == 1014
    assert tok.all_special_tokens() == TINY_SPECIALS
    # 256 byte symbols then merges fill 0..1012; GPT-2 byte order puts "!" at 0 as in Qwen.
    vocab = json.loads((tiny_dir / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(1013))
    assert tok.id_to_token(0) == "!"
    assert all(len(tok.id_to_token(i)) == 1 for i in range(256))
    assert all(len(tok.id_to_token(i)) > 1 for i in range(256, 1013))
    merges = (tiny_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 1013 - 256
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    dec = cfg["added_tokens_decoder"]
    assert dec["1013"]["content"] == "<tool_call>" and dec["1013"]["special"] is False
    assert dec["1019"]["content"] == "<|AUDIO|>" and dec["1019"]["special"] is True


def test_other_vocab_size(tmp_path):
    t = TextTokenizer.from_dir(build_tiny_tokenizer(tmp_path, vocab_size=600))
    assert t.vocab_size == 600
    assert [t.token_to_id(s) for s in TINY_SPECIALS] == list(range(591, 600))
    assert t.token_to_id("<tool_call>") == 589 and t.token_to_id("</tool_call>") == 590


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        build_tiny_tokenizer(tmp_path, vocab_size=260)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 1013 for i in ids)  # plain text never yields added tokens
    assert tok.decode(ids) == text


def test_merges_compress_corpus_text(tok):
    # Words from the embedded corpus must come out as far fewer tokens than bytes.
    for text in ["generate text tokens", "今天天气"]:
        assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_special_tokens_in_text_are_recognised(tok):
    sp = tok.special_ids()
    ids = tok.encode("<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>")
    assert ids[0] == sp["im_start"]
    assert ids[-4:] == [sp["audio_bos"], sp["audio"], sp["audio_eos"], sp["im_end"]]
    assert tok.decode(ids) == "user\n"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>"
    # <tool_call> is added but not special: one id, and decode keeps it.
    ids = tok.encode('<tool_call>\n{"name": "f"}\n</tool_call>')
    assert ids[0] == 1013 and ids[-1] == 1014
    assert tok.decode(ids) == '<tool_call>\n{"name": "f"}\n</tool_call>'


def test_both_load_paths_agree(tok, slow_dir):
    slow = TextTokenizer.from_dir(slow_dir)
    assert slow.vocab_size == tok.vocab_size
    assert slow.special_ids() == tok.special_ids()
    assert slow.all_special_tokens() == tok.all_special_tokens()
    for text in SAMPLES + ["<|im_start|>system\nhi<|im_end|>\n<tool_call>x</tool_call><|sil|>"]:
        assert slow.encode(text) == tok.encode(text)
        assert slow.decode(tok.encode(text), skip_special_tokens=False) == text


def test_build_is_deterministic(tiny_dir, tmp_path):
    names = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
    again = build_tiny_tokenizer(tmp_path / "again")
    # A fresh interpreter too: Rust hash maps are seeded per process.
    code = "import sys; from funchat.text.tokenizer import build_tiny_tokenizer as b; b(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "proc")], check=True)
    for name in names:
        ref = (tiny_dir / name).read_bytes()
        assert (again / name).read_bytes() == ref, name
        assert (tmp_path / "proc" / name).read_bytes() == ref, name


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as e:
        TextTokenizer.from_dir(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_missing_files(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt, tokenizer_config.json") as e:
        TextTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def test_added_token_id_gap_is_rejected(slow_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(slow_dir / name, tmp_path / name)
    cfg = json.loads((slow_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    dec = cfg["added_tokens_decoder"]
    dec["2000"] = dec.pop("1023")  # <|sil|> declared far above where it can load
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(CheckpointError, match="<\\|sil\\|>"):
        TextTokenizer.from_dir(tmp_path)


def test_package_imports_no_torch_or_transformers():
    code = (
        "import sys, funchat.text.tokenizer, funchat.text.chat; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_matches_transformers(tok, tiny_dir, slow_dir):
    import transformers  # a pinned test dependency: its absence is a failure, not a skip
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_dir / "tokenizer.json"))
    # The vocab.json + merges.txt dir loaded by HF's own Qwen2Tokenizer: checks our layout.
    qwen = transformers.AutoTokenizer.from_pretrained(str(slow_dir))
    texts = SAMPLES + ["<|im_start|>user\n<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|><|im_end|>\n<tool_call>"]
    for text in texts:
        ids = tok.encode(text)
        assert fast.encode(text, add_special_tokens=False) == ids
        assert qwen.encode(text, add_special_tokens=False) == ids
        assert qwen.decode(ids, skip_special_tokens=True) == tok.decode(ids)

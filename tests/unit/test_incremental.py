"""Incremental decoding with a KV cache equals one full forward (LLM and Speech Refined Head).

All on a randomized tiny model in float32 (plus one float64 SRH variant); every comparison is
against a from-scratch forward without a cache over the whole sequence the cached path has seen.
"""

import pytest
import torch

from funchat.model.checkpoint import build_model, randomize
from funchat.model.config import FunAudioChatConfig
from funchat.model.presets import preset_config
from funchat.model.refined_head import PREFILL_BLOCK

ATOL = 1e-5
SEED = 1234


def _tiny(dtype: torch.dtype):
    cfg = FunAudioChatConfig.from_dict(preset_config("tiny"))
    return randomize(build_model(cfg), seed=SEED).eval().to(dtype)


@pytest.fixture(scope="module")
def model():
    return _tiny(torch.float32)


@pytest.fixture(scope="module")
def model64():
    """The same weights in float64, where cached and from-scratch paths agree to rounding."""
    return _tiny(torch.float64)


@pytest.fixture(scope="module")
def llm(model):
    return model.language_model.model


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def _inputs(model, n: int, seed: int) -> torch.Tensor:
    """[1, n, E] LLM input embeddings of random text ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.text.vocab_size, (1, n), generator=gen)
    return model.language_model.embed(ids)


def _right_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [1, n_i, E] -> [B, max n, E] (zero right padding) and the lengths [B]."""
    lens = torch.tensor([s.shape[1] for s in seqs])
    out = seqs[0].new_zeros(len(seqs), int(lens.max()), seqs[0].shape[2])
    for b, s in enumerate(seqs):
        out[b, : s.shape[1]] = s[0]
    return out, lens


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- shared LLM


def test_llm_prefill_then_single_steps_equals_full_forward(model, llm):
    p, k = 9, 5
    x = _inputs(model, p + k, seed=1)
    full = llm(x)  # [1, P+k, E]

    cache = llm.new_cache(1, capacity=4)  # small capacity: the cache has to grow on the way
    parts = [llm(x[:, :p], cache)]
    for i in range(k):
        parts.append(llm(x[:, p + i: p + i + 1], cache))
    incremental = torch.cat(parts, dim=1)

    assert cache.lengths.tolist() == [p + k]
    _assert_close(incremental, full)
    _assert_close(model.language_model.lm_head(incremental), model.language_model.lm_head(full))


def test_llm_prefill_in_two_chunks_then_steps_equals_full_forward(model, llm):
    first, second, k = 4, 6, 3
    x = _inputs(model, first + second + k, seed=2)
    full = llm(x)

    cache = llm.new_cache(1)
    parts = [llm(x[:, :first], cache), llm(x[:, first:first + second], cache)]
    for i in range(first + second, first + second + k):
        parts.append(llm(x[:, i:i + 1], cache))
    incremental = torch.cat(parts, dim=1)

    assert cache.lengths.tolist() == [first + second + k]
    _assert_close(incremental, full)
    _assert_close(model.language_model.lm_head(incremental), model.language_model.lm_head(full))


def test_llm_forward_returns_logits_of_last_real_position(model):
    x = _inputs(model, 6, seed=3)
    padded = torch.cat([x, torch.zeros_like(x[:, :2])], dim=1)
    hidden, logits = model.llm_forward(padded, model.new_llm_cache(1), torch.tensor([6]))
    full = model.language_model.model(x)
    _assert_close(hidden[:, :6], full)
    _assert_close(logits, model.language_model.lm_head(full[:, -1]).float())


def test_llm_batched_prefill_and_steps_equal_each_row_alone(model, llm):
    lens, k = [7, 12, 3], 4
    seqs = [_inputs(model, n + k, seed=10 + b) for b, n in enumerate(lens)]
    alone = [llm(s) for s in seqs]  # each row's full forward, [1, n+k, E]

    prompt, new_lens = _right_padded([s[:, :n] for s, n in zip(seqs, lens)])
    cache = llm.new_cache(3)
    out = llm(prompt, cache, new_lens)
    assert cache.lengths.tolist() == lens
    for b, n in enumerate(lens):
        _assert_close(out[b, :n], alone[b][0, :n])

    # batched single steps: the rows' cached lengths differ the whole time
    for i in range(k):
        step = torch.cat([s[:, n + i: n + i + 1] for s, n in zip(seqs, lens)], dim=0)  # [3, 1, E]
        out = llm(step, cache, torch.ones(3, dtype=torch.long))
        for b, n in enumerate(lens):
            _assert_close(out[b, 0], alone[b][0, n + i])
    assert cache.lengths.tolist() == [n + k for n in lens]


def test_llm_chunks_with_different_cached_and_new_lengths_equal_each_row_alone(model, llm):
    # rows at different cached lengths take multi-token chunks with different real lengths
    prefill, chunks = [5, 2, 8], [[3, 1, 2], [1, 4, 2]]
    total = [p + sum(c[b] for c in chunks) for b, p in enumerate(prefill)]
    seqs = [_inputs(model, n, seed=20 + b) for b, n in enumerate(total)]
    alone = [llm(s) for s in seqs]

    pos = list(prefill)
    x, lens = _right_padded([s[:, :p] for s, p in zip(seqs, prefill)])
    cache = llm.new_cache(3, capacity=8)
    out = llm(x, cache, lens)
    for b, p in enumerate(prefill):
        _assert_close(out[b, :p], alone[b][0, :p])
    for chunk in chunks:
        x, lens = _right_padded([s[:, pos[b]: pos[b] + chunk[b]] for b, s in enumerate(seqs)])
        out = llm(x, cache, lens)
        for b, n in enumerate(chunk):
            _assert_close(out[b, :n], alone[b][0, pos[b]: pos[b] + n])
            pos[b] += n
    assert cache.lengths.tolist() == total


def test_kv_cache_select_keeps_rows_contents(model, llm):
    lens = [4, 9, 6]
    seqs = [_inputs(model, n + 1, seed=30 + b) for b, n in enumerate(lens)]
    x, new_lens = _right_padded([s[:, :n] for s, n in zip(seqs, lens)])
    cache = llm.new_cache(3)
    llm(x, cache, new_lens)

    rows = [2, 0]
    picked = cache.select(rows)
    assert picked.batch == 2
    assert picked.lengths.tolist() == [lens[r] for r in rows]
    assert len(picked.k) == len(picked.v) == model.cfg.text.num_hidden_layers
    for layer in range(len(cache.k)):
        for i, r in enumerate(rows):
            n = lens[r]
            assert torch.equal(picked.k[layer][i, :, :n], cache.k[layer][r, :, :n])
            assert torch.equal(picked.v[layer][i, :, :n], cache.v[layer][r, :, :n])

    # the selected cache continues each row exactly as that row alone would
    step = torch.cat([seqs[r][:, lens[r]: lens[r] + 1] for r in rows], dim=0)
    out = llm(step, picked, torch.ones(2, dtype=torch.long))
    for i, r in enumerate(rows):
        _assert_close(out[i, 0], llm(seqs[r])[0, lens[r]])
    assert cache.lengths.tolist() == lens  # the original is untouched


# ---------------------------------------------------------------- Speech Refined Head


class RecordingGreedy:
    """A greedy chooser that records (sub_step, logits [B, V]) of every call."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, sub_step: int, logits: torch.Tensor) -> torch.Tensor:
        assert logits.dtype == torch.float32
        self.calls.append((sub_step, logits.clone()))
        return torch.argmax(logits, dim=-1)


def _srh_inputs(model, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, model.cfg.hidden_size, generator=gen).to(model.dtype)


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, model_dtype: torch.dtype) -> None:
    """SRH logits (always returned as float32): atol 1e-5, relative to their scale for a float32 model.

    With randomized weights the SRH logits reach |40|, where one float32 ulp is ~4e-6: the same
    matmul over [1, 1, E] instead of [1, N, E] rows already differs by ~2e-5 at the very first
    choice, while a float64 model agrees to within the final cast. A wrong previous token,
    position or mask differs by O(1).
    """
    scale = 1.0 if model_dtype == torch.float64 else max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=ATOL * scale, rtol=0)


def _run_srh(srh, blocks: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One [1, L, E] prompt block then [1, 1, E] step blocks -> (logits [V] per choice, tokens [N])."""
    state = srh.new_state(1, capacity=8)  # small capacity: the cache has to grow on the way
    chooser = RecordingGreedy()
    tokens = [srh(h, state, chooser) for h in blocks]  # each [1, g]
    g = srh.cfg.group_size
    assert [j for j, _ in chooser.calls] == list(range(g)) * len(blocks)
    return [logits[0] for _, logits in chooser.calls], torch.cat(tokens, dim=1)[0]


def _srh_from_scratch(srh, blocks: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The whole 25 Hz sequence the SRH saw, in one cache-free forward -> logits at each choice [N, V].

    Sub-frame i of the concatenated blocks gets E_sp(previous token): speech bos for the prompt
    block's first L*g-g+1 sub-frames, after that the token chosen at sub-frame i-1. Tokens are
    chosen at the prompt block's last g sub-frames and at every sub-frame of the later blocks.
    """
    g, e = srh.cfg.group_size, srh.cfg.output_dim
    h = torch.cat(blocks, dim=1)  # [1, N/g, E]
    sub = srh.pre_matching(h).reshape(-1, e)  # [N, E]
    n = sub.shape[0]
    first_choice = blocks[0].shape[1] * g - g
    chosen_at = list(range(first_choice, n))
    assert len(chosen_at) == len(tokens)
    prev = torch.empty(n, dtype=torch.long)
    prev[: first_choice + 1] = srh.cfg.bos_token_id
    prev[first_choice + 1:] = tokens[:-1]
    x = sub + srh.codebook[prev]
    out = srh.crq_transformer(srh.input_matching(x)[None])[0]  # [N, E_srh]
    return (srh.output_matching(out[chosen_at]) @ srh.codebook.T).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("prompt_len", [1, 4])
def test_srh_prefill_and_steps_equal_from_scratch_recomputation(model, model64, prompt_len, dtype):
    m = model if dtype == torch.float32 else model64
    srh = m.audio_invert_tower
    steps = 4
    h = _srh_inputs(m, prompt_len + steps, seed=40 + prompt_len)
    blocks = [h[:, :prompt_len]] + [h[:, i:i + 1] for i in range(prompt_len, prompt_len + steps)]

    logits, tokens = _run_srh(srh, blocks)
    assert tokens.shape == (srh.cfg.group_size * (1 + steps),)
    expected = _srh_from_scratch(srh, blocks, tokens)
    _assert_logits_close(torch.stack(logits), expected, dtype)
    assert torch.equal(tokens, torch.argmax(expected, dim=-1))


def test_srh_batch_with_different_prompt_lengths_equals_each_row_alone(model):
    srh = model.audio_invert_tower
    lens, steps = [5, 2], 3
    g = srh.cfg.group_size
    rows = [_srh_inputs(model, n + steps, seed=60 + b) for b, n in enumerate(lens)]

    alone = []
    for h, n in zip(rows, lens):
        blocks = [h[:, :n]] + [h[:, i:i + 1] for i in range(n, n + steps)]
        alone.append(_run_srh(srh, blocks))

    state = srh.new_state(2, capacity=8)
    chooser = RecordingGreedy()
    prompt, lengths = _right_padded([h[:, :n] for h, n in zip(rows, lens)])
    groups = [srh(prompt, state, chooser, lengths)]
    for i in range(steps):
        step = torch.cat([h[:, n + i: n + i + 1] for h, n in zip(rows, lens)], dim=0)  # [2, 1, E]
        groups.append(srh(step, state, chooser))
    tokens = torch.cat(groups, dim=1)  # [2, g * (1 + steps)]

    assert state.cache.lengths.tolist() == [(n + steps) * g for n in lens]
    for b, (logits_alone, tokens_alone) in enumerate(alone):
        assert torch.equal(tokens[b], tokens_alone)
        batched = torch.stack([logits[b] for _, logits in chooser.calls])
        _assert_logits_close(batched, torch.stack(logits_alone), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_srh_prefill_in_bounded_blocks_equals_one_forward(model, model64, dtype):
    """A prompt that continues a kept row (a masked forward) longer than `masked_block` sub-frames is
    prefilled block by block (bounded attention memory): rows of different lengths, some ending in
    an earlier block than others, give the logits and tokens of the one-forward prefill, and the
    cache holds the same lengths; every block's forward stays within the block."""
    m = model if dtype == torch.float32 else model64
    srh = m.audio_invert_tower
    g = srh.cfg.group_size
    lens, steps = [9, 3, 6], 2  # 45, 15 and 30 sub-frames; blocks of 7 split each several times
    rows = [_srh_inputs(m, n + steps, seed=80 + b) for b, n in enumerate(lens)]
    kept = torch.cat([_srh_inputs(m, 1, seed=90 + b) for b in range(len(lens))])  # [3, 1, E]: a kept position each
    prompt, lengths = _right_padded([h[:, :n] for h, n in zip(rows, lens)])

    def run(block: int):
        srh.crq_transformer.masked_block = block
        state = srh.new_state(len(lens), capacity=8)
        srh.extend(kept, state)
        chooser = RecordingGreedy()
        groups = [srh(prompt, state, chooser, lengths)]
        for i in range(steps):
            groups.append(srh(torch.cat([h[:, n + i: n + i + 1] for h, n in zip(rows, lens)], dim=0), state, chooser))
        srh.crq_transformer.masked_block = PREFILL_BLOCK
        return torch.cat(groups, dim=1), chooser.calls, state.cache.lengths.tolist()

    widths = []  # positions of each forward that ran the layers
    layer = srh.crq_transformer.layers[0]
    forward = layer.forward
    layer.forward = lambda x, *a, **kw: (widths.append(x.shape[1]), forward(x, *a, **kw))[1]
    try:
        blocked = run(7)
    finally:
        del layer.forward
    whole = run(10 ** 6)
    assert max(widths) == 7 and len(widths) > len(lens) + steps * g  # the prompt went in several blocks
    assert torch.equal(blocked[0], whole[0]) and blocked[2] == whole[2] == [(1 + n + steps) * g for n in lens]
    for (_, a), (_, b) in zip(blocked[1], whole[1]):
        _assert_logits_close(a, b, dtype)

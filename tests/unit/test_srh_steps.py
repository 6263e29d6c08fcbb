"""The refined_head's fixed-shape (CUDA-graph-ready) steps: the same tokens, logits path and cache
contents as the eager engine, for greedy and sampled calls of different lengths joining and
leaving; padding rows write only the scratch row; a failed step leaves no trace; the
`cuda_graphs` parameter is validated."""

from __future__ import annotations

import pytest
import torch

from funchat.engines.refined_head import SrhEngine, SrhRequest, SrhStepRunner, build_srh_engine, load_srh_engine
from funchat.engines.slot_pool import SequenceError
from funchat.engines.triton_adapter import ServiceParams
from funchat.model.checkpoint import load_model
from funchat.model.sampling import GREEDY, SamplingParams

ATOL = 1e-5  # float32 on CPU: the two paths differ only in summation order
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def fixed_shape_engine(model, max_sequences=6, max_context=24, max_batch=4, contexts=(20, 60, 120)):
    runner = SrhStepRunner(model, max_batch=max_batch, use_graphs=False, context_sizes=list(contexts))
    return SrhEngine(model, max_sequences, max_context=max_context, step_runner=runner)


def drive_both(model, eager: SrhEngine, fixed: SrhEngine) -> int:
    """The same requests through both engines: prompts of different lengths, calls joining in the
    same run as steps and leaving, greedy and sampled calls, more live calls than the largest
    batch bucket. Every result must be the same tokens. -> steps compared."""
    gen = torch.Generator().manual_seed(0)
    width = model.cfg.audio.output_dim
    sizes = {1: 5, 2: 9, 3: 3, 4: 6, 5: 2, 6: 4}
    sampling = {cid: SAMPLED if cid % 2 else GREEDY for cid in sizes}
    joins = {0: [1, 2, 3], 2: [4], 5: [5, 6]}
    leaves = {7: 2, 11: 5}
    live: dict[int, torch.Tensor | None] = {}
    compared = 0
    for step in range(14):
        requests = [SrhRequest(cid, True, False, torch.randn(sizes[cid], width, generator=gen),
                               sampling=sampling[cid], seed=cid) for cid in joins.get(step, [])]
        for cid in sorted(live):
            requests.append(SrhRequest(cid, False, leaves.get(step) == cid, torch.randn(1, width, generator=gen),
                                       appended=live[cid]))
        want, got = eager.run(requests), fixed.run(requests)
        for w, g in zip(want, got):
            assert not isinstance(w, SequenceError) and not isinstance(g, SequenceError), (w, g)
            assert torch.equal(w, g)
        compared += sum(not r.start for r in requests)
        for req, res in zip(requests, want):
            live[req.cid] = res
            if req.end:
                del live[req.cid]
    for cid in live:
        a, b = eager.pool.slots[cid], fixed.pool.slots[cid]
        n = eager.pool.length(a)
        assert n == fixed.pool.length(b)
        torch.testing.assert_close(b.extra["prev_embed"], a.extra["prev_embed"], atol=ATOL, rtol=0)
        for store_a, store_b in ((eager.pool.cache.k, fixed.pool.cache.k), (eager.pool.cache.v, fixed.pool.cache.v)):
            for layer_a, layer_b in zip(store_a, store_b):
                torch.testing.assert_close(layer_b[b.row, :, :n], layer_a[a.row, :, :n], atol=ATOL, rtol=0)
    return compared


def test_fixed_shape_steps_equal_the_eager_engine(model):
    fixed = fixed_shape_engine(model)
    tensors = list(fixed.pool.cache.k) + list(fixed.pool.cache.v)
    assert drive_both(model, SrhEngine(model, 6, max_context=24), fixed) > 40
    cache = fixed.pool.cache
    assert cache.batch == 7 and cache.capacity == 5 * 24  # allocated once, + the scratch row
    assert all(a is b for a, b in zip(list(cache.k) + list(cache.v), tensors))
    assert int(cache.lengths[6]) == 0  # the scratch row belongs to no call


def test_padding_rows_write_only_the_scratch_row(model):
    engine = fixed_shape_engine(model, max_sequences=3, max_batch=4)
    width = model.cfg.audio.output_dim
    engine.run([SrhRequest(cid, True, False, torch.randn(3, width)) for cid in range(3)])
    before = [t.clone() for t in engine.pool.cache.k]
    engine.run([SrhRequest(cid, False, False, torch.randn(1, width)) for cid in range(3)])  # bucket 4: one padding row
    rows = {engine.pool.slots[cid].row for cid in range(3)}
    for old, new in zip(before, engine.pool.cache.k):
        changed = {int(r) for r in torch.nonzero((old != new).flatten(1).any(1)).flatten()}
        assert changed <= rows | {3}  # the calls' rows and the scratch row, nothing else


def test_a_failed_step_leaves_no_trace(model, monkeypatch):
    engine = fixed_shape_engine(model, max_sequences=2)
    width = model.cfg.audio.output_dim
    engine.run([SrhRequest(cid, True, False, torch.randn(2, width)) for cid in range(2)])
    lengths = engine.pool.cache.lengths.clone()
    calls = {"n": 0}
    real = SrhStepRunner._static_step

    def fail_on_third_sub_step(self, n, context):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fault")
        return real(self, n, context)

    monkeypatch.setattr(SrhStepRunner, "_static_step", fail_on_third_sub_step)
    results = engine.run([SrhRequest(cid, False, False, torch.randn(1, width)) for cid in range(2)])
    # run_isolated retries each call alone; the retries succeed, from the lengths before the failure
    assert all(not isinstance(r, SequenceError) for r in results), results
    assert torch.equal(engine.pool.cache.lengths, lengths + torch.tensor([5, 5, 0]))


def test_cuda_graphs_parameter(model, tiny_checkpoint):
    assert build_srh_engine(model, 2, cuda_graphs="auto").step_runner is None  # CPU: eager
    assert isinstance(build_srh_engine(model, 2, cuda_graphs="false").step_runner, SrhStepRunner)
    with pytest.raises(ValueError, match="cuda_graphs=true needs device cuda"):
        build_srh_engine(model, 2, cuda_graphs="true")
    params = ServiceParams("refined_head", {"checkpoint": str(tiny_checkpoint), "cuda_graphs": "maybe"})
    with pytest.raises(ValueError, match="cuda_graphs='maybe' is not accepted: use one of auto, true, false"):
        load_srh_engine(params)

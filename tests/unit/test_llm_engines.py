"""The llm service's engines: fixed-shape (CUDA-graph-ready) steps equal the eager engine, padding
rows touch only the scratch row, max_context is enforced, and the `engine`/`cuda_graphs`/
`max_context` parameters are validated (TensorRT unavailable here gets a clear error)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from funchat.model.checkpoint import load_model
from funchat.engines.llm_engines import (
    TENSORRT_HELP,
    CudaGraphStepRunner,
    EngineUnavailableError,
    LlmEngineSettings,
    TensorRtLlmEngine,
    batch_buckets,
    build_llm_engine,
    context_buckets,
    describe_engine,
)
from funchat.engines.llm import LlmEngine, LlmRequest
from funchat.engines.llm_engines import load_llm_engine
from funchat.engines.slot_pool import SequenceError
from funchat.engines.triton_adapter import ServiceParams

ATOL = 1e-5  # float32 on CPU: the two paths differ only in summation order


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def _static_engine(model, max_sequences=6, capacity=64, max_batch=4, context_sizes=(8, 16, 64), use_graphs=False):
    runner = CudaGraphStepRunner(model, max_batch=max_batch, use_graphs=use_graphs, context_sizes=list(context_sizes))
    return LlmEngine(model, max_sequences, capacity=capacity, step_runner=runner)


def _assert_same(got, want, atol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, SequenceError):
            assert isinstance(g, SequenceError) and str(g) == str(w)
            continue
        assert not isinstance(g, SequenceError), g
        torch.testing.assert_close(g.logits, w.logits, atol=atol, rtol=0)
        torch.testing.assert_close(g.srh_input, w.srh_input, atol=atol, rtol=0)
        assert g.token == w.token == int(w.logits.argmax())  # greedy: the raw argmax


def _drive_both(model, eager: LlmEngine, static: LlmEngine, atol: float) -> int:
    """The same requests through both engines, greedy, with calls of different lengths, calls
    joining (a prefill in the same run as steps) and leaving, speech groups on some steps, more
    live calls than the largest batch bucket, and rows crossing context buckets. -> steps compared."""
    gen = torch.Generator().manual_seed(0)
    device = model.device
    sizes = {1: 5, 2: 9, 3: 3, 4: 6, 5: 2, 6: 4}  # prompt positions per call
    prompts = {cid: torch.randint(0, 1000, (n,), generator=gen) for cid, n in sizes.items()}
    codebook, g = model.cfg.audio.codebook_size, model.cfg.audio.group_size
    joins = {0: [1, 2, 3], 2: [4], 5: [5, 6]}  # step index -> calls that start then
    leaves = {7: 2, 11: 5}  # step index -> the call whose step ends it
    tokens: dict[int, int] = {}
    compared = 0
    for step in range(16):
        requests = [LlmRequest(cid, True, False, prompts[cid].to(device)) for cid in joins.get(step, [])]
        for cid in sorted(tokens):
            group = torch.randint(0, codebook, (g,), generator=gen).to(device) if (step + cid) % 3 == 0 else None
            requests.append(LlmRequest(cid, False, leaves.get(step) == cid, torch.tensor([tokens[cid]], device=device),
                                       None, group))
        want, got = eager.run(requests), static.run(requests)
        _assert_same(got, want, atol)
        compared += sum(not r.start for r in requests)
        for req, res in zip(requests, want):
            tokens[req.cid] = int(res.logits.argmax())
            if req.end:
                del tokens[req.cid]
    # The calls' cache rows hold the same keys and values at every valid position.
    assert set(eager.pool.slots) == set(static.pool.slots) == set(tokens)
    for cid in tokens:
        a, b = eager.pool.slots[cid].row, static.pool.slots[cid].row
        n = int(eager.pool.cache.lengths[a])
        assert n == int(static.pool.cache.lengths[b])
        for store_a, store_b in ((eager.pool.cache.k, static.pool.cache.k), (eager.pool.cache.v, static.pool.cache.v)):
            for layer_a, layer_b in zip(store_a, store_b):
                torch.testing.assert_close(layer_b[b, :, :n], layer_a[a, :, :n], atol=atol, rtol=0)
    return compared


def test_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(1) == [1]
    assert context_buckets(2048) == [256, 512, 1024, 2048]
    assert context_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert context_buckets(100) == [100]


def test_fixed_shape_steps_equal_the_eager_engine(model):
    eager = LlmEngine(model, 6)
    static = _static_engine(model)
    cache = static.pool.cache
    tensors = list(cache.k) + list(cache.v)
    assert _drive_both(model, eager, static, ATOL) > 40
    # allocated once at max_context (+ the scratch row), never grown or replaced
    assert cache.capacity == 64 and cache.batch == 7
    assert all(a is b for a, b in zip(list(cache.k) + list(cache.v), tensors))
    assert int(cache.lengths[6]) == 0  # the scratch row belongs to no call


def test_padding_rows_write_only_the_scratch_row(model):
    engine = _static_engine(model, max_sequences=4, capacity=32, context_sizes=(16, 32))
    prompts = [torch.arange(1, 1 + n) for n in (4, 7, 2, 5)]
    results = engine.run([LlmRequest(cid, True, False, p) for cid, p in enumerate(prompts)])
    assert not any(isinstance(r, SequenceError) for r in results)
    cache = engine.pool.cache
    before_k = [t.clone() for t in cache.k]
    before_lengths = cache.lengths.clone()
    rows = {cid: engine.pool.slots[cid].row for cid in range(4)}
    engine.run([LlmRequest(cid, False, False, torch.tensor([9])) for cid in (0, 1, 3)])  # 3 calls: bucket 4
    for layer, (old, new) in enumerate(zip(before_k, cache.k)):
        changed = (old != new).any(dim=(1, 3))  # [R, C]: positions written per row
        for cid in (0, 1, 3):
            n = int(before_lengths[rows[cid]])
            assert changed[rows[cid]].nonzero().flatten().tolist() == [n], (layer, cid)  # only its new position
        assert not changed[rows[2]].any()  # the call left out of the step
        assert changed[4, 1:].sum() == 0  # the scratch row, written at position 0 at most
    assert cache.lengths.tolist() == [n + (cid != 2) for cid, n in enumerate(before_lengths[:4].tolist())] + [0]


def test_max_context_is_enforced_and_the_cache_never_grows(model):
    engine = _static_engine(model, max_sequences=2, capacity=8, max_batch=2, context_sizes=(8,))
    cache_k0 = engine.pool.cache.k[0]
    too_long = engine.run([LlmRequest(1, True, False, torch.arange(1, 10))])[0]
    assert isinstance(too_long, SequenceError)
    assert "the prompt has 9 positions, more than max_context 8" in str(too_long)
    assert engine.pool.live == 0
    assert not any(isinstance(r, SequenceError) for r in engine.run([LlmRequest(1, True, False, torch.arange(1, 7)),
                                                                     LlmRequest(2, True, False, torch.arange(1, 3))]))
    def steps():
        return [LlmRequest(cid, False, False, torch.tensor([3])) for cid in (1, 2)]

    for _ in range(2):  # positions 7 and 8 of call 1
        assert not any(isinstance(r, SequenceError) for r in engine.run(steps()))
    full, other = engine.run(steps())
    assert isinstance(full, SequenceError) and "sequence 1 holds max_context 8 positions" in str(full)
    assert not isinstance(other, SequenceError)  # the other call goes on
    assert engine.pool.cache.capacity == 8 and engine.pool.cache.k[0] is cache_k0


def test_settings_are_validated():
    assert LlmEngineSettings.from_params({}) == LlmEngineSettings("torch", "auto", 2048, "build/llm_trt")
    assert LlmEngineSettings.from_params({"engine": "TensorRT", "cuda_graphs": "False", "max_context": "512"}) == \
        LlmEngineSettings("tensorrt", "false", 512, "build/llm_trt")
    with pytest.raises(ValueError, match=r"engine='onnx' is not accepted: use one of torch, tensorrt"):
        LlmEngineSettings.from_params({"engine": "onnx"})
    with pytest.raises(ValueError, match=r"cuda_graphs='yes' is not accepted: use one of auto, true, false"):
        LlmEngineSettings.from_params({"cuda_graphs": "yes"})
    for bad in ("0", "-5", "2k"):
        with pytest.raises(ValueError, match="max_context"):
            LlmEngineSettings.from_params({"max_context": bad})


def _triton_args(tmp_path, checkpoint, max_batch_size=4, **params):
    """The llm's parameters from what Triton gives `initialize`: the model config as JSON and the model's folder."""
    config = {"max_batch_size": max_batch_size,
              "parameters": {k: {"string_value": v} for k, v in {"checkpoint": str(checkpoint), **params}.items()}}
    args = {"model_config": json.dumps(config), "model_repository": str(tmp_path / "services" / "llm")}
    return ServiceParams.from_args(args, "llm")


def test_triton_parameters_choose_the_engine(tiny_checkpoint, tmp_path):
    eager = load_llm_engine(_triton_args(tmp_path, tiny_checkpoint))
    assert eager.step_runner is None  # cpu + auto: eager, its pool fixed at the default max_context
    assert eager.max_context == 2048 and eager.pool.cache.capacity == 2048 and eager.pool.cache.batch == 64
    assert describe_engine(eager) == "torch on cpu, eager"

    static = load_llm_engine(_triton_args(tmp_path, tiny_checkpoint, cuda_graphs="false", max_context="300",
                                          max_sequences="3"))
    runner = static.step_runner
    assert isinstance(runner, CudaGraphStepRunner) and not runner.use_graphs
    assert runner.batch_sizes == [1, 2, 4] and runner.context_sizes == [256, 300]
    assert static.max_context == 300 and static.pool.cache.capacity == 300 and static.pool.cache.batch == 4
    assert "fixed shapes, no capture" in describe_engine(static)

    with pytest.raises(ValueError, match="use one of torch, tensorrt"):
        load_llm_engine(_triton_args(tmp_path, tmp_path / "no-checkpoint", engine="vllm"))  # before any loading
    with pytest.raises(ValueError, match="cuda_graphs=true needs device cuda"):
        load_llm_engine(_triton_args(tmp_path, tmp_path / "no-checkpoint", cuda_graphs="true"))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        CudaGraphStepRunner(static.model, use_graphs=True)


def test_tensorrt_engine_without_tensorrt_says_what_is_needed(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(EngineUnavailableError) as info:
        load_llm_engine(_triton_args(tmp_path, tiny_checkpoint, engine="tensorrt", device="cuda",
                                     tensorrt_plans=str(tmp_path / "plans")))
    message = str(info.value)
    assert message.startswith(TENSORRT_HELP + ":")
    assert TENSORRT_HELP == ("engine=tensorrt needs NVIDIA's Triton image with TensorRT; "
                             "plans from services/tensorrt/build_engines.sh")
    assert f"{tmp_path / 'plans' / 'llm_trt_prefill' / '1' / 'model.plan'} not found" in message
    assert f"{tmp_path / 'plans' / 'llm_trt_step' / '1' / 'model.plan'} not found" in message
    assert "the tensorrt Python package cannot be imported" in message

    for name in ("llm_trt_prefill", "llm_trt_step"):  # plans present: the import is what is missing
        (tmp_path / "plans" / name / "1").mkdir(parents=True)
        (tmp_path / "plans" / name / "1" / "model.plan").write_bytes(b"not a plan")
    with pytest.raises(EngineUnavailableError, match="cannot be imported") as info:
        TensorRtLlmEngine(tiny_checkpoint, tmp_path / "plans", device="cpu")
    assert "not found" not in str(info.value)
    assert "TensorRT plans run on a CUDA device; device is cpu" in str(info.value)


class _OrtPlan:
    """TrtPlan's interface over onnxruntime running the ONNX graph the plan is built from (CPU)."""

    TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}

    def __init__(self, path, profile_max: dict[str, tuple[int, ...]]):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [t.name for t in self.session.get_inputs()]
        self.outputs = [t.name for t in self.session.get_outputs()]
        self.dtypes = {t.name: self.TYPES[t.type] for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.max = profile_max
        self.batches: list[int] = []  # rows of each call

    def profile_max(self, name):
        return self.max[name]

    def run(self, feeds):
        arrays = {name: feeds[name].to(self.dtypes[name]).contiguous().numpy() for name in self.inputs}
        self.batches.append(arrays["inputs_embeds"].shape[0])
        return {name: torch.from_numpy(a) for name, a in zip(self.outputs, self.session.run(None, arrays))}


@pytest.mark.parametrize("step_kv", ["present", "new"])
def test_tensorrt_engine_cache_handling_with_the_onnx_graphs(model, tiny_checkpoint, tmp_path, step_kv):
    """TensorRtLlmEngine's own logic (batch pieces, cache writes after prefill and step, lengths)
    with the plans' ONNX graphs run by onnxruntime in their place: equals the eager engine."""
    from funchat.engines.onnx_export import PREFILL_FILE, STEP_FILE, export_llm

    export_llm(model, tmp_path, step_kv=step_kv)
    text = model.cfg.text
    prefill = _OrtPlan(tmp_path / PREFILL_FILE, {"inputs_embeds": (2, 64, text.hidden_size)})
    step = _OrtPlan(tmp_path / STEP_FILE, {"past_keys": (text.num_hidden_layers, 2, text.num_key_value_heads, 63,
                                                         text.head_dim)})
    engine = TensorRtLlmEngine(tiny_checkpoint, tmp_path, device="cpu", max_sequences=6, max_context=64,
                               plans=(prefill, step))
    assert engine.new_kv_only == (step_kv == "new")
    assert all(p.is_meta for p in engine.model.language_model.model.layers.parameters())  # in the plans
    assert _drive_both(model, LlmEngine(model, 6), engine, atol=1e-4) > 40
    assert max(prefill.batches) == 2 and max(step.batches) == 2 and len(step.batches) > 16  # in pieces of 2
    too_long = engine.run([LlmRequest(9, True, False, torch.arange(1, 66))])[0]
    assert isinstance(too_long, SequenceError) and "more than max_context 64" in str(too_long)
    with pytest.raises(EngineUnavailableError, match="does not fit the plans' profiles"):
        TensorRtLlmEngine(tiny_checkpoint, tmp_path, device="cpu", max_context=65, plans=(prefill, step))


def test_build_llm_engine_keeps_the_eager_engine_on_cpu(tiny_checkpoint):
    engine = build_llm_engine(LlmEngineSettings(), tiny_checkpoint, max_sequences=2)
    assert type(engine) is LlmEngine and engine.step_runner is None and engine.pool.cache.batch == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_equal_the_eager_engine_on_gpu(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cuda")
    eager = LlmEngine(model, 6)
    graphs = _static_engine(model, use_graphs=True)
    runner = graphs.step_runner
    assert runner.use_graphs
    runner.capture_all()
    assert sorted(runner.graphs) == [(n, s) for n in (1, 2, 4) for s in (8, 16, 64)]
    # float32 on GPU: eager and graphed steps may pick different attention kernels (mask vs none)
    assert _drive_both(model, eager, graphs, atol=1e-4) > 40
    assert sorted(runner.graphs) == [(n, s) for n in (1, 2, 4) for s in (8, 16, 64)]  # replayed, none re-captured

    # bfloat16 (the GPU config): the same greedy tokens as the eager engine on a short run
    model16 = load_model(tiny_checkpoint, dtype="bfloat16", device="cuda")
    eager16, graphs16 = LlmEngine(model16, 2), _static_engine(model16, max_sequences=2, use_graphs=True)
    ids = torch.arange(1, 8, device="cuda")
    a = eager16.run([LlmRequest(1, True, False, ids)])[0]
    b = graphs16.run([LlmRequest(1, True, False, ids)])[0]
    token = int(a.logits.argmax())
    assert token == int(b.logits.argmax())
    for _ in range(8):
        a = eager16.run([LlmRequest(1, False, False, torch.tensor([token], device="cuda"))])[0]
        b = graphs16.run([LlmRequest(1, False, False, torch.tensor([token], device="cuda"))])[0]
        torch.testing.assert_close(b.logits, a.logits, atol=0.1, rtol=0.02)
        token = int(a.logits.argmax())

"""ONNX export of the shared LLM (prefill + step graphs, explicit KV cache) against the torch path,
run with onnxruntime on CPU; and the TensorRT build script up to trtexec (configs, commands)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from funchat.model.checkpoint import build_model, randomize
from funchat.model.config import FunAudioChatConfig
from funchat.model.presets import preset_config
from funchat.engines import onnx_export as ox

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "services" / "tensorrt" / "build_engines.sh"
TOL = 1e-4
ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int64": onnx.TensorProto.INT64}


@pytest.fixture(scope="module")
def model():
    return randomize(build_model(FunAudioChatConfig.from_dict(preset_config("tiny"))), 0).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llm-onnx")
    ox.export_llm(model, out)
    return out


def _sessions(out: Path):
    return tuple(ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
                 for f in (ox.PREFILL_FILE, ox.STEP_FILE))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _close(a, b, what: str) -> None:
    diff = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"


def _cache_close(keys, values, cache, lengths, what: str) -> None:
    """ORT cache [L, B, K, S, d] against the torch KVCache on each row's valid positions."""
    for layer in range(keys.shape[0]):
        for b, n in enumerate(lengths):
            _close(keys[layer, b, :, :n], _np(cache.k[layer][b, :, :n]), f"{what} keys layer {layer} row {b}")
            _close(values[layer, b, :, :n], _np(cache.v[layer][b, :, :n]), f"{what} values layer {layer} row {b}")


def test_graphs_pass_the_checker_and_have_the_documented_signatures(exported, model):
    meta = json.loads((exported / ox.META_FILE).read_text())
    cfg = model.cfg.text
    assert meta["opset"] >= 17 and meta["dtype"] == "float32" and meta["step_kv"] == "present"
    assert meta["config"]["num_hidden_layers"] == cfg.num_hidden_layers
    assert meta["external_data"] is None and not (exported / ox.WEIGHTS_FILE).exists()
    for graph, fname, inputs, outputs in (("prefill", ox.PREFILL_FILE, ox.PREFILL_INPUTS, ox.PREFILL_OUTPUTS),
                                          ("step", ox.STEP_FILE, ox.STEP_INPUTS, ox.STEP_OUTPUTS)):
        onnx.checker.check_model(str(exported / fname), full_check=True)
        proto = onnx.load(str(exported / fname))
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == meta["opset"]
        assert [v.name for v in proto.graph.input] == list(inputs)
        assert [v.name for v in proto.graph.output] == list(outputs)
        spec = meta["graphs"][graph]
        for value in list(proto.graph.input) + list(proto.graph.output):
            want = spec["inputs"].get(value.name) or spec["outputs"][value.name]
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == want["shape"], (graph, value.name)
            assert value.type.tensor_type.elem_type == ONNX_TYPES[want["dtype"]], (graph, value.name)
    L, K, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    assert meta["graphs"]["step"]["outputs"]["present_keys"]["shape"] == [L, "batch", K, "past_plus_1", d]


@torch.no_grad()
def test_prefill_and_greedy_steps_match_torch(exported, model):
    """Batch of 3 right-padded prompts of different lengths, prefill then 4 greedy steps: logits,
    hidden and the cache of onnxruntime match the torch path (FunAudioChat.llm_forward + KVCache)."""
    prefill, step = _sessions(exported)
    lm = model.language_model
    lengths = torch.tensor([6, 2, 4])
    b, t = 3, 6
    ids = torch.randint(0, model.cfg.text.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))
    embeds = lm.embed(ids) * (torch.arange(t)[None] < lengths[:, None])[..., None]  # [B, T, E]

    cache = model.new_llm_cache(b, capacity=16)
    hidden, logits = model.llm_forward(embeds, cache, lengths)
    logits_o, hidden_o, keys, values = prefill.run(None, {"inputs_embeds": _np(embeds), "lengths": _np(lengths)})
    assert keys.shape == (model.cfg.text.num_hidden_layers, b, model.cfg.text.num_key_value_heads, t,
                          model.cfg.text.head_dim)
    _close(logits_o, _np(logits), "prefill logits_last")
    for row, n in enumerate(lengths.tolist()):
        _close(hidden_o[row, :n], _np(hidden[row, :n]), f"prefill hidden row {row}")
        assert not keys[:, row, :, n:].any() and not values[:, row, :, n:].any()  # padding zeroed
    _cache_close(keys, values, cache, lengths.tolist(), "prefill")

    tokens_t, tokens_o = [logits.argmax(-1)], [torch.from_numpy(logits_o).argmax(-1)]
    past_lengths = lengths.clone()
    for i in range(4):
        hidden, logits = model.llm_forward(lm.embed(tokens_t[-1])[:, None], cache)
        logits_o, hidden_o, keys, values = step.run(None, {
            "inputs_embeds": _np(lm.embed(tokens_o[-1])[:, None]), "past_keys": keys, "past_values": values,
            "past_lengths": _np(past_lengths)})
        past_lengths += 1
        assert keys.shape[3] == t + i + 1  # S + 1 per step
        _close(logits_o, _np(logits), f"step {i} logits")
        _close(hidden_o, _np(hidden), f"step {i} hidden")
        _cache_close(keys, values, cache, past_lengths.tolist(), f"step {i}")
        tokens_t.append(logits.argmax(-1))
        tokens_o.append(torch.from_numpy(logits_o).argmax(-1))
    assert torch.equal(torch.stack(tokens_t), torch.stack(tokens_o))


@torch.no_grad()
def test_step_takes_a_larger_batch_and_longer_cache_than_at_export(exported, model):
    """Exported with batch 2 and 6 cached positions; run with batch 6 and 50, rows of lengths 0..50."""
    _, step = _sessions(exported)
    cfg = model.cfg.text
    L, K, d, b, s = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 6, 50
    gen = torch.Generator().manual_seed(2)
    past_k, past_v = torch.randn(2, L, b, K, s, d, generator=gen)
    past_len = torch.tensor([50, 0, 17, 49, 1, 33])
    cache = model.new_llm_cache(b, capacity=s + 1)
    for layer in range(L):
        cache.k[layer][:, :, :s], cache.v[layer][:, :, :s] = past_k[layer], past_v[layer]
    cache.lengths = past_len.clone()
    x = model.language_model.embed(torch.randint(0, cfg.vocab_size, (b,), generator=gen))[:, None]
    hidden, logits = model.llm_forward(x, cache)
    logits_o, hidden_o, keys, values = step.run(None, {"inputs_embeds": _np(x), "past_keys": _np(past_k),
                                                       "past_values": _np(past_v), "past_lengths": _np(past_len)})
    assert logits_o.shape == (b, cfg.vocab_size) and hidden_o.shape == (b, 1, cfg.hidden_size)
    assert keys.shape == (L, b, K, s + 1, d)
    _close(logits_o, _np(logits), "logits")
    _close(hidden_o, _np(hidden), "hidden")
    _cache_close(keys, values, cache, (past_len + 1).tolist(), "present")


def test_new_kv_step_and_shared_external_weights(model, tmp_path):
    """step_kv="new" (only the new entry comes back) with both graphs reading one weights file."""
    paths = ox.export_llm(model, tmp_path, step_kv="new", external_data=True)
    assert paths["weights"] == tmp_path / ox.WEIGHTS_FILE
    graph_bytes = sum(p.numel() * 4 for n, p in model.language_model.named_parameters() if "embed_tokens" not in n)
    assert paths["weights"].stat().st_size < 1.2 * graph_bytes  # stored once, not once per graph
    for graph in ("prefill", "step"):
        onnx.checker.check_model(str(paths[graph]), full_check=True)
        assert paths[graph].stat().st_size < 200_000
    step_outputs = [o.name for o in onnx.load(str(paths["step"]), load_external_data=False).graph.output]
    assert step_outputs == list(ox.STEP_NEW_KV_OUTPUTS)
    diffs = ox.check_with_onnxruntime(model, tmp_path, lengths=(5, 1, 3), steps=4)
    assert diffs.pop("greedy_mismatches") == 0
    assert max(diffs.values()) <= TOL, diffs


def test_cli_exports_and_checks(tiny_checkpoint, tmp_path, capsys):
    assert ox.main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "onnx"), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "step/logits" in printed and (tmp_path / "onnx" / ox.STEP_FILE).is_file()
    assert ox.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_build_script_writes_triton_configs_and_trtexec_commands(exported, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)]).returncode == 0
    meta = json.loads((exported / ox.META_FILE).read_text())
    repo = tmp_path / "llm_trt"
    run = _script("--onnx-dir", str(exported), "--out", str(repo), "--dry-run", "--step-batch", "2:8:32",
                  "--past", "1:100:1000", "--seq", "1:64:512", "--fp16")
    assert run.returncode == 0, run.stderr
    commands = [line for line in run.stdout.splitlines() if line.startswith("trtexec ")]
    assert len(commands) == 2 and all("--fp16" in c and "--skipInference" in c for c in commands)
    L, K, d, e = (meta["config"][k] for k in ("num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size"))
    step_cmd = commands[1].replace("\\,", ",")
    assert f"--maxShapes=inputs_embeds:32x1x{e},past_keys:{L}x32x{K}x1000x{d}," in step_cmd
    assert f"--minShapes=inputs_embeds:1x1x{e},lengths:1" in commands[0].replace("\\,", ",")
    assert not list(repo.glob("*/1/model.plan"))

    for name, graph in (("llm_trt_prefill", "prefill"), ("llm_trt_step", "step")):
        cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.name == name and cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
        spec = meta["graphs"][graph]
        for tensors, want in ((cfg.input, spec["inputs"]), (cfg.output, spec["outputs"])):
            assert [t.name for t in tensors] == list(want)
            for t in tensors:
                dims = [x if isinstance(x, int) else -1 for x in want[t.name]["shape"]]
                assert list(t.dims) == dims, (name, t.name)
                assert mc.DataType.Name(t.data_type) == {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[want[t.name]["dtype"]]
    assert sorted(p.name for p in repo.iterdir()) == ["llm_trt_prefill", "llm_trt_step"]  # nothing else at the root

    bad = _script("--onnx-dir", str(exported), "--out", str(repo), "--config-only", "--past", "8:4:16")
    assert bad.returncode == 2 and "min <= opt <= max" in bad.stderr
    no_trt = _script("--onnx-dir", str(exported), "--out", str(tmp_path / "x"), "--trtexec", str(tmp_path / "none"))
    assert no_trt.returncode == 2 and "not executable" in no_trt.stderr

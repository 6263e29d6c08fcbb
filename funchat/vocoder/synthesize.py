"""Token files in, WAV files and golden-style dumps out (the `synthesize` and `vocoder-dump` commands)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from funchat.errors import CheckpointError
from funchat.vocoder.checkpoint import load_reference_folder, load_vocoder, pick_speaker
from funchat.vocoder.token2wav import Token2Wav, VocoderInputError


def read_tokens(path: str | Path) -> list[int]:
    """Speech tokens from JSON: `funchat respond` output (`speech_tokens`), {"tokens": [...]}, or a list."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise VocoderInputError(f"{path}: not a readable JSON token file ({exc})") from None
    if isinstance(data, dict):
        for key in ("speech_tokens", "tokens", "vocoder_tokens"):
            if key in data:
                data = data[key]
                break
        else:
            raise VocoderInputError(f"{path}: no 'speech_tokens' (or 'tokens') list")
    if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        raise VocoderInputError(f"{path}: speech tokens must be a list of integers")
    return data


def load_any_vocoder(checkpoint: str | Path) -> tuple[Token2Wav, dict[str, torch.Tensor]]:
    """Our vocoder folder (inside a funchat checkpoint), or a reference folder with flow.pt/hift.pt."""
    path = Path(checkpoint)
    if (path / "flow.pt").exists() and (path / "hift.pt").exists():
        return load_reference_folder(path), {}
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    return load_vocoder(path)


def write_wav(path: str | Path, wav: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sample_rate, subtype="PCM_16")


def synthesize(model: Token2Wav, tokens: list[int], xvec: torch.Tensor, stream: bool = False,
               mode: str = "incremental") -> tuple[torch.Tensor, dict[str, float]]:
    """-> (waveform [N*960], info: dropped codes, chunks, first-chunk samples)."""
    codes, dropped = model.clean_tokens(tokens)
    if not codes:
        raise VocoderInputError(f"no speech tokens to synthesise ({len(tokens)} given, {dropped} outside "
                                f"0..{model.cfg.codes - 1} dropped)")
    if not stream:
        return model.offline(codes, xvec), {"dropped_codes": dropped, "chunks": 1}
    state = model.start(xvec, mode)
    chunks = model.push(state, tokens, final=True)
    return torch.cat(chunks), {"dropped_codes": state.dropped_codes, "chunks": len(chunks),
                               "first_chunk_samples": chunks[0].numel()}


@torch.inference_mode()
def vocoder_dump(model: Token2Wav, tokens: list[int], xvec: np.ndarray, stream_mode: str = "reference") -> dict[str, np.ndarray]:
    """The golden set's array names for these inputs: offline path with intermediates, then streaming."""
    x = model.check_xvec(xvec)
    codes, _ = model.clean_tokens(tokens)
    if not codes:
        raise VocoderInputError("no speech tokens to synthesise (empty, or all outside 0..6560)")
    spf = model.cfg.hift.samples_per_frame
    t = len(codes) * model.cfg.flow.token_mel_ratio
    tok = torch.tensor([codes])
    wav, mel = model.offline(codes, x, return_mel=True)
    f0 = model.hift.predict_f0(mel[None])
    noise_sine = model.noise.source_noise(t * spf)
    out = {
        "in_tokens": np.array(codes, dtype=np.int64),
        "in_spk": x[None].numpy(),
        "off_mel": mel[None].numpy(),
        "off_calls": np.array([[len(codes), 0, 1]], dtype=np.int64),  # (tokens, token offset, finalize)
        "off_wav": wav[None].numpy(),
        "off_c0_spk_proj": model.flow.speaker_embedding(x[None]).numpy(),
        "off_c0_h": model.flow.encode_tokens(tok, finalize=True).numpy(),
        "off_c0_noise": model.noise.flow_noise(t).numpy(),
        "off_c0_flow_mel": mel[None].numpy(),
        "off_c0_f0": f0.numpy(),
        "off_c0_source": model.hift.source(f0, noise_sine).numpy(),
        "hift_noise_sine": noise_sine.numpy(),
    }
    state = model.start(x, stream_mode)
    trace: list[dict] = []
    chunks = model.push(state, codes, final=True, trace=trace)
    out["st_calls"] = np.array([[c["tokens"], c["offset"], int(c["finalize"]), c["samples"]] for c in trace], dtype=np.int64)
    for k, call in enumerate(trace):
        out[f"st_call{k}_flow_mel"] = call["flow_mel"][None].numpy()
        wav_k = chunks_by_call(chunks, trace)[k]
        out[f"st_call{k}_wav"] = wav_k[None].numpy()
    out["st_wav"] = torch.cat(chunks)[None].numpy()
    if stream_mode == "reference":
        out["st_cache_mel"] = state.mel[None].numpy()
    return out


def chunks_by_call(chunks: list[torch.Tensor], trace: list[dict]) -> list[torch.Tensor]:
    """`push` drops empty chunks; give every traced call its (possibly empty) chunk back."""
    it = iter(chunks)
    return [next(it) if call["samples"] else torch.zeros(0) for call in trace]

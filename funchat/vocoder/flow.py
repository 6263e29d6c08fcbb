"""The flow half of the CosyVoice 3 token2wav: 25 Hz speech tokens + speaker x-vector -> 50 Hz mel.

Pipeline (reference: `CausalMaskedDiffWithDiT` with a `CausalConditionalCFM` and a DiT estimator):

    tokens [B, N] -> embedding [B, N, 80] -> pre-lookahead layer (residual convs that peek 3 tokens
    ahead) -> h [B, N', 80] -> each token repeated token_mel_ratio times -> mu [B, 80, T]
    x-vector [B, 192] -> L2-normalise -> Linear -> spk [B, 80]
    noise [1, 80, T] --(Euler ODE, 10 steps, cosine times, classifier-free guidance)--> mel [B, 80, T]

No prompt is used: the prompt condition `cond` is all zeros. The initial noise is not drawn here:
the reference takes columns 0..T of one buffer drawn at construction (see `funchat.vocoder.noise`)
and every call starts at column 0, so callers pass that buffer (or a slice of it) in.

Parameter names equal the reference checkpoint's (`flow.pt`), so its state dict loads strictly.
Shapes: B batch, N tokens, T = N' * token_mel_ratio mel frames, C mel bins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from funchat.errors import CheckpointError
from funchat.vocoder.dit import DiT


@dataclass
class FlowConfig:
    """Every size and setting of the flow; `from_constructor_args` reads the reference's."""

    # Token side.
    vocab_size: int = 6561  # speech tokens 0..6560
    input_size: int = 80  # token embedding width (= mu width)
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192  # x-vector width
    token_mel_ratio: int = 2  # 25 Hz tokens -> 50 Hz mel frames
    pre_lookahead_len: int = 3  # tokens the pre-lookahead conv peeks ahead
    pre_lookahead_channels: int = 1024
    # DiT estimator.
    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: float = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    out_channels: int = 80
    static_chunk_size: int = 50  # attention chunk (mel frames) when the estimator runs in streaming mode
    num_decoding_left_chunks: int = -1  # kept for the record: the reference's chunk mask ignores it
    conv_pos_kernel: int = 31
    conv_pos_groups: int = 16
    time_freq_dim: int = 256
    rope_base: float = 10000.0
    # Conditional flow matching (CFM) solver.
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    sigma_min: float = 1e-6  # training only; recorded for completeness
    t_scheduler: str = "cosine"  # "cosine": t = 1 - cos(s * pi / 2); anything else: linear
    noise_frames: int = 15000  # length of the reference's fixed noise buffer (50 * 300 frames)

    def __post_init__(self):
        if self.dim % self.conv_pos_groups:
            raise CheckpointError(f"flow: DiT dim {self.dim} is not divisible by "
                                  f"conv_pos_groups {self.conv_pos_groups}")
        if self.mel_dim != self.output_size or self.mu_dim != self.input_size:
            raise CheckpointError(f"flow: DiT mel_dim/mu_dim {self.mel_dim}/{self.mu_dim} do not match "
                                  f"output_size/input_size {self.output_size}/{self.input_size}")
        if self.spk_dim != self.output_size:
            raise CheckpointError(f"flow: DiT spk_dim {self.spk_dim} != output_size {self.output_size} "
                                  "(the speaker affine layer projects to output_size)")

    @classmethod
    def full(cls) -> "FlowConfig":
        """Fun-CosyVoice3-0.5B's flow."""
        return cls()

    @classmethod
    def tiny(cls) -> "FlowConfig":
        """The golden tiny checkpoint `cosyvoice3-token2wav-tiny-a`."""
        return cls(pre_lookahead_channels=64, dim=64, depth=2, heads=2, dim_head=64)

    @classmethod
    def from_constructor_args(cls, d: dict[str, Any]) -> "FlowConfig":
        """From the golden `config.json`'s `constructor_args` (or directly its `flow` entry)."""
        flow = d.get("flow", d)
        try:
            lookahead = flow["pre_lookahead_layer"]
            decoder = flow["decoder"]
            est = decoder["estimator"]
            cfm = decoder["cfm_params"]
        except KeyError as e:
            raise CheckpointError(f"flow constructor args lack {e}") from None
        cfm = cfm.get("content", cfm)  # serialised omegaconf.DictConfig keeps its items under `content`
        if cfm.get("solver", "euler") != "euler":
            raise CheckpointError(f"flow: solver {cfm['solver']!r} is not supported (only 'euler')")
        if int(decoder.get("n_spks", 1)) != 1:
            raise CheckpointError(f"flow: n_spks={decoder['n_spks']} is not supported (only 1)")
        if int(lookahead.get("pre_lookahead_len", flow["pre_lookahead_len"])) != int(flow["pre_lookahead_len"]):
            raise CheckpointError("flow: pre_lookahead_len differs between the flow and its pre-lookahead layer")
        mel_dim = int(est.get("mel_dim", 80))
        return cls(
            vocab_size=int(flow["vocab_size"]),
            input_size=int(flow["input_size"]),
            output_size=int(flow["output_size"]),
            spk_embed_dim=int(flow["spk_embed_dim"]),
            token_mel_ratio=int(flow["token_mel_ratio"]),
            pre_lookahead_len=int(flow["pre_lookahead_len"]),
            pre_lookahead_channels=int(lookahead["channels"]),
            dim=int(est["dim"]),
            depth=int(est["depth"]),
            heads=int(est["heads"]),
            dim_head=int(est["dim_head"]),
            ff_mult=est["ff_mult"],
            mel_dim=mel_dim,
            mu_dim=int(est.get("mu_dim") or mel_dim),
            spk_dim=int(est.get("spk_dim") or 0),
            out_channels=int(est.get("out_channels") or mel_dim),
            static_chunk_size=int(est.get("static_chunk_size", 50)),
            num_decoding_left_chunks=int(est.get("num_decoding_left_chunks", -1)),
            inference_cfg_rate=float(cfm["inference_cfg_rate"]),
            sigma_min=float(cfm.get("sigma_min", 1e-6)),
            t_scheduler=str(cfm.get("t_scheduler", "cosine")),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlowConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"flow config has unknown keys {sorted(unknown)}")
        return cls(**d)


def time_schedule(n_steps: int, scheduler: str, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """[n_steps + 1] ODE times from 0 to 1. Cosine packs steps near t = 0, where the flow from
    noise changes fastest. The expression order is the reference's, for identical float32 values."""
    s = torch.linspace(0, 1, n_steps + 1, dtype=dtype, device=device)
    if scheduler == "cosine":
        return 1 - torch.cos(s * 0.5 * torch.pi)
    return s


class PreLookaheadLayer(nn.Module):
    """Token embeddings [B, N, C] -> [B, N, C]: conv (kernel L+1) over each token and the L after it,
    leaky ReLU, causal conv (kernel 3), plus the input (residual).

    At the right edge the L look-ahead positions are the `context` tokens when given (a streaming
    call that has more tokens than it emits) and zeros otherwise (the final call).
    """

    def __init__(self, channels_in: int, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels_in, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels_in, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        y = x.transpose(1, 2)  # [B, C, N]
        if context is None or context.shape[1] == 0:
            y = F.pad(y, (0, self.lookahead))  # [B, C, N+L]
        else:
            if context.shape[1] > self.lookahead:
                raise ValueError(f"context of {context.shape[1]} tokens > lookahead {self.lookahead}")
            y = torch.cat((y, context.transpose(1, 2)), dim=2)  # [B, C, N+len(ctx)]
            y = F.pad(y, (0, self.lookahead - context.shape[1]))  # [B, C, N+L]
        y = F.leaky_relu(self.conv1(y), 0.01)  # [B, channels, N]
        y = self.conv2(F.pad(y, (self.conv2.kernel_size[0] - 1, 0)))  # [B, C, N]
        return y.transpose(1, 2) + x  # [B, N, C]


class CFM(nn.Module):
    """Euler solver of the conditional flow with classifier-free guidance (`decoder` in the
    reference's names; its only parameters are the estimator's)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.estimator = DiT(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head,
                             ff_mult=cfg.ff_mult, mel_dim=cfg.mel_dim, mu_dim=cfg.mu_dim, spk_dim=cfg.spk_dim,
                             conv_pos_kernel=cfg.conv_pos_kernel, conv_pos_groups=cfg.conv_pos_groups,
                             time_freq_dim=cfg.time_freq_dim, rope_base=cfg.rope_base)

    def guided_velocity(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                        spk: torch.Tensor, cond: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
        """CFG velocity at one time. x, cond: [B, C, T]; mask: [B, 1, T]; mu: [B, Cmu, T]; t: [1];
        spk: [B, S]. The conditional and unconditional rows run as one batch of 2B; the
        unconditional rows get zero mu, speaker and cond (what the model saw when training drops
        its condition)."""
        b = x.shape[0]
        x_in = torch.cat((x, x), dim=0)  # [2B, C, T]
        mask_in = torch.cat((mask, mask), dim=0)  # [2B, 1, T]
        mu_in = torch.cat((mu, torch.zeros_like(mu)), dim=0)  # [2B, Cmu, T]
        spk_in = torch.cat((spk, torch.zeros_like(spk)), dim=0)  # [2B, S]
        cond_in = torch.cat((cond, torch.zeros_like(cond)), dim=0)  # [2B, C, T]
        t_in = t.reshape(1).expand(2 * b).contiguous()  # [2B]
        v = self.estimator(x_in, mask_in, mu_in, t_in, spk_in, cond_in, chunk_size)  # [2B, C, T]
        v_cond, v_uncond = v[:b], v[b:]
        rate = self.cfg.inference_cfg_rate
        return (1.0 + rate) * v_cond - rate * v_uncond

    def forward(self, noise: torch.Tensor, mu: torch.Tensor, spk: torch.Tensor, cond: torch.Tensor,
                mask: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
        """Integrate from noise [B, C, T] at t=0 to the mel at t=1 -> [B, C, T] (float32)."""
        t_span = time_schedule(self.cfg.n_timesteps, self.cfg.t_scheduler, mu.dtype, mu.device)  # [S+1]
        x = noise
        # The reference accumulates t (t += dt) and takes each next dt as t_span[k+1] - t, so the
        # times it feeds the estimator are sums of float32 steps, not t_span itself. Copied as is.
        t = t_span[:1]  # [1]
        dt = t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            x = x + dt * self.guided_velocity(x, mask, mu, t, spk, cond, chunk_size)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()


class Flow(nn.Module):
    """Speech tokens + x-vector -> mel. `state_dict()` keys equal the reference `flow.pt`'s."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(cfg.input_size, cfg.pre_lookahead_channels,
                                                     cfg.pre_lookahead_len)
        self.decoder = CFM(cfg)

    def speaker_embedding(self, xvec: torch.Tensor) -> torch.Tensor:
        """x-vector [B, 192] -> [B, 80]. Normalised first: the x-vector's scale carries no identity."""
        weight = self.spk_embed_affine_layer.weight
        return self.spk_embed_affine_layer(F.normalize(xvec.float(), dim=1).to(weight.dtype))

    def encode_tokens(self, tokens: torch.Tensor, finalize: bool) -> torch.Tensor:
        """tokens [B, N] -> h [B, N', 80], before the repeat into mel frames.

        finalize=True: N' = N, the look-ahead past the last token is zeros (the utterance ended).
        finalize=False: N' = N - lookahead; the last `lookahead` tokens are only context for the
        tokens before them and get no output of their own (they are emitted by a later call).
        """
        emb = self.input_embedding(tokens.clamp(min=0))  # [B, N, C]
        if finalize:
            return self.pre_lookahead_layer(emb)
        n_ctx = self.cfg.pre_lookahead_len
        if tokens.shape[1] <= n_ctx:
            raise ValueError(f"a non-final call needs more than {n_ctx} tokens, got {tokens.shape[1]}")
        return self.pre_lookahead_layer(emb[:, :-n_ctx], context=emb[:, -n_ctx:])  # [B, N-L, C]

    def regulate_length(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, N, C] -> mu [B, C, N * token_mel_ratio]: each token held for ratio frames, channels first."""
        return h.repeat_interleave(self.cfg.token_mel_ratio, dim=1).transpose(1, 2).contiguous()

    def mu(self, tokens: torch.Tensor, finalize: bool) -> torch.Tensor:
        """tokens [B, N] -> token condition mu [B, 80, T]."""
        return self.regulate_length(self.encode_tokens(tokens, finalize))

    def solve(self, mu: torch.Tensor, spk: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None,
              cond: torch.Tensor | None = None, streaming: bool = False) -> torch.Tensor:
        """Run the CFM on an explicit window. mu [B, 80, T]; spk [B, 80] (already projected);
        noise [B or 1, 80, >=T] (columns 0..T are used); mask [B, 1, T] (default all valid);
        cond [B, 80, T] (default zeros: no prompt); streaming: chunked attention
        (`static_chunk_size` frames) instead of full attention. -> mel [B, 80, T] float32."""
        b, _, t = mu.shape
        if noise.shape[2] < t:
            raise ValueError(f"noise has {noise.shape[2]} frames, {t} needed")
        x0 = noise[:, :, :t].to(mu.dtype).expand(b, -1, -1)  # [B, C, T]
        if mask is None:
            mask = torch.ones(b, 1, t, dtype=mu.dtype, device=mu.device)
        if cond is None:
            cond = torch.zeros(b, self.cfg.output_size, t, dtype=mu.dtype, device=mu.device)
        chunk = self.cfg.static_chunk_size if streaming else 0
        return self.decoder(x0, mu, spk.to(mu.dtype), cond, mask.to(mu.dtype), chunk)

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, xvec: torch.Tensor, noise: torch.Tensor, finalize: bool,
                  streaming: bool = False) -> torch.Tensor:
        """One reference flow call over all tokens so far: tokens [1, N], xvec [1, 192],
        noise [1, 80, >=T] -> mel [1, 80, T], T = N' * token_mel_ratio (N' as in `encode_tokens`).

        The Fun-Audio-Chat server calls the reference with streaming=False even for its chunked
        calls: full attention over all frames, the same computation as offline except for the
        pre-lookahead context (finalize=False).
        """
        if tokens.shape[0] != 1:
            raise ValueError(f"inference takes one utterance, got batch {tokens.shape[0]}")
        spk = self.speaker_embedding(xvec)  # [1, 80]
        mu = self.mu(tokens, finalize)  # [1, 80, T]
        return self.solve(mu, spk, noise, streaming=streaming)

"""The FramePack packed HunyuanVideo DiT (`HunyuanVideoTransformer3DModelPacked`).

Parameter names and shapes are those of the public checkpoints (lllyasviel/FramePackI2V_HY, FramePack-F1, Kijai's
single bf16 file). The config is plain constructor arguments; `PackedDiTConfig.from_shapes` reads it from a
checkpoint, and the values shapes cannot reveal are the model family's constants below.

Token layout per sample: image stream [clean4x, clean2x, clean1x, noisy], text stream [SigLIP tokens, LLaMA tokens].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from frame_pack.attention import attention

logger = logging.getLogger(__name__)

# Constants of the FramePack/HunyuanVideo family that a state dict cannot reveal.
ROPE_AXES_DIM = (16, 56, 56)  # T, Y, X channels of each head; sums to head_dim 128
ROPE_THETA = 256.0
NORM_EPS = 1e-6
TIMESTEP_CHANNELS = 256  # sinusoidal embedding width
TIMESTEP_MAX_PERIOD = 10000
HEAD_DIM = 128


@dataclass
class PackedDiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = HEAD_DIM
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    image_proj_dim: int = 1152
    rope_theta: float = ROPE_THETA
    rope_axes_dim: tuple[int, int, int] = field(default=ROPE_AXES_DIM)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config_json: dict | None = None) -> PackedDiTConfig:
        """Read the config from tensor shapes; keys of a diffusers `config.json` override what they name."""

        def count(prefix: str) -> int:
            ids = {int(k[len(prefix) :].split(".")[0]) for k in shapes if k.startswith(prefix)}
            return max(ids) + 1 if ids else 0

        x_w = shapes["x_embedder.proj.weight"]  # (inner, in, pt, p, p)
        inner, in_channels, patch_t, patch = x_w[0], x_w[1], x_w[2], x_w[3]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        values = dict(
            in_channels=in_channels,
            out_channels=shapes["proj_out.weight"][0] // (patch_t * patch * patch),
            num_attention_heads=inner // head_dim,
            attention_head_dim=head_dim,
            num_layers=count("transformer_blocks."),
            num_single_layers=count("single_transformer_blocks."),
            num_refiner_layers=count("context_embedder.token_refiner.refiner_blocks."),
            mlp_ratio=shapes["transformer_blocks.0.ff.net.0.proj.weight"][0] / inner,
            patch_size=patch,
            patch_size_t=patch_t,
            text_embed_dim=shapes["context_embedder.proj_in.weight"][1],
            pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            image_proj_dim=shapes["image_projection.up.weight"][1],
        )
        if head_dim != HEAD_DIM:
            raise ValueError(f"head_dim {head_dim} read from norm_q; the FramePack family uses {HEAD_DIM}")
        for key in ("rope_theta", "rope_axes_dim", *values):
            if config_json and key in config_json:
                values[key] = tuple(config_json[key]) if key == "rope_axes_dim" else config_json[key]
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.LayerNorm):
    """Layer norm computed in the input dtype, result cast back to it."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x_normed = (x * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return x_normed * self.weight.to(x.dtype)


def timestep_sinusoids(t: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """(B,) -> (B, channels) fp32: [cos(t·f_i), sin(t·f_i)], f_i = exp(-ln(10000)·i/half)."""
    half = channels // 2
    freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepGuidanceTextEmbedding(nn.Module):
    """temb = MLP_t(sin(t)) + MLP_g(sin(guidance)) + MLP_text(pooled CLIP)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.guidance_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep, guidance, pooled):
        t_emb = self.timestep_embedder(timestep_sinusoids(timestep).to(pooled.dtype))
        g_emb = self.guidance_embedder(timestep_sinusoids(guidance).to(pooled.dtype))
        return t_emb + g_emb + self.text_embedder(pooled)


class TimestepTextEmbedding(nn.Module):
    """Refiner conditioning: MLP_t(sin(t)) + MLP_text(masked mean of the LLaMA features)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_CHANNELS, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep, pooled):
        return self.timestep_embedder(timestep_sinusoids(timestep).to(pooled.dtype)) + self.text_embedder(pooled)


class FeedForward(nn.Module):
    """net.0.proj -> activation -> (net.1 dropout, no params) -> net.2."""

    def __init__(self, dim: int, hidden: int, activation: Callable):
        super().__init__()
        self.activation = activation
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(hidden, dim)])

    def forward(self, x):
        return self.net[2](self.net[1](self.activation(self.net[0].proj(x))))


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class AdaNormZero(nn.Module):
    """AdaLN-Zero: Linear(SiLU(temb)) split into `chunks` modulation vectors, first three used on x here."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.chunks = chunks

    def forward(self, x, temb):
        mods = self.linear(F.silu(temb.unsqueeze(-2))).chunk(self.chunks, dim=-1)
        shift, scale = mods[0], mods[1]
        return self.norm(x) * (1 + scale) + shift, mods[2:]


class OutputNorm(nn.Module):
    """AdaLayerNormContinuous: chunk order is (scale, shift)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: (B, N, H, D); freqs: (B, N, 2D) = [cos | sin]. Rotates channel pairs (2j, 2j+1), fp32 math."""
    cos, sin = freqs.unsqueeze(-2).chunk(2, dim=-1)
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RotaryPosEmbed3D(nn.Module):
    """Per-token RoPE tables for frame indices on a (post-patch) H×W grid."""

    def __init__(self, axes_dim: tuple[int, int, int], theta: float):
        super().__init__()
        self.axes_dim = axes_dim
        self.theta = theta

    def _axis(self, dim: int, positions: torch.Tensor):
        inv = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
        angles = torch.outer(inv, positions.reshape(-1)).unflatten(-1, positions.shape)
        angles = angles.repeat_interleave(2, dim=0)  # (dim, T, H, W)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def forward(self, frame_indices: torch.Tensor, height: int, width: int, hw_scale: float = 1.0) -> torch.Tensor:
        """frame_indices: (B, T) -> (B, 2·sum(axes_dim), T, height, width)."""
        device = frame_indices.device
        tables = []
        for frames in frame_indices.unbind(0):
            grid_t, grid_y, grid_x = torch.meshgrid(
                frames.to(torch.float32),
                torch.arange(height, dtype=torch.float32, device=device) * hw_scale,
                torch.arange(width, dtype=torch.float32, device=device) * hw_scale,
                indexing="ij",
            )
            (ct, st), (cy, sy), (cx, sx) = (self._axis(d, g) for d, g in zip(self.axes_dim, (grid_t, grid_y, grid_x)))
            tables.append(torch.cat([ct, cy, cx, st, sy, sx], dim=0))
        return torch.stack(tables)


def pad_to_multiple(x: torch.Tensor, multiple: tuple[int, int, int]) -> torch.Tensor:
    """Replicate-pad the last three dims (T, H, W) at their end to multiples of `multiple`."""
    pads = [(-size) % m for size, m in zip(x.shape[-3:], multiple)]
    if not any(pads):
        return x
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")


def tokens_first(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T·H·W, C), tokens in (t, y, x) row-major order."""
    return x.flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, T·H'·W', C·pt·ph·pw) -> (B, C, T·pt, H'·ph, W'·pw); each token's channels are read as (c, pt, ph, pw)."""
    (t, h, w), (pt, ph, pw) = grid, patch
    return einops.rearrange(
        tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw
    )


class CleanLatentEmbedder(nn.Module):
    """Patch embeddings of the clean context latents at 1x, 2x and 4x compression."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))


class ImageProjection(nn.Module):
    """SigLIP features -> DiT width: down(SiLU(up(x)))."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.up = nn.Linear(in_dim, dim * 3)
        self.down = nn.Linear(dim * 3, dim)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


class RefinerAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, mask):
        q, k, v = (proj(x).unflatten(2, (self.heads, -1)).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        return self.to_out[1](self.to_out[0](out))


class RefinerGates(nn.Module):
    """HunyuanVideoAdaNorm: Linear(SiLU(temb)) -> (gate_msa, gate_mlp), each (B, 1, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, temb):
        gate_msa, gate_mlp = self.linear(F.silu(temb)).chunk(2, dim=1)
        return gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)


class RefinerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=NORM_EPS, elementwise_affine=True)
        self.attn = RefinerAttention(dim, heads)
        self.norm2 = LayerNorm(dim, eps=NORM_EPS, elementwise_affine=True)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), F.silu)
        self.norm_out = RefinerGates(dim)

    def forward(self, x, temb, mask):
        gate_msa, gate_mlp = self.norm_out(temb)
        x = x + self.attn(self.norm1(x), mask) * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class TokenRefinerStack(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float):
        super().__init__()
        self.refiner_blocks = nn.ModuleList([RefinerBlock(dim, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x, temb, mask: torch.Tensor | None):
        attn_mask = None
        if mask is not None:
            valid = mask.to(x.device).bool()
            attn_mask = (valid[:, None, None, :] & valid[:, None, :, None]).clone()
            attn_mask[:, :, :, 0] = True  # every row attends somewhere, even padding rows
        for block in self.refiner_blocks:
            x = block(x, temb, attn_mask)
        return x


class TokenRefiner(nn.Module):
    """`context_embedder`: LLaMA features -> refined text tokens, conditioned on t and their masked mean."""

    def __init__(self, in_dim: int, dim: int, heads: int, layers: int, mlp_ratio: float):
        super().__init__()
        self.time_text_embed = TimestepTextEmbedding(dim, in_dim)
        self.proj_in = nn.Linear(in_dim, dim)
        self.token_refiner = TokenRefinerStack(dim, heads, layers, mlp_ratio)

    def forward(self, x, timestep, mask):
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            m = mask.float().unsqueeze(-1)
            pooled = ((x * m).sum(dim=1) / m.sum(dim=1)).to(x.dtype)
        temb = self.time_text_embed(timestep, pooled)
        return self.token_refiner(self.proj_in(x), temb, mask)


class JointAttention(nn.Module):
    """Attention of the double (separate text projections) and single (shared projections) blocks."""

    def __init__(self, dim: int, heads: int, dual_stream: bool):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        if dual_stream:
            self.add_q_proj = nn.Linear(dim, dim)
            self.add_k_proj = nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
            self.norm_added_q = RMSNorm(head_dim)
            self.norm_added_k = RMSNorm(head_dim)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
            self.to_add_out = nn.Linear(dim, dim)
        self.dual_stream = dual_stream

    def _qkv(self, x, projections, norms):
        q, k, v = (proj(x).unflatten(2, (self.heads, -1)) for proj in projections)
        return norms[0](q), norms[1](k), v

    def forward(self, img, txt, rope, attn_opts):
        """img: (B, Ni, dim), txt: (B, Nt, dim), rope: (B, Ni, 2·head_dim). Returns the two output streams."""
        n_img = img.shape[1]
        if self.dual_stream:
            q, k, v = self._qkv(img, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k))
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            tq, tk, tv = self._qkv(
                txt, (self.add_q_proj, self.add_k_proj, self.add_v_proj), (self.norm_added_q, self.norm_added_k)
            )
            q, k, v = torch.cat([q, tq], 1), torch.cat([k, tk], 1), torch.cat([v, tv], 1)
        else:
            q, k, v = self._qkv(torch.cat([img, txt], 1), (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k))
            q = torch.cat([apply_rope(q[:, :n_img], rope), q[:, n_img:]], 1)
            k = torch.cat([apply_rope(k[:, :n_img], rope), k[:, n_img:]], 1)
        out = attention(q, k, v, **attn_opts).flatten(2)
        img_out, txt_out = out[:, :n_img], out[:, n_img:]
        if self.dual_stream:
            return self.to_out[1](self.to_out[0](img_out)), self.to_add_out(txt_out)
        return img_out, txt_out


class DoubleStreamBlock(nn.Module):
    """`HunyuanVideoTransformerBlock`: image and text streams with separate weights and joint attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = AdaNormZero(dim, 6)
        self.norm1_context = AdaNormZero(dim, 6)
        self.attn = JointAttention(dim, heads, dual_stream=True)
        self.norm2 = LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.ff = FeedForward(dim, hidden, gelu_tanh)
        self.norm2_context = LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)
        self.ff_context = FeedForward(dim, hidden, gelu_tanh)

    def forward(self, img, txt, temb, rope, attn_opts):
        img_n, (gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(img, temb)
        txt_n, (c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(txt, temb)
        img_attn, txt_attn = self.attn(img_n, txt_n, rope, attn_opts)
        img = img + img_attn * gate
        txt = txt + txt_attn * c_gate
        img = img + gate_mlp * self.ff(self.norm2(img) * (1 + scale_mlp) + shift_mlp)
        txt = txt + c_gate_mlp * self.ff_context(self.norm2_context(txt) * (1 + c_scale_mlp) + c_shift_mlp)
        return img, txt


class SingleStreamBlock(nn.Module):
    """`HunyuanVideoSingleTransformerBlock`: one stream [image; text], attention and MLP in parallel."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attn = JointAttention(dim, heads, dual_stream=False)
        self.norm = AdaNormZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + hidden, dim)

    def forward(self, img, txt, temb, rope, attn_opts):
        n_img = img.shape[1]
        residual = torch.cat([img, txt], 1)
        normed, (gate,) = self.norm(residual, temb)
        mlp = self.act_mlp(self.proj_mlp(normed))
        img_attn, txt_attn = self.attn(normed[:, :n_img], normed[:, n_img:], rope, attn_opts)
        out = gate * self.proj_out(torch.cat([torch.cat([img_attn, txt_attn], 1), mlp], dim=2)) + residual
        return out[:, :n_img], out[:, n_img:]


def checkpoint_with_cpu_offload(fn, *args):
    """Gradient checkpoint of `fn` whose kept inputs live in CPU memory until backward: tensor arguments are
    copied to the CPU before the checkpoint (which keeps what it is given) and back to their device inside it, so
    the recomputation in backward reads them from the CPU. Copies are exact, so gradients equal plain
    checkpointing."""
    devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]

    def on_device(*offloaded):
        return fn(*(a if d is None else a.to(d, non_blocking=True) for a, d in zip(offloaded, devices)))

    offloaded = [a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args]
    return checkpoint(on_device, *offloaded, use_reentrant=False)


class HunyuanVideoTransformer3DModelPacked(nn.Module):
    def __init__(self, config: PackedDiTConfig, attn_mode: str = "torch", split_attn: bool = False):
        super().__init__()
        self.config = config
        dim, heads, c = config.inner_dim, config.num_attention_heads, config.in_channels
        p, pt = config.patch_size, config.patch_size_t
        if sum(config.rope_axes_dim) != config.attention_head_dim:
            raise ValueError(f"rope axes {config.rope_axes_dim} must sum to head_dim {config.attention_head_dim}")

        embed = nn.Module()
        embed.proj = nn.Conv3d(c, dim, kernel_size=(pt, p, p), stride=(pt, p, p))
        self.x_embedder = embed
        self.context_embedder = TokenRefiner(
            config.text_embed_dim, dim, heads, config.num_refiner_layers, config.mlp_ratio
        )
        self.time_text_embed = TimestepGuidanceTextEmbedding(dim, config.pooled_projection_dim)
        self.clean_x_embedder = CleanLatentEmbedder(c, dim)
        self.image_projection = ImageProjection(config.image_proj_dim, dim)
        self.rope = RotaryPosEmbed3D(config.rope_axes_dim, config.rope_theta)
        self.transformer_blocks = nn.ModuleList(
            [DoubleStreamBlock(dim, heads, config.mlp_ratio) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, heads, config.mlp_ratio) for _ in range(config.num_single_layers)]
        )
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, pt * p * p * config.out_channels)

        self.attn_mode = attn_mode
        self.split_attn = split_attn
        self.gradient_checkpointing = False
        self.gradient_checkpointing_cpu_offload = False
        self.high_quality_fp32_output_for_inference = True
        self.rope_scaling_factor = 1.0
        self.rope_scaling_timestep_threshold: float | None = None
        self.block_swap = None  # frame_pack.block_swap.BlockSwap, set by enable_block_swap
        self.step_cache = None  # a frame_pack.step_cache cache (TeaCache, MagCache), set per sampling run

    # ---- switches ----------------------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self, cpu_offload: bool = False):
        """Recompute each checkpointed part in backward; with `cpu_offload` the inputs it keeps for that wait in
        CPU memory (`checkpoint_with_cpu_offload`)."""
        self.gradient_checkpointing = True
        self.gradient_checkpointing_cpu_offload = cpu_offload

    def disable_gradient_checkpointing(self):
        self.gradient_checkpointing = False
        self.gradient_checkpointing_cpu_offload = False

    def enable_rope_scaling(self, timestep_threshold: float | None, factor: float):
        """Scale H/W RoPE positions by `factor` while timestep >= threshold (`--rope_scaling_*`)."""
        if timestep_threshold is not None and factor > 0:
            self.rope_scaling_timestep_threshold, self.rope_scaling_factor = timestep_threshold, factor
        else:
            self.rope_scaling_timestep_threshold, self.rope_scaling_factor = None, 1.0

    def enable_block_swap(
        self,
        blocks_to_swap: int,
        device: torch.device,
        supports_backward: bool = False,
        use_pinned_memory: bool = False,
    ):
        from frame_pack.block_swap import BlockSwap

        if blocks_to_swap <= 0:
            self.block_swap = None
            return
        if torch.device(device).type == "cpu":
            logger.warning("--blocks_to_swap has no effect when the model runs on the CPU; ignoring it")
            self.block_swap = None
            return
        self.block_swap = BlockSwap.for_model(self, blocks_to_swap, device, supports_backward, use_pinned_memory)

    def offload_to_cpu(self) -> None:
        """The whole model to the CPU; with block swap, after its transfers in flight (it comes back with
        `move_to_device_except_swap_blocks`)."""
        if self.block_swap is None:
            self.to("cpu")
        else:
            self.block_swap.offload_model(self)

    def move_to_device_except_swap_blocks(self, device: torch.device):
        """Move everything to `device`; swapped blocks keep their weights where block swap put them."""
        if self.block_swap is None:
            self.to(device)
        else:
            self.block_swap.move_model(self, device)

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _run(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self.gradient_checkpointing_cpu_offload:
                return checkpoint_with_cpu_offload(fn, *args)
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _embed_image_tokens(
        self, latents, latent_indices, clean_groups, hw_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Patch-embed noisy and clean latents; returns tokens (B, N, dim), rope (B, N, 2·head_dim), (T, H', W')."""
        x = self._run(self.x_embedder.proj, latents)  # (B, dim, T, H', W')
        b, _, t, h, w = x.shape
        if latent_indices is None:
            latent_indices = torch.arange(t, device=x.device).unsqueeze(0).expand(b, -1)
        tokens = [tokens_first(x)]
        ropes = [tokens_first(self.rope(latent_indices.to(x.device), h, w, hw_scale))]
        embedders = (
            (self.clean_x_embedder.proj, None),
            (self.clean_x_embedder.proj_2x, (2, 4, 4)),
            (self.clean_x_embedder.proj_4x, (4, 8, 8)),
        )
        for (clean, indices), (proj, pad) in zip(clean_groups, embedders):
            if clean is None or indices is None:
                continue
            clean = clean.to(device=x.device, dtype=x.dtype)
            rope = self.rope(indices.to(x.device), h, w, hw_scale)
            if pad is not None:
                clean = pad_to_multiple(clean, pad)
                pool = (pad[0],) * 3  # RoPE grid is already post-patch: (2,2,2) for 2x, (4,4,4) for 4x
                rope = F.avg_pool3d(pad_to_multiple(rope, pool), kernel_size=pool, stride=pool)
            tokens.insert(0, tokens_first(self._run(proj, clean)))
            ropes.insert(0, tokens_first(rope))
        return torch.cat(tokens, 1), torch.cat(ropes, 1), (t, h, w)

    def _run_blocks(self, img, txt, temb, rope, attn_opts) -> torch.Tensor:
        """All double then single blocks; returns the image tokens (the text stream is not needed after them)."""
        blocks = list(self.transformer_blocks) + list(self.single_transformer_blocks)
        if self.block_swap is not None:
            self.block_swap.before_forward()
        for i, block in enumerate(blocks):
            if self.block_swap is not None:
                self.block_swap.wait_for(i)
            img, txt = self._run(block, img, txt, temb, rope, attn_opts)
            if self.block_swap is not None:
                self.block_swap.after_block(i)
        return img

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor,
        latent_indices: torch.Tensor | None = None,
        clean_latents: torch.Tensor | None = None,
        clean_latent_indices: torch.Tensor | None = None,
        clean_latents_2x: torch.Tensor | None = None,
        clean_latent_2x_indices: torch.Tensor | None = None,
        clean_latents_4x: torch.Tensor | None = None,
        clean_latent_4x_indices: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B,16,T,h,w) -> velocity (B,16,T,h,w); fp32 when high_quality_fp32_output_for_inference."""
        hw_scale = 1.0
        if self.rope_scaling_timestep_threshold is not None:
            if timestep[0].item() >= self.rope_scaling_timestep_threshold:
                hw_scale = self.rope_scaling_factor
        b = hidden_states.shape[0]
        p, pt = self.config.patch_size, self.config.patch_size_t
        clean_groups = (
            (clean_latents, clean_latent_indices),
            (clean_latents_2x, clean_latent_2x_indices),
            (clean_latents_4x, clean_latent_4x_indices),
        )
        img, rope, (t, h, w) = self._embed_image_tokens(hidden_states, latent_indices, clean_groups, hw_scale)
        n_noisy = t * h * w

        temb = self._run(self.time_text_embed, timestep, guidance, pooled_projections)
        txt = self._run(self.context_embedder, encoder_hidden_states, timestep, encoder_attention_mask)
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(txt.shape[:2], dtype=torch.bool, device=txt.device)
        if image_embeddings is not None:
            # Image tokens first, so that each sample's valid text tokens stay a contiguous prefix.
            img_tokens = self._run(self.image_projection, image_embeddings.to(txt.dtype))
            txt = torch.cat([img_tokens, txt], 1)
            ones = torch.ones(img_tokens.shape[:2], dtype=encoder_attention_mask.dtype, device=txt.device)
            encoder_attention_mask = torch.cat([ones, encoder_attention_mask.to(txt.device)], 1)

        text_lengths = encoder_attention_mask.sum(dim=1).tolist()
        if b == 1:
            txt = txt[:, : int(text_lengths[0])]
            valid_lengths = None
        else:
            valid_lengths = [img.shape[1] + int(n) for n in text_lengths]
        attn_opts = dict(mode=self.attn_mode, valid_lengths=valid_lengths, split_attn=self.split_attn)

        cache = self.step_cache
        if cache is None:
            img = self._run_blocks(img, txt, temb, rope, attn_opts)
        elif cache.should_compute(lambda: self.transformer_blocks[0].norm1(img, temb)[0]):
            before = img
            img = self._run_blocks(img, txt, temb, rope, attn_opts)
            cache.record(img - before)
        else:
            img = cache.apply(img)

        img = self._run(self.norm_out, img, temb)[:, -n_noisy:]
        if self.high_quality_fp32_output_for_inference:
            img = img.float()
            if self.proj_out.weight.dtype != torch.float32:
                self.proj_out.float()
        return unpatchify(self._run(self.proj_out, img), (t, h, w), (pt, p, p))

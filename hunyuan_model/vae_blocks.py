"""Building blocks of the HunyuanVideo causal 3D VAE (encoder, decoder and their parts).

Module attribute names follow the checkpoint keys (the diffusers `AutoencoderKLHunyuanVideo` layout, which the
official `pytorch_model.pt` shares), e.g. `down_blocks.1.resnets.0.conv1.conv.weight`. All tensors are
`B, C, T, H, W`. Convolutions and attention are causal in time (frame t reads frames ≤ t, the first frame is
up/downsampled spatially only), which gives video lengths of 1 + 4·(latent frames − 1); GroupNorm statistics
still span the whole clip.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK_TRIGGER = 1.5  # a CausalConv3d is chunked only when its input width >= CHUNK_TRIGGER · chunk_size

Stride = tuple[int, int, int]  # (T, H, W)


class CausalConv3d(nn.Module):
    """Conv3d behind replicate padding: k//2 on both sides of H and W, k−1 frames in front of T (none behind).

    With `chunk_size` set, inputs at least 1.5·chunk_size wide are convolved in column chunks of about
    chunk_size (a multiple of the stride; a remainder under half a chunk joins the last chunk). Each chunk reads
    its k//2 halo columns and is padded on its own, so neither the padded input nor the full-width conv workspace
    is ever materialised; the result is the same convolution, written into one preallocated output.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int | Stride = 1):
        super().__init__()
        self.kernel_size = kernel_size
        self.chunk_size: int | None = None
        p = kernel_size // 2
        self.padding = (p, p, p, p, kernel_size - 1, 0)  # F.pad order: W left/right, H top/bottom, T front/back
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_size and x.shape[-1] >= CHUNK_TRIGGER * self.chunk_size:
            return self._chunked_forward(x)
        return self.conv(F.pad(x, self.padding, mode="replicate"))

    def chunk_bounds(self, width: int) -> list[tuple[int, int]]:
        """Output-column ranges [start, end) of the chunks for an input `width` columns wide."""
        k, s = self.kernel_size, self.conv.stride[2]
        out_width = (width + 2 * (k // 2) - k) // s + 1
        step = max(self.chunk_size - self.chunk_size % s, s)  # input columns per chunk
        cuts = [0]
        while cuts[-1] < width:
            nxt = cuts[-1] + step
            cuts.append(width if width - nxt < step // 2 else nxt)
        outs = [c // s for c in cuts[:-1]] + [out_width]
        return list(zip(outs[:-1], outs[1:]))

    def _chunked_forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p = self.kernel_size, self.conv.stride[2], self.kernel_size // 2
        width = x.shape[-1]
        bounds = self.chunk_bounds(width)
        out = None
        for o0, o1 in bounds:
            # Padded columns [o0·s, (o1−1)·s + k) hold the receptive field; shift by p into unpadded indices.
            lo, hi = o0 * s - p, (o1 - 1) * s + k - p
            chunk = x[..., max(lo, 0) : min(hi, width)]
            pad = (max(-lo, 0), max(hi - width, 0), p, p, k - 1, 0)
            y = self.conv(F.pad(chunk, pad, mode="replicate"))
            if out is None:
                out = y.new_empty(*y.shape[:-1], bounds[-1][1])
            out[..., o0:o1] = y
        return out


class ResnetBlockCausal3D(nn.Module):
    """GN → SiLU → conv1 → GN → SiLU → conv2, plus the input (through a 1×1×1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class DownsampleCausal3D(nn.Module):
    """Strided causal conv; a time stride of 2 maps T frames to (T−1)//2 + 1, so a single frame stays single."""

    def __init__(self, channels: int, stride: Stride):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleCausal3D(nn.Module):
    """Nearest upsampling, the first frame spatially only (T → 1 + f_t·(T−1)), then a causal conv."""

    def __init__(self, channels: int, factor: Stride):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest interpolation has no bf16 kernel everywhere
            x = x.float()
        first = F.interpolate(x[:, :, 0], scale_factor=self.factor[1:], mode="nearest").unsqueeze(2)
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:], scale_factor=self.factor, mode="nearest")
            x = torch.cat([first, rest], dim=2)
        else:
            x = first
        return self.conv(x.to(dtype))


class CausalSelfAttention(nn.Module):
    """Single-head self-attention over all (t, h, w) tokens; a token sees its own and all earlier frames.

    Computed one query frame at a time against the keys of frames ≤ t, which is the frame-causal mask without
    building the (THW)² mask or score matrix.
    """

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # B, T·H·W, C
        q = self.to_q(tokens).unsqueeze(1)  # B, 1 head, T·H·W, C
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        del tokens
        hw = h * w
        out = torch.empty_like(q)
        for f in range(t):
            start, end = f * hw, (f + 1) * hw
            out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end])
        out = self.to_out[0](out.squeeze(1))
        return x + out.transpose(1, 2).reshape(b, c, t, h, w)


class MidBlockCausal3D(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, eps: float, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(channels, channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([CausalSelfAttention(channels, groups, eps)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _resnet_stack(in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float) -> nn.ModuleList:
    """num_layers resnets; the first one changes the channel count."""
    return nn.ModuleList(
        [ResnetBlockCausal3D(out_channels if i else in_channels, out_channels, groups, eps) for i in range(num_layers)]
    )


class DownBlockCausal3D(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, stride: Stride | None, groups: int, eps: float
    ):
        super().__init__()
        self.resnets = _resnet_stack(in_channels, out_channels, num_layers, groups, eps)
        self.downsamplers = nn.ModuleList([DownsampleCausal3D(out_channels, stride)]) if stride else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlockCausal3D(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, factor: Stride | None, groups: int, eps: float
    ):
        super().__init__()
        self.resnets = _resnet_stack(in_channels, out_channels, num_layers, groups, eps)
        self.upsamplers = nn.ModuleList([UpsampleCausal3D(out_channels, factor)]) if factor else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class EncoderCausal3D(nn.Module):
    """Pixels (B, in, T, H, W) → moments (B, 2·latent, 1 + (T−1)//4, H/8, W/8): mean and log-variance."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        strides: list[Stride | None],
        groups: int,
        eps: float,
        add_attention: bool,
    ):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        channels = [block_out_channels[0], *block_out_channels]
        self.down_blocks = nn.ModuleList(
            [
                DownBlockCausal3D(channels[i], channels[i + 1], layers_per_block, strides[i], groups, eps)
                for i in range(len(block_out_channels))
            ]
        )
        self.mid_block = MidBlockCausal3D(block_out_channels[-1], groups, eps, add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[-1], eps=eps)
        self.conv_out = CausalConv3d(block_out_channels[-1], 2 * latent_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DecoderCausal3D(nn.Module):
    """Latents (B, latent, t, h, w) → pixels (B, out, 1 + 4·(t−1), 8h, 8w). Up blocks have layers_per_block + 1
    resnets and run the channel list in reverse."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        factors: list[Stride | None],
        groups: int,
        eps: float,
        add_attention: bool,
    ):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, reversed_channels[0], 3)
        self.mid_block = MidBlockCausal3D(reversed_channels[0], groups, eps, add_attention)
        channels = [reversed_channels[0], *reversed_channels]
        self.up_blocks = nn.ModuleList(
            [
                UpBlockCausal3D(channels[i], channels[i + 1], layers_per_block + 1, factors[i], groups, eps)
                for i in range(len(block_out_channels))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[0], eps=eps)
        self.conv_out = CausalConv3d(block_out_channels[0], out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

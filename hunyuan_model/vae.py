"""The HunyuanVideo causal 3D VAE ("884-16c-hy") as FramePack uses it: model, memory options, loading, helpers.

16 latent channels, 8× spatial and 4× temporal compression (pixel frames = 1 + 4·(latent frames − 1)); latents are
the posterior sample scaled by 0.476986. Accepted for `--vae`: the official HunyuanVideo `pytorch_model.pt`, the
hunyuanvideo-community `vae/diffusion_pytorch_model.safetensors`, and a snapshot folder holding `vae/`. All share
one key layout; the config is read from tensor shapes, and what shapes cannot reveal is the constants below.

Memory options (both keep musubi-tuner's results): `chunk_size` convolves wide inputs in column chunks (exact);
spatial tiling, always on as in FramePack (256 px / 32 latent tiles unless set), runs the encoder or decoder on
overlapping tiles and blends the seams (close to, not equal to, an untiled pass).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from hunyuan_model.frame_math import LATENT_CHANNELS, SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
from hunyuan_model.vae_blocks import DecoderCausal3D, EncoderCausal3D, Stride
from utils.checkpoint_kinds import state_dict_mismatch, wrong_file_message
from utils.safetensors_utils import (
    WeightFileError,
    load_state_dict,
    read_config_json,
    read_headers,
    resolve_weight_files,
)

logger = logging.getLogger(__name__)

# Constants of the HunyuanVideo VAE that a state dict cannot reveal.
SCALING_FACTOR = 0.476986
NORM_GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
DEFAULT_TILE_SAMPLE_SIZE = 256  # px; FramePack always tiles, the latent tile is this // 8
TILE_OVERLAP = 0.25

DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
OFFICIAL_FILE = "pytorch_model.pt"
SUBFOLDER = "vae"
STRIPPED_PREFIX = "vae."  # a checkpoint with any `vae.` key keeps only those, prefix removed
# Keys without which a file cannot be this VAE.
REQUIRED_KEYS = (
    "encoder.conv_in.conv.weight",
    "encoder.down_blocks.0.resnets.0.conv1.conv.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
    "decoder.conv_out.conv.weight",
)
# config.json entries honoured as they are (the others are read from shapes and only cross-checked).
CONFIG_JSON_KEYS = ("norm_num_groups", "scaling_factor", "spatial_compression_ratio", "temporal_compression_ratio")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = LATENT_CHANNELS
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per block; decoder blocks have one more
    mid_block_add_attention: bool = True
    norm_num_groups: int = NORM_GROUPS
    scaling_factor: float = SCALING_FACTOR
    spatial_compression_ratio: int = SPATIAL_COMPRESSION
    temporal_compression_ratio: int = TEMPORAL_COMPRESSION

    def __post_init__(self):
        if self.temporal_compression_ratio != TEMPORAL_COMPRESSION:
            raise ValueError(f"temporal compression {self.temporal_compression_ratio} unsupported (only 4)")
        spatial = math.prod(s[1] for s in self.strides() if s)
        if spatial != self.spatial_compression_ratio:
            n = len(self.block_out_channels)
            raise ValueError(f"{n} blocks cannot give spatial compression {self.spatial_compression_ratio}")

    def strides(self) -> list[Stride | None]:
        """(T, H, W) stride of each encoder down block, None for no downsampler; also the decoder's upsampling
        factors per up block (in decoder order). The first log2(spatial) blocks halve H and W; the log2(temporal)
        blocks before the last one halve T."""
        n = len(self.block_out_channels)
        n_spatial = self.spatial_compression_ratio.bit_length() - 1
        n_time = self.temporal_compression_ratio.bit_length() - 1
        out: list[Stride | None] = []
        for i in range(n):
            hw = 2 if i < n_spatial else 1
            t = 2 if n - 1 - n_time <= i < n - 1 else 1
            out.append((t, hw, hw) if (t, hw) != (1, 1) else None)
        return out

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], config_json: dict | None = None) -> VAEConfig:
        """Read the config from tensor shapes; a diffusers `config.json` may set the CONFIG_JSON_KEYS values."""
        n_blocks = 0
        while f"encoder.down_blocks.{n_blocks}.resnets.0.conv1.conv.weight" in shapes:
            n_blocks += 1
        layers = 0
        while f"encoder.down_blocks.0.resnets.{layers}.conv1.conv.weight" in shapes:
            layers += 1
        found = {
            "in_channels": shapes["encoder.conv_in.conv.weight"][1],
            "out_channels": shapes["decoder.conv_out.conv.weight"][0],
            "latent_channels": shapes["post_quant_conv.weight"][0],
            "block_out_channels": tuple(
                shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in range(n_blocks)
            ),
            "layers_per_block": layers,
            "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
        }
        for key, value in (config_json or {}).items():
            if key in CONFIG_JSON_KEYS:
                found[key] = value
            elif key in found and (tuple(value) if isinstance(value, list) else value) != found[key]:
                logger.warning(f"VAE config.json says {key}={value}, the weights say {found[key]}; using the weights")
        return cls(**found)


def _blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """Fade the first rows of `tile` in from the last rows of the tile above (in place), as musubi-tuner does."""
    extent = min(above.shape[-2], tile.shape[-2], extent)
    for y in range(extent):
        tile[..., y, :] = above[..., y - extent, :] * (1 - y / extent) + tile[..., y, :] * (y / extent)


def _blend_cols(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    extent = min(left.shape[-1], tile.shape[-1], extent)
    for x in range(extent):
        tile[..., x] = left[..., x - extent] * (1 - x / extent) + tile[..., x] * (x / extent)


def _tail(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The last n entries along dim (all of them when fewer), detached from the tile's storage."""
    size = t.shape[dim]
    return t.narrow(dim, size - min(n, size), min(n, size)).clone()


class AutoencoderKLCausal3D(nn.Module):
    """HunyuanVideo causal 3D VAE. `encode` returns scaled latents, `decode` takes them; both honour the memory
    options set by `set_chunk_size` and `set_spatial_tiling` (tiling is off until set; `load_vae` turns it on)."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        common = {
            "block_out_channels": tuple(config.block_out_channels),
            "layers_per_block": config.layers_per_block,
            "groups": config.norm_num_groups,
            "eps": NORM_EPS,
            "add_attention": config.mid_block_add_attention,
        }
        self.encoder = EncoderCausal3D(config.in_channels, config.latent_channels, strides=config.strides(), **common)
        self.decoder = DecoderCausal3D(config.latent_channels, config.out_channels, factors=config.strides(), **common)
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        self.tile_sample_min_size: int | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def tile_latent_min_size(self) -> int | None:
        s = self.tile_sample_min_size
        return None if s is None else s // self.config.spatial_compression_ratio

    def set_chunk_size(self, chunk_size: int | None) -> None:
        """Width chunking of every causal conv (`--vae_chunk_size`); None or 0 turns it off."""
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(f"--vae_chunk_size must be positive, got {chunk_size}")
        for module in self.modules():
            if hasattr(module, "chunk_size"):
                module.chunk_size = chunk_size or None

    def set_spatial_tiling(self, tile_sample_min_size: int | None = DEFAULT_TILE_SAMPLE_SIZE) -> None:
        """Spatial tiling with tiles of this many pixels (`--vae_spatial_tile_sample_min_size`); None turns it off."""
        min_size = 2 * self.config.spatial_compression_ratio  # a latent tile of 2 still advances by 1
        if tile_sample_min_size is not None and tile_sample_min_size < min_size:
            raise ValueError(
                f"--vae_spatial_tile_sample_min_size must be at least {min_size}, got {tile_sample_min_size}"
            )
        if tile_sample_min_size is not None and tile_sample_min_size % (4 * self.config.spatial_compression_ratio):
            logger.warning(
                f"VAE tile {tile_sample_min_size} px is not a multiple of 32: as in musubi-tuner, the tile stride then"
                " differs from the kept tile size and tiled outputs come out larger than the input's size / 8 (or × 8)"
            )
        self.tile_sample_min_size = tile_sample_min_size

    def _latent_size(self, pixels: int) -> int:
        for stride in self.config.strides():
            if stride:
                pixels = (pixels - 1) // stride[1] + 1
        return pixels

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in the VAE dtype → (B, 2·latent, 1 + (T−1)//4, ⌈H/8⌉, ⌈W/8⌉): mean then log-variance."""
        s = self.tile_sample_min_size
        run = lambda t: self.quant_conv(self.encoder(t))
        if s is not None and (x.shape[-2] > s or x.shape[-1] > s):
            return self._tiled(x, run, s, self.tile_latent_min_size, self._latent_size)
        return run(x)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) in [−1, 1] → scaled latents (B, 16, 1 + (T−1)//4, H/8, W/8) in the VAE dtype.

        The posterior sample draws its noise from `generator` (on the generator's device, in the VAE dtype); the
        reference uses the unseeded global RNG, which `generator=None` reproduces."""
        moments = self.encode_moments(x.to(device=self.device, dtype=self.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
        return (mean + std * noise.to(mean.device)) * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 16, t, h, w) → pixels (B, 3, 1 + 4·(t−1), 8h, 8w) in the VAE dtype, about [−1, 1]."""
        z = (latents / self.config.scaling_factor).to(device=self.device, dtype=self.dtype)
        tile = self.tile_latent_min_size
        run = lambda t: self.decoder(self.post_quant_conv(t))
        if tile is not None and (z.shape[-2] > tile or z.shape[-1] > tile):
            ratio = self.config.spatial_compression_ratio
            return self._tiled(z, run, tile, self.tile_sample_min_size, lambda n: n * ratio)
        return run(z)

    def _tiled(
        self,
        x: torch.Tensor,
        run: Callable[[torch.Tensor], torch.Tensor],
        in_tile: int,
        out_tile: int,
        out_size: Callable[[int], int],
    ) -> torch.Tensor:
        """Apply `run` to overlapping in_tile² tiles and assemble the outputs exactly as musubi-tuner does.

        Tiles start every int(0.75·in_tile) and are visited row by row; each output tile is blended in place over
        int(0.25·out_tile) rows with the (already blended) tile above, then over as many columns with the one on
        its left, and its top-left (out_tile − blend)² corner is kept. Only the previous row's bottom edges and
        the left neighbour's right edge are held, and kept parts go straight into the preallocated result.
        """
        stride = int(in_tile * (1 - TILE_OVERLAP))
        blend = int(out_tile * TILE_OVERLAP)
        keep = out_tile - blend
        height, width = x.shape[-2:]
        rows, cols = range(0, height, stride), range(0, width, stride)
        kept_h = [min(keep, out_size(min(in_tile, height - r))) for r in rows]
        kept_w = [min(keep, out_size(min(in_tile, width - c))) for c in cols]
        out = None
        above: list[torch.Tensor | None] = [None] * len(cols)
        y0 = 0
        for i, r in enumerate(rows):
            left, x0 = None, 0
            for j, c in enumerate(cols):
                tile = run(x[..., r : r + in_tile, c : c + in_tile])
                if i > 0:
                    _blend_rows(above[j], tile, blend)
                if j > 0:
                    _blend_cols(left, tile, blend)
                above[j], left = _tail(tile, blend, -2), _tail(tile, blend, -1)
                if out is None:
                    out = tile.new_empty(*tile.shape[:-2], sum(kept_h), sum(kept_w))
                out[..., y0 : y0 + kept_h[i], x0 : x0 + kept_w[j]] = tile[..., :keep, :keep]
                x0 += kept_w[j]
                del tile
            y0 += kept_h[i]
        return out


def _vae_config_json(file: str, flag: str) -> dict | None:
    """The config.json next to the weights, when it describes a VAE (a folder may hold other models' configs)."""
    config = read_config_json(os.path.dirname(file), flag)
    return config if config is not None and "latent_channels" in config else None


def resolve_vae_files(path: str | os.PathLike, flag: str = "--vae") -> list[str]:
    """A file, or a folder (a snapshot root with `vae/`, or the `vae/` folder itself) → the checkpoint file(s)."""
    p = Path(path)
    if p.is_dir():
        folder = p / SUBFOLDER if (p / SUBFOLDER).is_dir() else p
        if not any(folder.glob("*.safetensors")) and (folder / OFFICIAL_FILE).exists():
            return [str(folder / OFFICIAL_FILE)]
    return resolve_weight_files(path, flag, subfolder=SUBFOLDER)


def _torch_load(file: str, flag: str) -> dict[str, torch.Tensor]:
    """Tensors of a torch.save checkpoint (weights only, memory-mapped when possible), `state_dict` unwrapped."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except FileNotFoundError as e:
        raise WeightFileError(f"{flag} {file}: file not found") from e
    except Exception as e:  # torch.load reports bad files through many exception types
        raise WeightFileError(
            f"{flag} {file}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); expected a HunyuanVideo "
            f"VAE ({OFFICIAL_FILE} or {DIFFUSERS_FILE})"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightFileError(f"{flag} {file}: holds a {type(obj).__name__}, expected a HunyuanVideo VAE state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(keys) -> dict[str, str]:
    """file key → model key: with any `vae.` key only those are kept, without the prefix."""
    keys = list(keys)
    if any(k.startswith(STRIPPED_PREFIX) for k in keys):
        return {k: k[len(STRIPPED_PREFIX) :] for k in keys if k.startswith(STRIPPED_PREFIX)}
    return {k: k for k in keys}


def _check_vae_shapes(shapes: dict[str, tuple[int, ...]], path: str, flag: str) -> VAEConfig:
    if any(k not in shapes for k in REQUIRED_KEYS):
        expected = "a HunyuanVideo VAE (keys like encoder.conv_in.conv.weight, decoder.conv_out.conv.weight)"
        raise WeightFileError(wrong_file_message(flag, path, expected, shapes))
    config_json = _vae_config_json(path, flag)
    try:
        config = VAEConfig.from_shapes(shapes, config_json)
        with torch.device("meta"):
            expected_shapes = {k: tuple(v.shape) for k, v in AutoencoderKLCausal3D(config).state_dict().items()}
    except (ValueError, IndexError) as e:
        raise WeightFileError(f"{flag} {path}: unsupported HunyuanVideo VAE layout: {e}") from e
    problem = state_dict_mismatch(expected_shapes, shapes)
    if problem:
        raise WeightFileError(f"{flag} {path}: not a complete HunyuanVideo VAE: {problem}")
    return config


def read_vae_config(path: str | os.PathLike, flag: str = "--vae") -> tuple[list[str], VAEConfig]:
    """Validate a VAE checkpoint without loading its tensors and return (files, config)."""
    files = resolve_vae_files(path, flag)
    if files[0].endswith(".safetensors"):
        infos = read_headers(files, flag)
        names = _strip_prefix(infos)
        shapes = {names[k]: tuple(infos[k].shape) for k in names}
    else:
        state = _torch_load(files[0], flag)
        names = _strip_prefix(state)
        shapes = {names[k]: tuple(state[k].shape) for k in names}
    return files, _check_vae_shapes(shapes, files[0], flag)


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 as musubi-tuner on GPUs; fp32 on the CPU, which has no fast fp16 3D convolutions (~100x slower)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_vae(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    chunk_size: int | None = None,
    spatial_tile_sample_min_size: int | None = None,
    flag: str = "--vae",
) -> AutoencoderKLCausal3D:
    """Load the VAE in eval mode, cast to `dtype` (fp16 as in musubi-tuner), with FramePack's memory options:
    width chunking when `chunk_size` is set, and spatial tiling always (default tile 256 px)."""
    files, config = read_vae_config(path, flag)
    logger.info(f"VAE from {files[0]}: channels {config.block_out_channels}, {config.latent_channels} latent")
    with torch.device("meta"):
        model = AutoencoderKLCausal3D(config)
    if files[0].endswith(".safetensors"):
        names = _strip_prefix(read_headers(files, flag))
        state = load_state_dict(files, device=device, dtype=dtype, key_filter=names.__contains__)
    else:
        raw = _torch_load(files[0], flag)
        names = _strip_prefix(raw)
        state = {k: raw[k].to(device=device, dtype=dtype if raw[k].is_floating_point() else None) for k in names}
    model.load_state_dict({names[k]: v for k, v in state.items()}, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.set_chunk_size(chunk_size)
    model.set_spatial_tiling(spatial_tile_sample_min_size or DEFAULT_TILE_SAMPLE_SIZE)
    return model


@torch.no_grad()
def encode_pixels(
    vae: AutoencoderKLCausal3D, pixels: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pixels (B, 3, 1 + 4k, H, W) in [−1, 1], H and W multiples of 8, any device/dtype → scaled latents
    (B, 16, 1 + k, H/8, W/8) on the VAE's device in its dtype (fp16 as musubi-tuner caches them)."""
    return vae.encode(pixels, generator)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLCausal3D, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 16, t, h, w) → pixels (B, 3, 1 + 4·(t − 1), 8h, 8w) on the VAE's device in its dtype,
    roughly in [−1, 1] and not clamped."""
    return vae.decode(latents)

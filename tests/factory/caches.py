"""Tiny cached training datasets (latent + text caches and their dataset config), written straight in the cache
format (section and one-frame latent caches, text encoder caches), so training tests need neither media nor encoders.

Video sections use the inverted layout of a last section (latent indices 1..lws, clean [0, lws+1], 2x, 4x), as
`write_fake_latent_cache` writes them; one-frame items follow the one-frame layout (target latent, control
latents plus an optional zero post frame, 2x/4x indices without 2x/4x latents).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from hunyuan_model.frame_math import LATENT_CHANNELS
from tests.factory.datasets import write_config, write_fake_latent_cache, write_fake_text_cache
from tests.factory.dims import SIGLIP_HIDDEN


def write_video_caches(
    cache: Path, stems: list[str], lws: int = 3, size: tuple[int, int] = (48, 32), sections: int = 1
) -> list[Path]:
    """For each stem: `sections` section caches `<stem>_00000-<frames>-<k>_<W>x<H>_fp.safetensors` and a text cache."""
    cache = Path(cache)
    frames = lws * 4 * sections + 1
    paths = []
    for n, stem in enumerate(stems):
        write_fake_text_cache(cache / f"{stem}_fp_te.safetensors", seed=100 + n)
        for k in range(sections):
            name = f"{stem}_00000-{frames:03d}-{k:04d}_{size[0]:04d}x{size[1]:04d}_fp.safetensors"
            paths.append(write_fake_latent_cache(cache / name, lws, size[1] // 8, size[0] // 8, seed=10 * n + k))
    return paths


def write_one_frame_cache(
    path: Path,
    size: tuple[int, int] = (48, 32),
    lws: int = 9,
    clean_indices: tuple[int, ...] = (0,),
    target_index: int = 9,
    no_post: bool = False,
    no_2x: bool = False,
    no_4x: bool = False,
    seed: int = 0,
) -> Path:
    """An image (one-frame) latent cache with the keys and index values musubi-tuner writes."""
    g = torch.Generator().manual_seed(seed)
    w, h = size[0] // 8, size[1] // 8
    suffix = f"1x{h}x{w}_float16"
    controls = torch.randn((LATENT_CHANNELS, len(clean_indices), h, w), generator=g).half()
    clean = controls if no_post else torch.cat([controls, torch.zeros((LATENT_CHANNELS, 1, h, w)).half()], 1)
    tensors = {
        f"latents_{suffix}": torch.randn((LATENT_CHANNELS, 1, h, w), generator=g).half(),
        f"latents_clean_{suffix}": clean,
        "latent_indices_int64": torch.tensor([target_index]),
        "clean_latent_indices_int64": torch.tensor([*clean_indices, *([] if no_post else [1 + lws])]),
        "image_embeddings_float16": torch.randn((729, SIGLIP_HIDDEN), generator=g).half(),
    }
    if not no_2x:
        tensors["clean_latent_2x_indices_int64"] = torch.arange(lws + 2, lws + 4)
    if not no_4x:
        tensors["clean_latent_4x_indices_int64"] = torch.arange(lws + 4, lws + 20)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"architecture": "framepack", "width": str(size[0]), "height": str(size[1]), "format_version": "1.0.1"}
    save_file(tensors, str(path), metadata=metadata)
    return path


def video_dataset_config(
    root: Path, stems: list[str], lws: int = 3, batch_size: int = 1, num_repeats: int = 1, sections: int = 1
) -> Path:
    """A video dataset whose cache directory holds ready caches; returns the config path."""
    cache = Path(root) / "video_cache"
    write_video_caches(cache, stems, lws, sections=sections)
    dataset = {
        "video_directory": cache,
        "cache_directory": cache,
        "resolution": [48, 32],
        "batch_size": batch_size,
        "num_repeats": num_repeats,
        "target_frames": [lws * 4 * sections + 1],
        "fp_latent_window_size": lws,
    }
    return write_config(Path(root) / "dataset.toml", [dataset])


def one_frame_dataset_config(
    root: Path, stems: list[str], batch_size: int = 1, clean_indices: tuple[int, ...] = (0,), **cache_options
) -> Path:
    """An image dataset of one-frame caches (each with its text cache); returns the config path."""
    cache = Path(root) / "image_cache"
    for n, stem in enumerate(stems):
        write_fake_text_cache(cache / f"{stem}_fp_te.safetensors", seed=200 + n)
        write_one_frame_cache(
            cache / f"{stem}_0048x0032_fp.safetensors", clean_indices=clean_indices, seed=n, **cache_options
        )
    dataset = {
        "image_directory": cache,
        "cache_directory": cache,
        "resolution": [48, 32],
        "batch_size": batch_size,
        "fp_1f_clean_indices": list(clean_indices),
        "fp_1f_target_index": cache_options.get("target_index", 9),
        "fp_1f_no_post": cache_options.get("no_post", False),
    }
    return write_config(Path(root) / "dataset_1f.toml", [dataset])

"""fpack_cache_latents.py end to end on tiny models and datasets: names, keys, dtypes, shapes, contents, reruns.

Expected names, keys and section contents are computed here from the cache layout rules written out in this file,
not from the project's section planner. The VAE runs in float16 on the CPU, which is slow, so clips are tiny
(32×32, lws 2).
"""

from __future__ import annotations

import logging
import os
import shutil
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

import hunyuan_model.image_encoder
import hunyuan_model.vae
import pipelines.cache_latents as cl
from dataset.image_video_dataset import ItemInfo, load_dataset_group
from dataset.media import latent_mask
from hunyuan_model.image_encoder import encode_image, load_image_encoder
from hunyuan_model.vae import compute_dtype, encode_pixels, load_vae
from tests.factory.datasets import make_image_dataset, make_video_dataset, write_config, write_fake_latent_cache
from tests.factory.dims import SIGLIP_HIDDEN
from tests.factory.image_encoder import make_image_encoder_files
from tests.factory.vae import write_diffusers_safetensors

SIZE = (32, 32)  # (W, H) of the clips and the bucket
H, W = SIZE[1] // 8, SIZE[0] // 8
LWS = 2
CLIPS = {"clip_0": 13, "clip_1": 17}  # 13 frames: 4 latent, 1 section, trimmed to 9; 17 frames: 5 latent, 2 sections
SECTIONS = {"clip_0": 1, "clip_1": 2}

# musubi-tuner's flags and defaults (flags.json of the facts), written out independently of the parser.
REFERENCE_FLAGS = {
    "--dataset_config": None, "--vae": None, "--vae_dtype": None, "--device": None, "--batch_size": None,
    "--num_workers": None, "--skip_existing": False, "--keep_cache": False, "--debug_mode": None,
    "--console_width": 80, "--console_back": None, "--console_num_images": None, "--vae_tiling": False,
    "--vae_chunk_size": None, "--vae_spatial_tile_sample_min_size": None, "--image_encoder": None, "--f1": False,
    "--one_frame": False, "--one_frame_no_2x": False, "--one_frame_no_4x": False,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_models")
    return {
        "vae": str(write_diffusers_safetensors(root / "vae")),
        "image_encoder": str(make_image_encoder_files(root / "image_encoder").comfy),
    }


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_video_dataset(tmp_path_factory.mktemp("cache_videos"), lengths=tuple(CLIPS.values()), size=SIZE)


def video_config(path, videos, cache_directory, lws=LWS):
    entry = dict(
        video_directory=videos.directory,
        cache_directory=cache_directory,
        caption_extension=".txt",
        resolution=list(SIZE),
        frame_extraction="full",
        max_frames=64,
        fp_latent_window_size=lws,
    )
    return str(write_config(path, [entry]))


def cache(config, models, *flags) -> int:
    argv = ["--dataset_config", config, "--vae", models["vae"], "--image_encoder", models["image_encoder"]]
    return cl.main([*argv, *flags])


def section_name(stem, sections_index):
    return f"{stem}_00000-{CLIPS[stem]:03d}-{sections_index:04d}_{SIZE[0]:04d}x{SIZE[1]:04d}_fp.safetensors"


def all_section_names():
    return sorted(section_name(stem, k) for stem, n in SECTIONS.items() for k in range(n))


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def section_keys(frames):
    size = f"{frames}x{H}x{W}_float16"
    return {
        f"latents_{size}", f"latents_clean_{size}", f"latents_clean_2x_{size}", f"latents_clean_4x_{size}",
        "latent_indices_int64", "clean_latent_indices_int64", "clean_latent_2x_indices_int64",
        "clean_latent_4x_indices_int64", "image_embeddings_float16",
    }  # fmt: skip


def by_role(tensors):
    """Cache tensors by role (name without the size/dtype suffix), for comparing contents."""
    roles = {}
    for key, value in tensors.items():
        role = key.rsplit("_", 1)[0]
        roles[role.rsplit("_", 1)[0] if role.startswith("latents_") else role] = value
    return roles


@pytest.fixture(scope="module")
def inverted(tmp_path_factory, models, videos):
    root = tmp_path_factory.mktemp("inverted")
    config = video_config(root / "config.toml", videos, root / "cache")
    assert cache(config, models) == 0
    return root / "cache"


# ------------------------------------------------------------------------------------------------ the facts


def spec_paddings(sections):
    """Paddings in processing order (last section first): n-1 down to 0 up to 4 sections, else 3, 2, ..., 2, 1, 0."""
    return list(range(sections - 1, -1, -1)) if sections <= 4 else [3] + [2] * (sections - 3) + [1, 0]


def spec_frame(latent, i):
    return latent[:, i] if i < latent.shape[1] else torch.zeros_like(latent[:, 0])


def spec_inverted_section(latent, lws, k):
    """(indices, clean, 2x, 4x, target) of inverted anti-drifting section k of a (C, L, h, w) latent."""
    sections = (latent.shape[1] - 1) // lws
    p = spec_paddings(sections)[sections - 1 - k] * lws
    indices = {
        "latent_indices": list(range(1 + p, 1 + p + lws)),
        "clean_latent_indices": [0, 1 + p + lws],
        "clean_latent_2x_indices": [2 + p + lws, 3 + p + lws],
        "clean_latent_4x_indices": list(range(4 + p + lws, 20 + p + lws)),
    }
    post = 1 + (k + 1) * lws

    def frames(first, n):
        return torch.stack([spec_frame(latent, i) for i in range(first, first + n)], dim=1)

    clean = torch.stack([latent[:, 0], spec_frame(latent, post)], dim=1)
    return indices, clean, frames(post + 1, 2), frames(post + 3, 16), latent[:, 1 + k * lws : 1 + (k + 1) * lws]


def spec_f1_section(latent, lws, k):
    """(indices, clean, 2x, 4x, target) of F1 section k: the 19 frames before the target, right-aligned."""
    start = 1 + k * lws
    zero = torch.zeros_like(latent[:, 0])
    history = torch.stack([latent[:, i] if i >= 0 else zero for i in range(start - 19, start)], dim=1)
    indices = {
        "latent_indices": list(range(20, 20 + lws)),
        "clean_latent_indices": [0, 19],
        "clean_latent_2x_indices": [17, 18],
        "clean_latent_4x_indices": list(range(1, 17)),
    }
    clean = torch.stack([latent[:, 0], history[:, 18]], dim=1)
    return indices, clean, history[:, 16:18], history[:, :16], latent[:, start : start + lws]


def assert_section(roles, expected):
    indices, clean, clean_2x, clean_4x, target = expected
    for name, values in indices.items():
        assert roles[name].tolist() == values, name
    assert torch.equal(roles["latents"], target)
    assert torch.equal(roles["latents_clean"], clean)
    assert torch.equal(roles["latents_clean_2x"], clean_2x)
    assert torch.equal(roles["latents_clean_4x"], clean_4x)


@pytest.mark.parametrize(("latent_frames", "lws"), [(19, 9), (11, 2), (4, 1)])
@pytest.mark.parametrize("f1", [False, True])
def test_section_contents_follow_the_facts(latent_frames, lws, f1):
    """The worked example (lws 9, 19 latent frames), more than four sections (paddings 3,2,2,1,0), short clips."""
    latent = torch.randn((16, latent_frames, 2, 3)).half()
    contents = cl.video_section_contents(latent[None], lws, f1)
    sections = (latent_frames - 1) // lws
    order = list(range(sections)) if f1 else list(range(sections - 1, -1, -1))
    assert [section for section, *_ in contents] == order
    for section, target, indices, clean in contents:
        tensors = cl.latent_cache_tensors(target, indices, clean, torch.zeros((729, 8), dtype=torch.float16))
        assert set(tensors) == {k.replace(f"x{H}x{W}", "x2x3") for k in section_keys(lws)}
        spec = spec_f1_section if f1 else spec_inverted_section
        assert_section(by_role(tensors), spec(latent, lws, section))


def test_help_lists_every_reference_flag(capsys):
    parser = cl.build_parser()
    defaults = {opt: a.default for a in parser._actions for opt in a.option_strings}
    for flag, default in REFERENCE_FLAGS.items():
        assert flag in defaults and defaults[flag] == default, flag
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in REFERENCE_FLAGS:
        assert flag in text
    assert "(default: 80)" in text


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hunyuan_model.vae, "load_vae", refuse)
    monkeypatch.setattr(hunyuan_model.image_encoder, "load_image_encoder", refuse)


def test_missing_image_encoder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cl.main(["--dataset_config", str(tmp_path / "x.toml"), "--vae", "v"])
    assert e.value.code == 2 and "--image_encoder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("image_without_one_frame", "image dataset"),
        ("video_with_one_frame", "is a video dataset"),
        ("one_frame_without_controls", "has no control images"),
        ("unknown_key", "fp_latent_windows"),
        ("no_vae", "--vae is required"),
        ("missing_vae_file", "no such file"),
        ("short_clip", "at least 37 frames"),
    ],
)
def test_bad_input_fails_before_any_model_is_loaded(case, message, tmp_path, models, videos, no_models, capsys):
    images = make_image_dataset(tmp_path, sizes=(SIZE,))
    image_entry = dict(image_directory=images.directory, caption_extension=".txt", resolution=list(SIZE))
    config = video_config(tmp_path / "v.toml", videos, tmp_path / "cache")
    flags, vae = [], models["vae"]
    if case in ("image_without_one_frame", "one_frame_without_controls"):
        config = str(write_config(tmp_path / "i.toml", [image_entry]))
        flags = ["--one_frame"] if case == "one_frame_without_controls" else []
    elif case == "video_with_one_frame":
        flags = ["--one_frame"]
    elif case == "unknown_key":
        config = str(write_config(tmp_path / "i.toml", [{**image_entry, "fp_latent_windows": 9}]))
    elif case == "missing_vae_file":
        vae = str(tmp_path / "nowhere.safetensors")
    elif case == "short_clip":
        config = video_config(tmp_path / "v.toml", videos, tmp_path / "cache", lws=9)
    argv = ["--dataset_config", config, "--image_encoder", models["image_encoder"], *flags]
    if case != "no_vae":
        argv += ["--vae", vae]
    assert cl.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err.split("error: ", 1)[1]
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ video caches


def test_inverted_cache_names_keys_and_metadata(inverted):
    assert sorted(os.listdir(inverted)) == all_section_names()
    for stem, sections in SECTIONS.items():
        for k in range(sections):
            tensors, metadata = read(inverted / section_name(stem, k))
            assert set(tensors) == section_keys(LWS)
            shapes = {key.rsplit("_", 1)[0].rsplit("_", 1)[0]: tuple(t.shape) for key, t in tensors.items()}
            assert shapes["latents"] == (16, LWS, H, W)
            assert shapes["latents_clean"] == (16, 2, H, W) and shapes["latents_clean_2x"] == (16, 2, H, W)
            assert shapes["latents_clean_4x"] == (16, 16, H, W)
            assert tensors["image_embeddings_float16"].shape == (729, SIGLIP_HIDDEN)
            assert all(t.dtype == torch.int64 for key, t in tensors.items() if "indices" in key)
            assert all(t.dtype == torch.float16 for key, t in tensors.items() if "indices" not in key)
            assert metadata == {
                "architecture": "framepack",
                "width": str(SIZE[0]),
                "height": str(SIZE[1]),
                "format_version": "1.0.1",
                "frame_count": str(CLIPS[stem]),
            }


def reconstruct(directory, stem, sections):
    """The full (C, L, h, w) latent of a clip, from its section caches: frame 0 then each section's target."""
    parts = [by_role(read(directory / section_name(stem, k))[0]) for k in range(sections)]
    return torch.cat([parts[0]["latents_clean"][:, :1], *(p["latents"] for p in parts)], dim=1)


def test_inverted_sections_are_slices_of_the_seeded_video_latent(inverted, models, videos, tmp_path):
    for stem, sections in SECTIONS.items():
        latent = reconstruct(inverted, stem, sections)
        assert latent.shape[1] == sections * LWS + 1
        for k in range(sections):
            assert_section(by_role(read(inverted / section_name(stem, k))[0]), spec_inverted_section(latent, LWS, k))

    # clip_0 independently: its first 9 frames (trimmed from 13), VAE sample seeded with CRC-32 of the cache name
    group = load_dataset_group(video_config(tmp_path / "c.toml", videos, inverted), seed=0)
    item = next(i for _, batch in group.datasets[0].retrieve_latent_cache_batches(1) for i in batch)
    assert item.item_key.endswith("clip_0_00000-013.mp4")
    vae = load_vae(models["vae"], dtype=compute_dtype("cpu"))  # what caching runs on this CPU-only machine
    seed = zlib.crc32(f"clip_0_00000-013_{SIZE[0]:04d}x{SIZE[1]:04d}_fp.safetensors".encode())
    pixels = torch.from_numpy(item.content[:9]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    expected = encode_pixels(vae, pixels, torch.Generator().manual_seed(seed))[0].half()
    assert torch.equal(reconstruct(inverted, "clip_0", 1), expected)

    encoder = load_image_encoder(models["image_encoder"]).half()
    embeddings = read(inverted / section_name("clip_0", 0))[0]["image_embeddings_float16"]
    assert torch.equal(embeddings, encode_image(item.content[0], encoder)[0])


def test_vae_dtype_float16_caches_the_float16_vae_numerics(inverted, models, videos, tmp_path):
    """On the CPU the default VAE runs in float32; --vae_dtype float16 gives what a GPU computes."""
    directory = tmp_path / "cache16"
    assert cache(video_config(tmp_path / "v.toml", videos, directory), models, "--vae_dtype", "float16") == 0
    group = load_dataset_group(video_config(tmp_path / "c.toml", videos, directory), seed=0)
    item = next(i for _, batch in group.datasets[0].retrieve_latent_cache_batches(1) for i in batch)
    seed = zlib.crc32(f"clip_0_00000-013_{SIZE[0]:04d}x{SIZE[1]:04d}_fp.safetensors".encode())
    pixels = torch.from_numpy(item.content[:9]).permute(3, 0, 1, 2)[None].half() / 127.5 - 1.0  # cast, then scale
    vae16 = load_vae(models["vae"], dtype=torch.float16)
    expected = encode_pixels(vae16, pixels, torch.Generator().manual_seed(seed))[0].half()
    got, float32_run = reconstruct(directory, "clip_0", 1), reconstruct(inverted, "clip_0", 1)
    assert torch.equal(got, expected)
    assert not torch.equal(got, float32_run)
    torch.testing.assert_close(got.float(), float32_run.float(), atol=2e-2, rtol=0)


def test_vae_dtype_outside_the_choices_is_refused(capsys):
    with pytest.raises(SystemExit):
        cl.main(["--dataset_config", "x.toml", "--vae_dtype", "float64"])
    assert "--vae_dtype" in capsys.readouterr().err


def test_f1_caches(tmp_path, models, videos, inverted):
    config = video_config(tmp_path / "f1.toml", videos, tmp_path / "cache")
    assert cache(config, models, "--f1") == 0
    assert sorted(os.listdir(tmp_path / "cache")) == all_section_names()
    for stem, sections in SECTIONS.items():
        latent = reconstruct(tmp_path / "cache", stem, sections)
        assert torch.equal(latent, reconstruct(inverted, stem, sections))  # same seeded encode, other layout
        for k in range(sections):
            tensors, _ = read(tmp_path / "cache" / section_name(stem, k))
            assert set(tensors) == section_keys(LWS)
            assert_section(by_role(tensors), spec_f1_section(latent, LWS, k))


def test_skip_existing_redo_and_stale_files(tmp_path, models, videos, inverted, monkeypatch):
    directory = tmp_path / "cache"
    shutil.copytree(inverted, directory)
    config = video_config(tmp_path / "v.toml", videos, directory)
    original = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    mtimes = {name: (directory / name).stat().st_mtime_ns for name in original}
    truncated = section_name("clip_0", 0)
    (directory / truncated).write_bytes(original[truncated][: len(original[truncated]) // 2])
    stale = write_fake_latent_cache(directory / "gone_00000-009-0000_0032x0032_fp.safetensors")
    other = directory / "notes_fp_te.safetensors"  # not a latent cache: never touched
    other.write_bytes(b"x")

    assert cache(config, models, "--skip_existing", "--keep_cache") == 0
    assert (directory / truncated).read_bytes() == original[truncated]  # redone, bit-identical
    for name in original:
        if name != truncated:
            assert (directory / name).stat().st_mtime_ns == mtimes[name], name
    assert stale.exists() and other.exists()

    cached = []
    monkeypatch.setattr(cl.LatentCacher, "cache", lambda self, item, files: cached.append(item.item_key))
    monkeypatch.setattr(hunyuan_model.vae, "load_vae", lambda *a, **k: pytest.fail("all complete: nothing to load"))
    assert cache(config, models, "--skip_existing") == 0
    assert cached == [] and not stale.exists() and other.exists()
    assert sorted(os.listdir(directory)) == sorted([*all_section_names(), other.name])

    assert cache(config, models, "--skip_existing", "--f1") == 0  # same layout, other indices: redone
    assert len(cached) == len(CLIPS)


# ------------------------------------------------------------------------------------------------ one-frame


def test_one_frame_caches(tmp_path, models, caplog):
    a = make_image_dataset(tmp_path, sizes=(SIZE, (48, 32)), controls_per_image=2, control_alpha=True, name="a")
    b = make_image_dataset(tmp_path, sizes=(SIZE,), controls_per_image=1, seed=1, name="b")
    common = dict(caption_extension=".txt", resolution=list(SIZE))
    kisekaeichi = dict(fp_1f_clean_indices=[0, 10], fp_1f_target_index=1, fp_1f_no_post=True)
    entries = [
        dict(image_directory=a.directory, control_directory=a.control_directory, **common, **kisekaeichi),
        dict(image_directory=b.directory, control_directory=b.control_directory, **common),  # defaults
    ]
    config = str(write_config(tmp_path / "one.toml", entries))
    with caplog.at_level(logging.WARNING):
        assert cache(config, models, "--one_frame", "--one_frame_no_4x") == 0
    assert "fp_1f_target_index is not set" in caplog.text and "fp_1f_clean_indices is not set" in caplog.text
    # names carry the original image size
    assert sorted(os.listdir(a.directory)) == sorted(
        ["img_0.png", "img_0.txt", "img_1.png", "img_1.txt", "img_0_0032x0032_fp.safetensors",
         "img_1_0048x0032_fp.safetensors"]
    )  # fmt: skip
    size = f"1x{H}x{W}_float16"
    keys = {f"latents_{size}", f"latents_clean_{size}", "latent_indices_int64", "clean_latent_indices_int64",
            "clean_latent_2x_indices_int64", "image_embeddings_float16"}  # fmt: skip

    tensors, metadata = read(a.directory / "img_1_0048x0032_fp.safetensors")
    assert set(tensors) == keys
    assert metadata == {"architecture": "framepack", "width": "48", "height": "32", "format_version": "1.0.1"}
    roles = by_role(tensors)
    assert roles["latent_indices"].tolist() == [1]
    assert roles["clean_latent_indices"].tolist() == [0, 10]  # no post
    assert roles["clean_latent_2x_indices"].tolist() == [11, 12]  # 1 + lws + 1, lws 9 by default
    assert roles["latents"].shape == (16, 1, H, W) and roles["latents_clean"].shape == (16, 2, H, W)

    # contents: controls then target, each encoded alone with the item's seed; control alpha masks its latent
    vae = load_vae(models["vae"], dtype=compute_dtype("cpu"))
    group = load_dataset_group(config, seed=0)
    item = [i for _, batch in group.datasets[0].retrieve_latent_cache_batches(1) for i in batch][1]
    generator = torch.Generator().manual_seed(zlib.crc32(b"img_1_0048x0032_fp.safetensors"))

    def encode(image):
        pixels = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)[None, :, None]
        return encode_pixels(vae, pixels.float() / 127.5 - 1.0, generator)[0].half()

    controls = []
    for control in item.control_content:
        assert control.shape[-1] == 4
        mask = torch.from_numpy(latent_mask(control[..., 3], (W, H)))
        controls.append((encode(control).float() * mask).half())
    assert torch.equal(roles["latents_clean"], torch.cat(controls, dim=1))
    assert torch.equal(roles["latents"], encode(item.content))
    encoder = load_image_encoder(models["image_encoder"]).half()
    first_control_rgb = np.ascontiguousarray(item.control_content[0][..., :3])
    assert torch.equal(roles["image_embeddings"], encode_image(first_control_rgb, encoder)[0])

    roles = by_role(read(b.directory / "img_0_0032x0032_fp.safetensors")[0])
    assert roles["latent_indices"].tolist() == [9]  # the latent window size
    assert roles["clean_latent_indices"].tolist() == [0, 10]  # [0] plus the post index 1 + lws
    assert roles["latents_clean"].shape == (16, 2, H, W)
    assert not roles["latents_clean"][:, 1].any()  # the zero post frame


def test_one_frame_layouts_without_2x_and_post():
    item = ItemInfo("/i/x.png", "", SIZE, content=np.zeros((32, 32, 3), np.uint8), fp_latent_window_size=9)
    item.latent_cache_path = "/c/x_0032x0032_fp.safetensors"
    item.control_content = [np.zeros((32, 32, 4), np.uint8)] * 2
    item.fp_1f_clean_indices, item.fp_1f_target_index, item.fp_1f_no_post = [0, 1], 9, False
    [(path, layout)] = cl.expected_files(item, f1=True, one_frame=cl.OneFrameSettings(no_2x=True))
    assert path == item.latent_cache_path
    assert layout["clean_latent_indices_int64"].value.tolist() == [0, 1, 10]
    assert layout["clean_latent_4x_indices_int64"].value.tolist() == list(range(13, 29))
    assert "clean_latent_2x_indices_int64" not in layout
    assert layout[f"latents_clean_1x{H}x{W}_float16"].shape == (16, 3, H, W)


# ------------------------------------------------------------------------------------------------ debug mode


def test_debug_modes_write_or_print_without_models(tmp_path, videos, no_models, capsys):
    config = video_config(tmp_path / "v.toml", videos, tmp_path / "debug")
    base = ["--dataset_config", config, "--image_encoder", "unused"]
    assert cl.main([*base, "--debug_mode", "video"]) == 0
    assert cl.main([*base, "--debug_mode", "image"]) == 0
    assert cl.main([*base, "--debug_mode", "console", "--console_width", "20", "--console_num_images", "1"]) == 0
    names = sorted(os.listdir(tmp_path / "debug"))
    stem = f"clip_0_00000-013_{SIZE[0]:04d}x{SIZE[1]:04d}_fp"
    assert f"{stem}.mp4" in names and f"{stem}_debug_first.png" in names and f"{stem}_debug_last.png" in names
    assert not any(n.endswith(".safetensors") for n in names)
    art = capsys.readouterr().out
    assert "clip_0_00000-013.mp4" in art and "clip_1" not in art  # one item per dataset

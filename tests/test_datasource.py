"""Datasources and caching items: frame extraction, fps conversion, JSONL, captions, control images, masks, errors."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from dataset.buckets import resize_image_to_bucket
from dataset.config import ImageDatasetParams, VideoDatasetParams
from dataset.image_video_dataset import ImageDataset, VideoDataset
from dataset.media import MediaError, latent_mask, load_image, load_video
from tests.factory.datasets import (
    caption_for,
    frame_numbers,
    make_image_dataset,
    make_video_dataset,
    write_broken_file,
    write_frame_directory,
    write_image,
    write_jsonl,
    write_video,
)

SIZE = (48, 32)  # factory frame size, also a bucket of resolution [48, 32]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_video_dataset(tmp_path_factory.mktemp("v"), lengths=(9, 40))


def _expected_crops(frames, targets, mode, frame_stride=1, frame_sample=1, max_frames=129):
    """The extraction rules restated independently (exact arithmetic, explicit loops)."""
    targets = sorted({(t - 1) // 4 * 4 + 1 for t in targets})
    if mode == "full":
        n = min(frames, max_frames)
        return [(0, n - (n - 1) % 4)]
    crops = []
    for t in targets:
        if t > frames:
            continue
        if mode == "head":
            crops.append((0, t))
        elif mode in ("chunk", "slide"):
            step = t if mode == "chunk" else frame_stride
            start = 0
            while start + t <= frames:
                crops.append((start, t))
                start += step
        elif mode == "uniform":
            starts = [math.floor(Fraction(i * (frames - t), frame_sample - 1)) for i in range(frame_sample)]
            crops.extend((s, t) for s in dict.fromkeys(starts))
    return crops


def _cache_items(dataset, num_workers=2):
    return [(key, item) for key, batch in dataset.retrieve_latent_cache_batches(num_workers) for item in batch]


@pytest.mark.parametrize(
    ("mode", "targets", "extra"),
    [
        ("head", [1, 9, 25, 26, 45], {}),
        ("chunk", [9, 17], {}),
        ("slide", [9, 17], {"frame_stride": 10}),
        ("uniform", [9, 33], {"frame_sample": 4}),
        ("uniform", [37], {"frame_sample": 6}),  # more samples than start positions: each start once
        ("full", [1], {}),
        ("full", [1], {"max_frames": 20}),
    ],
)
def test_frame_extraction_modes(videos, tmp_path, mode, targets, extra):
    params = VideoDatasetParams(
        video_directory=str(videos.directory),
        cache_directory=str(tmp_path),
        caption_extension=".txt",
        resolution=SIZE,
        target_frames=targets,
        frame_extraction=mode,
        **extra,
    )
    items = _cache_items(VideoDataset(params))
    got: dict[str, list] = {}
    for key, item in items:
        stem = item.item_key.rsplit("/", 1)[1].rsplit("_", 1)[0]
        start, length = item.start_frame, item.frame_count
        got.setdefault(stem, []).append((start, length))
        assert frame_numbers(item.content) == list(range(start, start + length))
        assert item.item_key.endswith(f"{stem}_{start:05d}-{length:03d}.mp4")
        assert key == item.bucket_size == (48, 32, length, 9)
        assert item.original_size == SIZE and item.caption == caption_for(stem)
        assert item.latent_cache_path == str(tmp_path / f"{stem}_{start:05d}-{length:03d}_0048x0032_fp.safetensors")
        assert item.text_encoder_output_cache_path == str(tmp_path / f"{stem}_fp_te.safetensors")
    for stem, length in videos.lengths.items():
        expected = _expected_crops(length, targets, mode, **extra)
        assert sorted(got.get(stem, [])) == sorted(expected), stem


def test_literal_crop_lists():
    """A few lists written out by hand, so the rules are visible."""
    assert _expected_crops(40, [9, 17], "chunk") == [(0, 9), (9, 9), (18, 9), (27, 9), (0, 17), (17, 17)]
    assert _expected_crops(40, [17], "slide", frame_stride=10) == [(0, 17), (10, 17), (20, 17)]
    assert _expected_crops(40, [9], "uniform", frame_sample=4) == [(0, 9), (10, 9), (20, 9), (31, 9)]
    assert _expected_crops(40, [1], "full") == [(0, 37)]


def test_uniform_with_one_sample_becomes_head(videos, tmp_path):
    params = VideoDatasetParams(
        video_directory=str(videos.directory), caption_extension=".txt", resolution=SIZE, target_frames=[9, 13],
        frame_extraction="uniform", frame_sample=1, cache_directory=str(tmp_path),
    )  # fmt: skip
    dataset = VideoDataset(params)
    assert dataset.frame_extraction == "head" and dataset.end_frame == 13
    assert [(i.start_frame, i.frame_count) for _, i in _cache_items(dataset)] == [(0, 9), (0, 9), (0, 13)]


def _expected_fps_frames(count: int, source_fps: float, target_fps: float, end: int | None = None) -> list[int]:
    """Source frames kept by the conversion, computed with exact fractions."""
    step = Fraction(target_fps) / Fraction(source_fps)
    kept, previous = [], -1
    for i in range(count):
        index = math.floor(i * step)
        if index == previous:
            continue
        previous = index
        if end is not None and index >= end:
            break
        kept.append(i)
    return kept


@pytest.mark.parametrize(("source_fps", "end"), [(60.0, None), (40.0, None), (24.0, None), (15.0, 9), (60.0, 9)])
def test_source_fps_resampling(tmp_path, source_fps, end):
    path = write_video(tmp_path / "clip.mp4", 40)
    frames = load_video(str(path), 0, end, source_fps=source_fps, target_fps=30.0)
    assert frame_numbers(frames) == _expected_fps_frames(40, source_fps, 30.0, end)


def test_source_fps_through_the_dataset(tmp_path):
    write_video(tmp_path / "v" / "fast.mp4", 40, fps=60)
    (tmp_path / "v" / "fast.txt").write_text("fast")
    params = VideoDatasetParams(
        video_directory=str(tmp_path / "v"), caption_extension=".txt", resolution=SIZE,
        frame_extraction="full", source_fps=60.0,
    )  # fmt: skip
    ((_, item),) = _cache_items(VideoDataset(params))
    assert item.frame_count == 17  # 20 frames at 30 fps → 17 (4n+1)
    assert frame_numbers(item.content) == list(range(0, 34, 2))


def test_head_decodes_only_the_longest_target(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 40)
    assert frame_numbers(load_video(str(path), 0, 13)) == list(range(13))
    assert len(load_video(str(path))) == 40


def test_video_jsonl_with_file_and_frame_directory(tmp_path):
    clip = write_video(tmp_path / "media" / "a.mp4", 20)
    frames_dir = write_frame_directory(tmp_path / "media" / "b_frames", 12, size=(64, 40))
    jsonl = write_jsonl(
        tmp_path / "videos.jsonl",
        [{"video_path": str(clip), "caption": " verbatim caption "}, {"video_path": str(frames_dir), "caption": "dir"}],
    )
    params = VideoDatasetParams(
        video_jsonl_file=str(jsonl), cache_directory=str(tmp_path / "cache"), resolution=SIZE, target_frames=[9]
    )
    dataset = VideoDataset(params)
    items = [item for _, item in _cache_items(dataset)]
    assert [frame_numbers(i.content) for i in items] == [list(range(9))] * 2
    assert items[1].content.shape == (9, 32, 48, 3)  # 64x40 frames resized to the (48, 32) bucket
    texts = [i for batch in dataset.retrieve_text_encoder_output_cache_batches(1) for i in batch]
    assert [i.caption for i in texts] == [" verbatim caption ", "dir"]  # JSONL captions are not stripped
    assert texts[1].text_encoder_output_cache_path == str(tmp_path / "cache" / "b_frames_fp_te.safetensors")


def test_video_control_directory_cut_or_padded(videos, tmp_path):
    control = tmp_path / "control"
    write_video(control / "clip_1.mov", 20)  # other extension, shorter than the 40-frame video
    write_frame_directory(control / "clip_0", 12)  # frame directory, longer than the 9-frame video
    params = VideoDatasetParams(
        video_directory=str(videos.directory), control_directory=str(control), caption_extension=".txt",
        resolution=SIZE, frame_extraction="full", cache_directory=str(tmp_path / "cache"),
    )  # fmt: skip
    dataset = VideoDataset(params)
    assert dataset.has_control
    by_stem = {i.item_key.rsplit("/", 1)[1][:6]: i for _, i in _cache_items(dataset)}
    assert frame_numbers(by_stem["clip_0"].control_content) == list(range(9))
    assert frame_numbers(by_stem["clip_1"].control_content) == list(range(20)) + [19] * 17
    (control / "clip_1.mov").unlink()
    with pytest.raises(MediaError, match="no control video for: clip_1.mp4"):
        VideoDataset(params).datasource  # noqa: B018


def test_image_directory_captions_buckets_and_cache_names(tmp_path):
    files = make_image_dataset(tmp_path, sizes=((48, 32), (32, 48), (40, 40)))
    params = ImageDatasetParams(
        image_directory=str(files.directory), caption_extension=".txt", resolution=SIZE, enable_bucket=True
    )
    dataset = ImageDataset(params)
    assert not dataset.has_control
    items = {i.item_key.rsplit("/", 1)[1]: (key, i) for key, i in _cache_items(dataset)}
    key, item = items["img_2.png"]
    assert key == (32, 48, 9)  # 40x40 is nearer 32:48 (0.67) than 48:32 (1.5); + lws
    assert item.original_size == (40, 40) and item.content.shape == (48, 32, 3)
    assert item.latent_cache_path == str(files.directory / "img_2_0040x0040_fp.safetensors")
    assert item.caption == caption_for("img_2") and item.control_content is None
    assert item.latent_cache_paths() == [item.latent_cache_path]
    expected = resize_image_to_bucket(load_image(str(files.images[2])), (32, 48))
    assert np.array_equal(item.content, expected)


def test_caching_batches_group_by_bucket_in_reference_order(tmp_path):
    sizes = ((48, 32), (32, 48), (48, 32), (32, 48), (48, 32))
    files = make_image_dataset(tmp_path, sizes=sizes)
    params = ImageDatasetParams(
        image_directory=str(files.directory), caption_extension=".txt", resolution=SIZE, enable_bucket=True,
        batch_size=2,
    )  # fmt: skip
    batches = list(ImageDataset(params).retrieve_latent_cache_batches(num_workers=3))
    names = [(key[:2], [i.item_key[-9:-4] for i in batch]) for key, batch in batches]
    # a bucket is emitted when full; leftovers at the end
    assert names == [((48, 32), ["img_0", "img_2"]), ((32, 48), ["img_1", "img_3"]), ((48, 32), ["img_4"])]


def test_image_controls_with_alpha_and_one_frame_keys(tmp_path):
    files = make_image_dataset(tmp_path, sizes=((48, 32), (32, 48)), controls_per_image=2, control_alpha=True)
    params = ImageDatasetParams(
        image_directory=str(files.directory), control_directory=str(files.control_directory), caption_extension=".txt",
        resolution=SIZE, enable_bucket=True, fp_1f_clean_indices=[0, 10], fp_1f_target_index=1, fp_1f_no_post=True,
    )  # fmt: skip
    dataset = ImageDataset(params)
    assert dataset.has_control and dataset.control_count == 2
    for key, item in _cache_items(dataset):
        stem = item.item_key[-9:-4]
        assert key == (*item.content.shape[1::-1], 9, 2, True)
        assert len(item.control_content) == 2
        for control, path in zip(item.control_content, files.controls[stem], strict=True):
            assert control.shape[2] == 4  # RGBA kept: the alpha becomes the latent mask
            expected = resize_image_to_bucket(Image.open(path), item.content.shape[1::-1])
            assert np.array_equal(control, expected)
        assert (item.fp_1f_clean_indices, item.fp_1f_target_index, item.fp_1f_no_post) == ([0, 10], 1, True)


def test_control_image_order_and_errors(tmp_path):
    images, control = tmp_path / "img", tmp_path / "ctrl"
    for seed, name in enumerate(["a1.jpg", "a1_0001.png", "a1_2.png", "a10.png", "a10_1.png", "a10_2.png"]):
        write_image(control / name, SIZE, seed)
    for stem in ("a1", "a10"):
        write_image(images / f"{stem}.png", SIZE, 9)

    def controls(count: int) -> list[list[str]]:
        params = ImageDatasetParams(
            image_directory=str(images), control_directory=str(control), fp_1f_clean_indices=list(range(count))
        )
        return [[p.rsplit("/", 1)[1] for p in e.control_paths] for e in ImageDataset(params).datasource.entries]

    # exact stem first, then by number; a10*.png belong to image a10, not a1
    assert controls(3) == [["a1.jpg", "a1_0001.png", "a1_2.png"], ["a10.png", "a10_1.png", "a10_2.png"]]
    assert controls(2) == [["a1.jpg", "a1_0001.png"], ["a10.png", "a10_1.png"]]
    with pytest.raises(MediaError, match=r"fewer than 4 control image\(s\) for: a1.png \(3 found\), a10.png"):
        controls(4)
    write_image(control / "a1_mask.png", SIZE, 6)
    with pytest.raises(MediaError, match="a1_mask.png: invalid digits suffix"):
        controls(1)


def test_image_jsonl_with_numbered_controls(tmp_path):
    sizes = ((48, 32), (32, 48))
    files = make_image_dataset(tmp_path, sizes=sizes, controls_per_image=2)
    rows = [
        {"image_path": str(files.images[0]), "caption": "first ", "control_path_0001": str(files.controls["img_0"][1]),
         "control_path_0000": str(files.controls["img_0"][0])},
        {"image_path": str(files.images[1]), "caption": "second", "control_path": str(files.controls["img_1"][0]),
         "control_path_3": str(files.controls["img_1"][1])},
    ]  # fmt: skip
    jsonl = write_jsonl(tmp_path / "images.jsonl", rows)
    params = ImageDatasetParams(
        image_jsonl_file=str(jsonl), cache_directory=str(tmp_path / "cache"), resolution=SIZE, enable_bucket=True,
        fp_1f_clean_indices=[0, 1],
    )  # fmt: skip
    dataset = ImageDataset(params)
    assert dataset.has_control
    items = sorted((i for _, i in _cache_items(dataset)), key=lambda i: i.item_key)
    assert [i.caption for i in items] == ["first ", "second"]
    for item, stem in zip(items, ("img_0", "img_1"), strict=True):
        bucket = item.content.shape[1::-1]
        expected = [resize_image_to_bucket(load_image(str(p)), bucket) for p in files.controls[stem]]
        assert all(np.array_equal(a, b) for a, b in zip(item.control_content, expected, strict=True))
        assert item.latent_cache_path.startswith(str(tmp_path / "cache" / stem))

    rows[1] = {"image_path": str(files.images[1]), "caption": "no controls"}
    params.image_jsonl_file = str(write_jsonl(tmp_path / "partial.jsonl", rows))
    with pytest.raises(MediaError, match=r"fewer than 2 control path\(s\) for: img_1.png"):
        ImageDataset(params).datasource  # noqa: B018


def test_image_dataset_without_controls_has_none(tmp_path):
    """Defect 2 (caching without control images crashed): items simply carry no control content."""
    files = make_image_dataset(tmp_path, sizes=((48, 32),))
    jsonl = write_jsonl(tmp_path / "i.jsonl", [{"image_path": str(files.images[0]), "caption": "c"}])
    dataset = ImageDataset(ImageDatasetParams(image_jsonl_file=str(jsonl), cache_directory=str(tmp_path / "c")))
    ((_, item),) = _cache_items(dataset)
    assert item.control_content is None and not dataset.has_control


def test_masks_from_files_and_alpha(tmp_path):
    files = make_image_dataset(tmp_path, sizes=((64, 32),), controls_per_image=1, control_alpha=True, masks=True)
    mask = latent_mask(Image.open(files.masks["img_0"]), (8, 4))
    expected = np.asarray(Image.open(files.masks["img_0"]).resize((8, 4), Image.LANCZOS), dtype=np.float32) / 255
    assert mask.dtype == np.float32 and mask.shape == (4, 8) and np.array_equal(mask, expected)
    assert np.allclose(mask[0], 1.0) and np.allclose(mask[-1], 0.0)  # top half kept, bottom half zeroed
    control = load_image(str(files.controls["img_0"][0]), keep_alpha=True)
    assert control.mode == "RGBA"
    alpha = latent_mask(np.asarray(control)[..., 3], (8, 4))
    assert np.allclose(alpha[:, 0], 1.0) and np.allclose(alpha[:, -1], 0.0)  # left half opaque
    assert load_image(str(files.images[0]), keep_alpha=True).mode == "RGB"


def test_text_encoder_batches(videos, tmp_path):
    params = VideoDatasetParams(video_directory=str(videos.directory), caption_extension=".txt", batch_size=2)
    batches = list(VideoDataset(params).retrieve_text_encoder_output_cache_batches(num_workers=2))
    assert [[i.caption for i in b] for b in batches] == [[caption_for("clip_0"), caption_for("clip_1")]]
    assert batches[0][0].text_encoder_output_cache_path == str(videos.directory / "clip_0_fp_te.safetensors")


def test_broken_media_raise_naming_the_file(tmp_path):
    broken = write_broken_file(tmp_path / "v" / "bad.mp4")
    (tmp_path / "v" / "bad.txt").write_text("c")
    dataset = VideoDataset(VideoDatasetParams(video_directory=str(tmp_path / "v"), caption_extension=".txt"))
    with pytest.raises(MediaError, match=str(broken)):
        _cache_items(dataset)
    bad_image = write_broken_file(tmp_path / "i" / "bad.png")
    (tmp_path / "i" / "bad.txt").write_text("c")
    dataset = ImageDataset(ImageDatasetParams(image_directory=str(tmp_path / "i"), caption_extension=".txt"))
    with pytest.raises(MediaError, match=str(bad_image)):
        _cache_items(dataset)
    with pytest.raises(MediaError, match="video not found"):
        load_video(str(tmp_path / "missing.mp4"))


def test_caption_problems_found_before_decoding(tmp_path, videos):
    files = make_image_dataset(tmp_path, sizes=((48, 32), (32, 48)))
    (files.directory / "img_1.txt").unlink()
    dataset = ImageDataset(ImageDatasetParams(image_directory=str(files.directory), caption_extension=".txt"))
    with pytest.raises(MediaError, match=r"1 caption file\(s\) missing: .*img_1.txt"):
        next(dataset.retrieve_latent_cache_batches(1))
    dataset = VideoDataset(VideoDatasetParams(video_directory=str(videos.directory)))
    with pytest.raises(MediaError, match="caption_extension is not set"):
        next(dataset.retrieve_text_encoder_output_cache_batches(1))


def test_same_stem_and_missing_directory_refused(tmp_path):
    write_image(tmp_path / "i" / "a.png", SIZE)
    write_image(tmp_path / "i" / "a.jpg", SIZE)
    with pytest.raises(MediaError, match="same stem"):
        ImageDataset(ImageDatasetParams(image_directory=str(tmp_path / "i"))).datasource  # noqa: B018
    with pytest.raises(MediaError, match="video_directory .*directory not found"):
        VideoDataset(VideoDatasetParams(video_directory=str(tmp_path / "nope"))).datasource  # noqa: B018

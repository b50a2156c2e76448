"""Dataset config loading: schema keys and types, error messages, [general] inheritance, resolution order."""

from __future__ import annotations

import argparse
import json

import pytest

from dataset.config import (
    GENERAL_KEYS,
    IMAGE_KEYS,
    VIDEO_KEYS,
    DatasetConfigError,
    ImageDatasetParams,
    VideoDatasetParams,
    load_dataset_params,
    load_user_config,
)
from tests.factory.datasets import write_config

ALL_IMAGE_VALUES = {
    "resolution": [640, 480],
    "caption_extension": ".txt",
    "batch_size": 2,
    "num_repeats": 3,
    "enable_bucket": True,
    "bucket_no_upscale": True,
    "image_directory": "imgs",
    "image_jsonl_file": None,  # not both sources at once; checked separately
    "cache_directory": "cache_img",
    "control_directory": "ctrl",
    "fp_latent_window_size": 5,
    "fp_1f_clean_indices": [0, 10],
    "fp_1f_target_index": 1,
    "fp_1f_no_post": True,
}
ALL_VIDEO_VALUES = {
    "resolution": 512,
    "caption_extension": ".cap",
    "batch_size": 4,
    "num_repeats": 2,
    "enable_bucket": True,
    "bucket_no_upscale": False,
    "video_directory": "vids",
    "video_jsonl_file": None,
    "control_directory": "vctrl",
    "target_frames": [1, 25, 45],
    "frame_extraction": "slide",
    "frame_stride": 10,
    "frame_sample": 4,
    "max_frames": 73,
    "cache_directory": "cache_vid",
    "source_fps": 24.0,
    "fp_latent_window_size": 7,
}
# a value of the wrong type for every key
BAD_VALUES = {
    "resolution": [640, 480, 3],
    "caption_extension": 1,
    "batch_size": 2.0,
    "num_repeats": "3",
    "enable_bucket": 1,
    "bucket_no_upscale": "yes",
    "image_directory": 5,
    "image_jsonl_file": ["a"],
    "video_directory": True,
    "video_jsonl_file": 3.5,
    "cache_directory": 0,
    "control_directory": {"a": 1},
    "fp_latent_window_size": 9.0,
    "fp_1f_clean_indices": ["0"],
    "fp_1f_target_index": "9",
    "fp_1f_no_post": 0,
    "target_frames": 25,
    "frame_extraction": "chain",
    "frame_stride": True,
    "frame_sample": 0,
    "max_frames": -1,
    "source_fps": 30,
}


def _entry(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def test_every_schema_key_is_covered_by_these_tests():
    assert set(ALL_IMAGE_VALUES) == set(IMAGE_KEYS)
    assert set(ALL_VIDEO_VALUES) == set(VIDEO_KEYS)
    assert set(BAD_VALUES) == set(IMAGE_KEYS) | set(VIDEO_KEYS)


def test_every_image_key_accepted_with_its_type(tmp_path):
    path = write_config(tmp_path / "c.toml", [_entry(ALL_IMAGE_VALUES)])
    (params,) = load_dataset_params(str(path))
    assert isinstance(params, ImageDatasetParams)
    assert params.resolution == (640, 480)
    for key, value in _entry(ALL_IMAGE_VALUES).items():
        if key != "resolution":
            assert getattr(params, key) == value, key


def test_every_video_key_accepted_with_its_type(tmp_path):
    path = write_config(tmp_path / "c.toml", [_entry(ALL_VIDEO_VALUES)])
    (params,) = load_dataset_params(str(path))
    assert isinstance(params, VideoDatasetParams)
    assert params.resolution == (512, 512)  # a scalar N means N×N
    for key, value in _entry(ALL_VIDEO_VALUES).items():
        if key != "resolution":
            assert getattr(params, key) == value, key
    assert params.fp_latent_window_size == 7  # refused by musubi-tuner's video schema (defect), allowed here


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_type_names_file_entry_and_key(tmp_path, key):
    is_video_key = key in VIDEO_KEYS and key not in IMAGE_KEYS
    good = {"video_directory": "v"} if is_video_key else {"image_directory": "i"}
    if key in ("video_directory", "video_jsonl_file"):
        good = {}
    second = {**good, key: BAD_VALUES[key]}
    path = write_config(tmp_path / "bad.toml", [{"image_directory": "ok"}, second])
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_params(str(path))
    message = str(info.value)
    assert str(path) in message and "[[datasets]] #2" in message and f"key '{key}'" in message
    assert "expected" in message
    assert (info.value.file, info.value.entry, info.value.key) == (str(path), "[[datasets]] #2", key)


def test_float_keys_refuse_integers_like_the_reference(tmp_path):
    path = write_config(tmp_path / "c.toml", [{"video_directory": "v", "source_fps": 30}])
    with pytest.raises(DatasetConfigError, match=r"a float.*write 30\.0"):
        load_dataset_params(str(path))
    path = write_config(tmp_path / "d.toml", [{"video_directory": "v", "source_fps": 30.0}])
    assert load_dataset_params(str(path))[0].source_fps == 30.0


@pytest.mark.parametrize("key", sorted(GENERAL_KEYS))
def test_general_key_bad_type_names_general(tmp_path, key):
    path = write_config(tmp_path / "g.toml", [{"image_directory": "i"}], general={key: BAD_VALUES[key]})
    with pytest.raises(DatasetConfigError) as info:
        load_dataset_params(str(path))
    assert (info.value.entry, info.value.key) == ("[general]", key)
    assert "[general]" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("general", "entry", "key", "pattern"),
    [
        ({}, {"image_directory": "i", "resolutoin": 512}, "resolutoin", "did you mean 'resolution'"),
        ({}, {"image_directory": "i", "target_frames": [1]}, "target_frames", "only allowed in video datasets"),
        ({}, {"video_directory": "v", "fp_1f_target_index": 9}, "fp_1f_target_index", "only allowed in image"),
        ({}, {"video_directory": "v", "image_directory": "i"}, "image_directory", "only allowed in image"),
        ({"cache_directory": "c"}, {"image_directory": "i"}, "cache_directory", r"not allowed in \[general\]"),
        ({"fp_latent_window_size": 9}, {"image_directory": "i"}, "fp_latent_window_size", "not allowed in"),
        ({"batchsize": 2}, {"image_directory": "i"}, "batchsize", "did you mean 'batch_size'"),
    ],
)
def test_unknown_keys_refused(tmp_path, general, entry, key, pattern):
    path = write_config(tmp_path / "u.toml", [entry], general=general)
    with pytest.raises(DatasetConfigError, match=pattern) as info:
        load_dataset_params(str(path))
    assert info.value.key == key
    assert str(path) in str(info.value)


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[genral]\nbatch_size = 1\n[[datasets]]\nimage_directory = "i"\n')
    with pytest.raises(DatasetConfigError, match="did you mean 'general'"):
        load_dataset_params(str(path))


def test_general_inheritance_and_resolution_order(tmp_path):
    path = write_config(
        tmp_path / "c.toml",
        [
            {"image_directory": "a"},
            {"image_directory": "b", "batch_size": 8, "resolution": 256},
            {"video_directory": "v"},
        ],
        general={"batch_size": 3, "resolution": [640, 640], "caption_extension": ".txt", "enable_bucket": True},
    )
    a, b, v = load_dataset_params(str(path), argparse.Namespace(batch_size=16, num_repeats=None, debug_dataset=True))
    assert (a.batch_size, a.resolution, a.caption_extension, a.enable_bucket) == (3, (640, 640), ".txt", True)
    assert (b.batch_size, b.resolution) == (8, (256, 256))  # the entry wins over [general]
    assert v.batch_size == 3 and v.caption_extension == ".txt"
    assert a.num_repeats == 1  # None on the command line does not count
    assert a.debug_dataset is True  # from the command line

    path = write_config(tmp_path / "d.toml", [{"image_directory": "a"}])
    (only,) = load_dataset_params(str(path), argparse.Namespace(batch_size=16))
    assert only.batch_size == 16  # the caching scripts' --batch_size when the config sets none


def test_defaults(tmp_path):
    path = write_config(tmp_path / "c.toml", [{"image_directory": "i"}, {"video_directory": "v"}])
    image, video = load_dataset_params(str(path))
    assert image == ImageDatasetParams(image_directory="i")
    assert video == VideoDatasetParams(video_directory="v")
    assert (image.resolution, image.batch_size, image.num_repeats, image.enable_bucket) == ((960, 544), 1, 1, False)
    assert (image.fp_latent_window_size, image.fp_1f_clean_indices, image.fp_1f_no_post) == (9, None, False)
    assert (video.target_frames, video.frame_extraction, video.frame_stride, video.frame_sample) == ((1,), "head", 1, 1)
    assert (video.max_frames, video.source_fps, video.fp_latent_window_size) == (129, None, 9)


def test_json_config_equivalent_to_toml(tmp_path):
    datasets = [{"video_directory": "v", "target_frames": [25], "source_fps": 60.0}]
    general = {"resolution": [640, 640]}
    from_toml = load_dataset_params(str(write_config(tmp_path / "c.toml", datasets, general)))
    from_json = load_dataset_params(str(write_config(tmp_path / "c.JSON", datasets, general)))
    assert from_toml == from_json


def test_file_errors(tmp_path):
    with pytest.raises(DatasetConfigError, match="file not found"):
        load_user_config(str(tmp_path / "missing.toml"))
    other = tmp_path / "c.yaml"
    other.write_text("datasets: []")
    with pytest.raises(DatasetConfigError, match="not supported config file format"):
        load_user_config(str(other))
    broken = tmp_path / "broken.toml"
    broken.write_text("[[datasets]\nimage_directory = 'x'\n")
    with pytest.raises(DatasetConfigError, match="cannot parse") as info:
        load_user_config(str(broken))
    assert str(broken) in str(info.value)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text(json.dumps({"datasets": []})[:-3])
    with pytest.raises(DatasetConfigError, match="cannot parse"):
        load_user_config(str(bad_json))


@pytest.mark.parametrize(
    ("datasets", "pattern"),
    [
        ([], "no \\[\\[datasets\\]\\] entries"),
        ([{"batch_size": 1}], "needs one of image_directory"),
        ([{"image_directory": "i", "image_jsonl_file": "i.jsonl"}], "either image_directory or image_jsonl_file"),
        ([{"video_jsonl_file": "v.jsonl"}], "JSONL datasets need cache_directory"),
        ([{"image_directory": "same"}, {"video_directory": "other", "cache_directory": "same/"}], "also used by"),
        ([{"image_directory": "a", "cache_directory": "c"}, {"image_directory": "b", "cache_directory": "c"}], "#1"),
    ],
)
def test_entry_level_errors(tmp_path, datasets, pattern):
    path = write_config(tmp_path / "e.toml", datasets)
    with pytest.raises(DatasetConfigError, match=pattern) as info:
        load_dataset_params(str(path))
    assert str(path) in str(info.value)


def test_target_frames_and_lists_must_be_non_empty(tmp_path):
    path = write_config(tmp_path / "e.toml", [{"video_directory": "v", "target_frames": []}])
    with pytest.raises(DatasetConfigError, match="non-empty array"):
        load_dataset_params(str(path))


def test_single_datasets_table_is_refused(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[datasets]\nimage_directory = "i"\n')
    with pytest.raises(DatasetConfigError, match="key 'datasets': expected an array of tables, got table"):
        load_dataset_params(str(path))

"""Bucket lists and selection, and resize_image_to_bucket."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from dataset.buckets import BucketSelector, resize_image_to_bucket
from tests.factory.datasets import image_pixels

LISTED_640 = [
    (320, 1280), (336, 1216), (352, 1152), (368, 1104), (384, 1056), (400, 1024), (416, 976), (432, 944),
    (448, 912), (464, 880), (480, 848), (496, 816), (512, 800), (528, 768), (544, 752), (560, 720), (576, 704),
    (592, 688), (608, 672), (624, 656), (640, 640),
]  # fmt: skip


def test_bucket_lists_match_the_documented_examples():
    buckets = BucketSelector((640, 640)).bucket_resolutions
    assert len(buckets) == 41
    assert sorted(set(LISTED_640) | {(h, w) for w, h in LISTED_640}) == buckets
    wide = BucketSelector((960, 544)).bucket_resolutions
    assert len(wide) == 47 and (wide[0], wide[-1]) == ((352, 1472), (1472, 352))
    assert {(544, 960), (720, 720), (960, 544)} <= set(wide)
    square = BucketSelector((512, 512)).bucket_resolutions
    assert len(square) == 33 and (square[0], square[-1]) == ((256, 1024), (1024, 256))


def test_bucket_choice_nearest_aspect_first_on_tie():
    selector = BucketSelector((640, 640))
    assert selector.get_bucket_resolution((1920, 1080)) == (848, 480)
    assert selector.get_bucket_resolution((1000, 1000)) == (640, 640)
    # ratios 0.5 and 2.0 are exactly 0.75 away from 5:4 = 1.25: the earlier bucket in the sorted list wins
    tie = BucketSelector((64, 64))
    tie.bucket_resolutions, tie.aspect_ratios = [(32, 64), (64, 32)], np.array([0.5, 2.0])
    assert tie.get_bucket_resolution((100, 80)) == (32, 64)


def test_no_upscale_and_disabled_bucketing():
    selector = BucketSelector((640, 640), enable_bucket=True, no_upscale=True)
    assert selector.get_bucket_resolution((500, 300)) == (496, 288)  # small: floor16 of its own size
    assert selector.get_bucket_resolution((1920, 1080)) == (848, 480)  # larger than the area: normal choice
    off = BucketSelector((640, 480), enable_bucket=False, no_upscale=True)
    assert off.bucket_resolutions == [(640, 480)] and off.no_upscale is False
    assert off.get_bucket_resolution((100, 1000)) == (640, 480)


def test_resize_same_size_is_unchanged():
    pixels = image_pixels((48, 32), seed=1)
    assert resize_image_to_bucket(pixels, (48, 32)) is pixels
    assert np.array_equal(resize_image_to_bucket(Image.fromarray(pixels), (48, 32)), pixels)


def test_resize_down_uses_inter_area_then_center_crop():
    pixels = image_pixels((200, 100), seed=2)
    out = resize_image_to_bucket(pixels, (64, 48))
    scale = max(64 / 200, 48 / 100)  # 0.48
    size = (int(200 * scale + 0.5), int(100 * scale + 0.5))  # (96, 48)
    expected = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    left = (size[0] - 64) // 2
    assert out.shape == (48, 64, 3)
    assert np.array_equal(out, expected[:, left : left + 64])


def test_resize_up_uses_lanczos_then_center_crop():
    pixels = image_pixels((30, 20), seed=3)
    out = resize_image_to_bucket(Image.fromarray(pixels), (64, 64))
    size = (int(30 * 3.2 + 0.5), int(20 * 3.2 + 0.5))  # scale 64/20 = 3.2 → (96, 64)
    expected = np.array(Image.fromarray(pixels).resize(size, Image.LANCZOS))
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out, expected[:, 16:80])


def test_resize_one_side_matching_other_too_small_is_scaled():
    """Defect 14 fixed: musubi-tuner only cropped here and returned a 20-pixel-high image."""
    pixels = image_pixels((64, 20), seed=4)
    out = resize_image_to_bucket(pixels, (64, 32))
    assert out.shape == (32, 64, 3)
    expected = np.array(Image.fromarray(pixels).resize((102, 32), Image.LANCZOS))  # 64·1.6 + 0.5 → 102
    assert np.array_equal(out, expected[:, 19:83])


def test_resize_one_side_matching_other_larger_is_crop_only():
    pixels = image_pixels((80, 32), seed=5)
    out = resize_image_to_bucket(pixels, (64, 32))
    assert np.array_equal(out, pixels[:, 8:72])


def test_resize_keeps_alpha():
    pixels = image_pixels((40, 30), seed=6, channels=4)
    assert resize_image_to_bucket(pixels, (32, 32)).shape == (32, 32, 4)
    assert resize_image_to_bucket(Image.fromarray(pixels, "RGBA"), (64, 48)).shape == (48, 64, 4)

"""Aspect-ratio buckets and the resize-and-center-crop used for every dataset frame and every generation input image.

`resize_image_to_bucket` is the single implementation shared by caching, training and `fpack_generate_video.py`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

RESOLUTION_STEP = 16  # bucket sides are multiples of this (FramePack, like HunyuanVideo and Wan)


def divisible_by(value: int, divisor: int) -> int:
    """Round `value` down to a multiple of `divisor`."""
    return value - value % divisor


class BucketSelector:
    """Maps an image size (W, H) to its bucket (W, H).

    With bucketing on, the buckets are every (w, h) and (h, w) with w stepping by 16 from about half the side of
    the square of equal area up to that side, and h the largest multiple of 16 keeping w·h within the area.
    With bucketing off the only bucket is `resolution` itself and `no_upscale` is ignored.
    """

    def __init__(self, resolution: tuple[int, int], enable_bucket: bool = True, no_upscale: bool = False):
        self.resolution = tuple(resolution)
        self.bucket_area = resolution[0] * resolution[1]
        if not enable_bucket:
            self.bucket_resolutions = [self.resolution]
            self.no_upscale = False
        else:
            self.no_upscale = no_upscale
            side = int(math.sqrt(self.bucket_area))
            # musubi-tuner starts at 0 for areas below 32x32 and divides by zero; start at one step instead
            first = max(divisible_by(side // 2, RESOLUTION_STEP), RESOLUTION_STEP)
            buckets = set()
            for w in range(first, side + RESOLUTION_STEP, RESOLUTION_STEP):
                h = divisible_by(self.bucket_area // w, RESOLUTION_STEP)
                buckets.add((w, h))
                buckets.add((h, w))
            self.bucket_resolutions = sorted(b for b in buckets if b[0] > 0 and b[1] > 0)
        self.aspect_ratios = np.array([w / h for w, h in self.bucket_resolutions])

    def get_bucket_resolution(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Bucket (W, H) for an image of size (W, H); ties between equally close aspect ratios go to the first."""
        width, height = image_size
        if self.no_upscale and width * height <= self.bucket_area:
            return divisible_by(width, RESOLUTION_STEP), divisible_by(height, RESOLUTION_STEP)
        errors = np.abs(self.aspect_ratios - width / height)
        return self.bucket_resolutions[int(errors.argmin())]


def bucket_for_area(image_size: tuple[int, int], resolution: tuple[int, int]) -> tuple[int, int]:
    """(W, H) with about the area of `resolution` (W, H) and the aspect ratio of `image_size` (W, H), sides
    multiples of 16 (`--one_frame_auto_resize`).

    Start from W = sqrt(area·ar), rounded down to the step; of the five widths W-2·16 .. W+2·16, each with
    H = (area // width) rounded down to the step, keep the first whose ratio is closest to the image's.
    """
    area = resolution[0] * resolution[1]
    width, height = image_size
    aspect = width / height
    start = divisible_by(int(math.sqrt(area * aspect)), RESOLUTION_STEP)
    best, best_error = None, float("inf")
    for offset in range(-2, 3):
        w = start + offset * RESOLUTION_STEP
        if w <= 0:
            continue
        h = divisible_by(area // w, RESOLUTION_STEP)
        if h <= 0:
            continue
        error = abs(w / h - aspect)
        if error < best_error:
            best, best_error = (w, h), error
    if best is None:
        raise ValueError(f"no {RESOLUTION_STEP}-pixel bucket of area {area} fits an image of {width}x{height}")
    return best


def resize_image_to_bucket(image: Image.Image | np.ndarray, bucket_reso: tuple[int, int]) -> np.ndarray:
    """Scale `image` to cover `bucket_reso` (W, H), then center-crop to exactly that size.

    Upscaling uses PIL LANCZOS, downscaling OpenCV INTER_AREA; new sides are int(side·scale + 0.5). Returns a
    uint8 HWC array with the input's channels (RGB, RGBA, ...).

    musubi-tuner at 1c0edc5 skips scaling whenever one side already matches, which leaves the other side too small
    when it is shorter than the bucket (fixed there later); here the image is always scaled to cover. When one side
    matches and the other is longer the scale is 1 and both agree (crop only).
    """
    is_pil = isinstance(image, Image.Image)
    width, height = image.size if is_pil else (image.shape[1], image.shape[0])
    bucket_width, bucket_height = bucket_reso
    if (width, height) == (bucket_width, bucket_height):
        return np.array(image) if is_pil else image

    scale = max(bucket_width / width, bucket_height / height)
    if scale == 1.0:
        array = np.array(image) if is_pil else image
    else:
        width = int(width * scale + 0.5)
        height = int(height * scale + 0.5)
        if scale > 1.0:
            pil = image if is_pil else Image.fromarray(image)
            array = np.array(pil.resize((width, height), Image.LANCZOS))
        else:
            array = np.array(image) if is_pil else image
            array = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA)

    left = (width - bucket_width) // 2
    top = (height - bucket_height) // 2
    return array[top : top + bucket_height, left : left + bucket_width]

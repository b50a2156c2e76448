"""lllyasviel's FramePack bucket table: the (height, width) sizes the public FramePack weights were trained at.

Only the 640 table exists. The dataset code does not use it (datasets bucket with `dataset.buckets.BucketSelector`);
it is offered to the generation script for picking a video size from the input image.
"""

from __future__ import annotations

# resolution key -> (height, width) pairs, ordered from widest to tallest
bucket_options: dict[int, list[tuple[int, int]]] = {
    640: [
        (416, 960),
        (448, 864),
        (480, 832),
        (512, 768),
        (544, 704),
        (576, 672),
        (608, 640),
        (640, 608),
        (672, 576),
        (704, 544),
        (768, 512),
        (832, 480),
        (864, 448),
        (960, 416),
    ],
}


def find_nearest_bucket(h: int, w: int, resolution: int = 640) -> tuple[int, int]:
    """Return the (height, width) bucket whose aspect ratio is closest to h:w.

    Closeness is |h·bucket_w − w·bucket_h| (integer cross-multiplication); on a tie the later entry wins.
    """
    if resolution not in bucket_options:
        raise ValueError(f"no FramePack buckets for resolution {resolution}; available: {sorted(bucket_options)}")
    best = None
    best_metric = None
    for bucket_h, bucket_w in bucket_options[resolution]:
        metric = abs(h * bucket_w - w * bucket_h)
        if best_metric is None or metric <= best_metric:
            best_metric = metric
            best = (bucket_h, bucket_w)
    return best

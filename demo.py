"""`make demo`: generate a short video with the tiny built-in checkpoints (random weights) on this machine.

The models are written once into demo_models/ by the same factory the tests use, in the public file layouts, and
loaded through the same code a user's real checkpoints go through. Their weights are random, so the video shows
moving noise shaped by the start image, not a meaningful animation.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from pipelines.generate import main as generate  # noqa: E402
from tests.factory.models import write_all_models  # noqa: E402

MODELS = os.path.join(ROOT, "demo_models")
OUTPUT = os.path.join(ROOT, "demo_output")


def run() -> int:
    print(f"writing tiny random-weight checkpoints to {MODELS}")
    models = write_all_models(MODELS)
    code = generate(
        [
            *models.flags(),
            "--image_path", os.path.join(ROOT, "assets", "demo_start.png"),
            "--prompt", "A yellow ball bounces across a green field.",
            "--video_size", "128", "128",
            "--video_sections", "2",
            "--infer_steps", "6",
            "--seed", "1234",
            "--save_path", OUTPUT,
            "--output_type", "both",
        ]
    )  # fmt: skip
    videos = sorted(f for f in os.listdir(OUTPUT) if f.endswith(".mp4"))
    print()
    print(f"video written to {os.path.join(OUTPUT, videos[-1])}" if videos else "no video was written")
    print("note: the demo checkpoints have random weights, so the video is not a meaningful animation")
    return code


if __name__ == "__main__":
    sys.exit(run())

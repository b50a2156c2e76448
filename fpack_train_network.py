"""FramePack LoRA training with accelerate. Run with --help for every flag."""

import sys

from training.trainer import main

if __name__ == "__main__":
    sys.exit(main())

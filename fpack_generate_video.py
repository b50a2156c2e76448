"""FramePack image-to-video generation. Run with --help for every flag."""

import sys

from pipelines.generate import main

if __name__ == "__main__":
    sys.exit(main())

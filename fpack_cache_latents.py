"""Cache FramePack latents and image embeddings of a dataset for training. Run with --help for every flag."""

import sys

from pipelines.cache_latents import main

if __name__ == "__main__":
    sys.exit(main())

"""Cache FramePack latents and image embeddings of a dataset for training. Run with --help for every flag."""

import sys

from pipelines.cache_latents import main as cache_latents
from utils.cli import INTERRUPT_GRACE_S, script_main

# A Ctrl-C that has not ended the run within the grace (swallowed by a library) ends it anyway.
main = script_main(cache_latents, interrupt_grace_s=INTERRUPT_GRACE_S)

if __name__ == "__main__":
    sys.exit(main())

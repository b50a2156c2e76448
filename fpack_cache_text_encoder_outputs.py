"""Cache FramePack text encoder outputs (LLaMA and CLIP-L) of a dataset's captions. Run with --help for every flag."""

import sys

from pipelines.cache_text_encoder_outputs import main as cache_text_encoder_outputs
from utils.cli import INTERRUPT_GRACE_S, script_main

# A Ctrl-C that has not ended the run within the grace (swallowed by a library) ends it anyway.
main = script_main(cache_text_encoder_outputs, interrupt_grace_s=INTERRUPT_GRACE_S)

if __name__ == "__main__":
    sys.exit(main())

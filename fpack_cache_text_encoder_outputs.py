"""Cache FramePack text encoder outputs (LLaMA and CLIP-L) of a dataset's captions. Run with --help for every flag."""

import sys

from pipelines.cache_text_encoder_outputs import main

if __name__ == "__main__":
    sys.exit(main())

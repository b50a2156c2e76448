"""FramePack image-to-video generation. Run with --help for every flag."""

import sys

from pipelines.generate import main as generate
from utils.cli import INTERRUPT_GRACE_S, script_main

# A Ctrl-C that has not ended the run within the grace (swallowed by a library) ends it anyway.
main = script_main(generate, interrupt_grace_s=INTERRUPT_GRACE_S)

if __name__ == "__main__":
    sys.exit(main())

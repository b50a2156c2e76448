"""FramePack image-to-video generation. Run with --help for every flag."""

import sys

from pipelines.generate import main as generate
from utils.cli import script_main

# A Ctrl-C that has not ended the run two seconds later (swallowed by a library) ends it anyway.
main = script_main(generate, interrupt_grace_s=2.0)

if __name__ == "__main__":
    sys.exit(main())

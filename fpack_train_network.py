"""FramePack LoRA training with accelerate. Run with --help for every flag."""

import sys

from training.trainer import main as train_network
from utils.cli import INTERRUPT_GRACE_S, script_main

# A Ctrl-C that has not ended the run within the grace (swallowed by a library) ends it anyway.
main = script_main(train_network, interrupt_grace_s=INTERRUPT_GRACE_S)

if __name__ == "__main__":
    sys.exit(main())

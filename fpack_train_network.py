"""fpack_train_network.py: not implemented yet in this project (see the open issues)."""

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="fpack_train_network.py", description="Not implemented yet; see the project's issues."
    )
    parser.parse_args()
    print("fpack_train_network.py is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

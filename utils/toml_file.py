"""Reading TOML files (dataset configs, training `--config_file`, sample prompts, tracker configs) with the
standard library's TOML 1.0 parser, `tomllib` (its backport `tomli` on Python 3.10)."""

from __future__ import annotations

import sys

from utils.cli import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class TomlFileError(UserError, ValueError):
    """A TOML file that cannot be read; the message names the flag, the file and, for syntax errors, the line and
    column (`reason` is the message without the flag and file)."""

    def __init__(self, what: str, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{what} {path}: {reason}" if what else f"{path}: {reason}")


def read_toml(path: str, what: str = "") -> dict:
    """The table of a TOML file; TomlFileError naming ``what`` (the flag that gave the file) and ``path``."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        reason = f"not valid TOML: {e}"
    except UnicodeDecodeError as e:
        reason = f"not UTF-8 text (byte {e.start})"
    except RecursionError:
        reason = "not valid TOML: arrays or tables nested too deeply"
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        reason = f"not valid TOML: {e}"
    except OSError as e:
        reason = f"cannot read ({e.strerror or e})"
    raise TomlFileError(what, path, reason)

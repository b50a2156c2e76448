"""The one tokenizer of prompt lines with inline options (`a cat --w 832 --h 480 --d 42`), shared by prompt files
and interactive lines of generation and by the sample prompts of training. Each caller gives its option table and
error policy: generation refuses a line with a bad option, training logs the option and ignores it."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from utils.cli import UserError

logger = logging.getLogger(__name__)

OPTION_SEPARATOR = " --"
LEADING_OPTION_RE = re.compile(r"^--(\w+)")  # a line that starts with an option has no prompt text before it


class PromptLineError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class LineOption:
    """What an inline option sets, how its text converts, and whether it may repeat (values collect in a list)."""

    field: str
    convert: Callable[[str], Any] = str
    repeat: bool = False


def parse_line_options(
    line: str, options: Mapping[str, LineOption], *, strict: bool, ignore_case: bool = False
) -> tuple[str, dict[str, Any]]:
    """-> (prompt text, {option name: converted value}).

    An unknown option, a missing value or one that does not convert raises `PromptLineError` when `strict`;
    otherwise it is logged and ignored. `ignore_case` matches option names in any case (`--W` is `--w`).
    A line that starts with an option (`--d 14 a cat`) always raises `PromptLineError`: the prompt text comes first.
    """
    leading = LEADING_OPTION_RE.match(line.lstrip())
    if leading:
        raise PromptLineError(
            f"the line starts with the option --{leading.group(1)}: write the prompt text first, then the options"
        )
    parts = line.split(OPTION_SEPARATOR)
    values: dict[str, Any] = {}
    for part in parts[1:]:
        name, _, text = part.strip().partition(" ")
        name, text = name.lower() if ignore_case else name, text.strip()
        problem = None
        if name not in options:
            problem = f"unknown option --{name} (known: {' '.join(f'--{k}' for k in options)})"
        elif not text:
            problem = f"--{name} needs a value"
        else:
            option = options[name]
            try:
                value = option.convert(text)
            except ValueError:
                problem = f"--{name} {text!r}: expected {option.convert.__name__}"
        if problem is not None:
            if strict:
                raise PromptLineError(problem)
            logger.error(f"prompt line option {problem}; ignored")
            continue
        if option.repeat:
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    return parts[0].strip(), values


def read_prompt_file(path: str, flag: str) -> list[tuple[int, str]]:
    """Non-empty, non-comment lines with their 1-based line numbers; PromptLineError naming `flag` when the file
    cannot be read as text."""
    lines = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if line and not line.startswith("#"):
                    lines.append((number, line))
    except (OSError, UnicodeDecodeError) as e:
        raise PromptLineError(f"{flag} {path}: cannot read the prompt file ({e})") from None
    return lines

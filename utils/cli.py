"""Shared argparse pieces of the entry scripts."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help shows its default; descriptions and epilogs keep their line breaks."""


def check_positive(flag: str, value, allow_zero: bool = False) -> None:
    """Raise ValueError naming `flag` unless `value` is None or > 0 (>= 0 with `allow_zero`)."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

"""Shared argparse pieces of the entry scripts."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help shows its default; descriptions and epilogs keep their line breaks."""

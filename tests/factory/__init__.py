"""Tiny-checkpoint factory: seeded random weights with tiny dimensions, written in every real key layout.

The files go through the same loaders a user hits with real checkpoints. `dims.py` holds the tiny sizes that
must agree across models (the DiT's text, pooled and image widths are the encoders' hidden sizes).
"""

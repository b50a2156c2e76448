"""Tiny model sizes shared by every factory module; the DiT's input widths must equal the encoders' outputs.

Each size respects the real model family's constants that shapes cannot reveal: DiT and LLaMA head_dim 128,
CLIP head_dim 64, SigLIP head_dim 72 at image 384 / patch 14, VAE channels a multiple of 32 GroupNorm groups.
"""

LLAMA_HIDDEN = 128  # 1 head of 128 (LLaMA-3 head_dim)
LLAMA_LAYERS = 4  # hidden_states[-3] must exist
LLAMA_INTERMEDIATE = 256
LLAMA_KV_HEADS = 1

CLIP_HIDDEN = 64  # 1 head of 64 (CLIP-L head_dim)
CLIP_LAYERS = 2
CLIP_INTERMEDIATE = 128

SIGLIP_HIDDEN = 72  # 1 head of 72 (SigLIP so400m-style head_dim)
SIGLIP_LAYERS = 2
SIGLIP_INTERMEDIATE = 144

DIT_INNER = 128  # 1 head of 128
DIT_DOUBLE_BLOCKS = 2
DIT_SINGLE_BLOCKS = 2
DIT_REFINER_BLOCKS = 2

VAE_BLOCK_OUT_CHANNELS = (32, 32, 64, 64)
VAE_LAYERS_PER_BLOCK = 1


def config_sizes(config) -> tuple[int, int, int]:
    """(hidden, layers, intermediate) of a loaded encoder's transformers config, to compare with the sizes above."""
    return config.hidden_size, config.num_hidden_layers, config.intermediate_size

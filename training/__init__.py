"""FramePack LoRA training (`fpack_train_network.py`).

Modules: `args` (flags, config file, validation), `timesteps` (flow-matching timestep sampling and loss weighting),
`optim` (optimizers and learning-rate schedulers), `data` (DataLoader order that can resume mid-epoch),
`checkpoints` (file names, metadata, atomic LoRA and state saves, resume state), `sample_prompts` (sampling during
training through the generation code), `tracking` (loss bookkeeping and trackers), `rng` (random-state helpers)
and `trainer` (the setup sequence and the training loop).
"""

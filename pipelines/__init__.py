"""Command-line pipelines: generation, the two caching pipelines, the saved-latent format and prompt-file parsing."""

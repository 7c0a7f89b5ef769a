"""The training side: latent cache (frozen GSRecon + GSVAE), GSDiff fine-tuning, evaluation and generation."""

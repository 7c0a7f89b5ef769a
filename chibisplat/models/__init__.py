"""DiffSplat-compatible models: GSRecon, GSVAE (GSAutoencoderKL) and the multi-view SD1.5 UNet."""

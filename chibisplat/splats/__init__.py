"""3D Gaussian splats: splatter images -> Gaussians, rasterization (PyTorch / gsplat), PLY files."""

"""A CPU stand-in for ``gsplat.rasterization`` (gsplat has no CPU path and this machine has no GPU).

It follows gsplat's documented contract (``docs.gsplat.studio`` ``rasterization``): world-to-camera OpenCV
``viewmats`` (C, 4, 4), pixel ``Ks`` (C, 3, 3); the 3D covariance from ``covars`` when given (quats and scales are
then ignored), else from the NORMALISED quaternion and the scales; ``eps2d`` added to every projected 2D covariance;
``rasterize_mode="classic"`` (no compensation); opacities used as given; returns the accumulated RGB + z (no
background) (C, H, W, 4), the alphas (C, H, W, 1) and a dict. Each camera is drawn with our own projection and
compositing, so what the stand-in proves is our conversion into and out of gsplat's API, not gsplat's kernels (the
CUDA agreement test in tests/test_image_formation.py does that where a GPU is present).
"""

from __future__ import annotations

import sys
import types

import torch

from chibisplat.splats import rasterize as rz


def install(monkeypatch) -> list[dict]:
    """Replace ``gsplat`` by the stand-in and let the adapter accept CPU tensors; returns the recorded calls."""
    calls: list[dict] = []

    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=0.01,
                      far_plane=1e10, eps2d=0.3, render_mode="RGB", rasterize_mode="classic", covars=None):
        assert viewmats.ndim == 3 and Ks.ndim == 3 and viewmats.shape[0] == Ks.shape[0]
        assert opacities.shape == means.shape[:1], "gsplat takes one opacity per Gaussian"
        assert rasterize_mode == "classic" and render_mode == "RGB+D"
        calls.append(dict(viewmats=viewmats, Ks=Ks, eps2d=eps2d, covars=covars, opacities=opacities,
                          size=(width, height), planes=(near_plane, far_plane), mode=rasterize_mode,
                          render_mode=render_mode))
        cov3d = covars if covars is not None else rz.covariance_3d(quats, scales, "3dgs")  # gsplat normalises q
        rgbd, alphas = [], []
        for c in range(viewmats.shape[0]):
            mean2d, cov2d, depth = rz.project_covariances(means, cov3d, viewmats[c], Ks[c], width, height)
            cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype)
            out = rz.composite_screen(mean2d, cov2d, depth, opacities, colors, width, height,
                                      background=(0.0, 0.0, 0.0), near=near_plane, far=far_plane)
            rgbd.append(torch.cat([out["image"], out["depth"]]).permute(1, 2, 0))
            alphas.append(out["alpha"].permute(1, 2, 0))
        return torch.stack(rgbd), torch.stack(alphas), {}

    monkeypatch.setitem(sys.modules, "gsplat", types.SimpleNamespace(rasterization=rasterization))
    monkeypatch.setattr(rz, "GSPLAT_DEVICES", ("cpu", "cuda"))
    return calls

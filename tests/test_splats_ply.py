"""PLY export/import in the 3DGS layout."""

import numpy as np
import torch

from chibisplat.splats.ply import FLOAT_FIELDS, SH_C0, read_ply, write_ply
from chibisplat.splats.splatter import Gaussians


def test_round_trip_and_threshold(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 50
    gs = Gaussians(torch.randn(n, 3, generator=g), torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1),
                   torch.rand(n, 3, generator=g) * 0.02 + 0.0005, torch.rand(n, generator=g), torch.rand(n, 3, generator=g))
    path = tmp_path / "a.ply"
    written = write_ply(path, gs, opacity_threshold=0.3)
    keep = gs.opacities > 0.3
    assert written == int(keep.sum())
    back = read_ply(path)
    ref = gs.select(keep)
    for f in ("means", "quats", "scales", "opacities", "colors"):
        assert torch.allclose(getattr(back, f), getattr(ref, f), rtol=1e-5, atol=1e-6), f
    header = path.read_bytes().split(b"end_header")[0].decode()
    props = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert props == list(FLOAT_FIELDS) + ["red", "green", "blue"]
    raw = np.frombuffer(path.read_bytes()[len(header) + len("end_header\n"):][: 4 * 14], dtype="<f4")
    assert raw[3] == np.float32((ref.colors[0, 0].item() - 0.5) / SH_C0)  # SH DC, not RGB
    assert np.isclose(raw[7], np.log(ref.scales[0, 0].item() + 1e-8))  # log scale

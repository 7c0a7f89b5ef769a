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
    c = np.float32(ref.colors[0, 0].item())
    assert raw[3] == (c - np.float32(0.5)) / np.float32(SH_C0)  # SH DC, not RGB, in float32 as DiffSplat
    assert np.isclose(raw[7], np.log(ref.scales[0, 0].item() + 1e-8))  # log scale


def test_bytes_follow_diffsplat_save_ply(tmp_path):
    """DiffSplat's save_ply(compatible=True): float32 arithmetic (its logit of an opacity of 1.0 uses the float32 clamp
    bound 1 - 1e-6 = 0.99999899, giving 13.8023, not float64's 13.8155) and TRUNCATED uint8 colours."""
    rgb = torch.tensor([[0.5, 0.999, 0.2], [1.0, 1.2, -0.1], [0.25, 0.75, 0.0039]])
    gs = Gaussians(torch.zeros(3, 3), torch.tensor([[1.0, 0, 0, 0]] * 3), torch.full((3, 3), 0.01),
                   torch.tensor([1.0, 0.5, 1e-7]), rgb)
    path = tmp_path / "d.ply"
    assert write_ply(path, gs) == 3  # threshold 0 keeps every opacity > 0
    data = path.read_bytes()
    v = np.frombuffer(data[data.index(b"end_header\n") + len(b"end_header\n"):],
                      dtype=[(f, "<f4") for f in FLOAT_FIELDS] + [(c, "u1") for c in ("red", "green", "blue")])
    # by hand: trunc(255 * [0.5, 0.999, 0.2]) = [127, 254, 51] (rounding gives 128, 255, 51); clipped to [0, 255]
    assert v["red"].tolist() == [127, 255, 63] and v["green"].tolist() == [254, 255, 191]
    assert v["blue"].tolist() == [51, 0, 0]
    hi, lo = np.float32(1 - 1e-6), np.float32(1e-6)  # the float32 clamp bounds
    expected = [np.log(hi / (np.float32(1) - hi)), np.float32(0.0), np.log(lo / (np.float32(1) - lo))]
    assert abs(expected[0] - 13.8023) < 1e-3  # float64 would give log(0.999999 / 1e-6) = 13.8155
    for got, want in zip(v["opacity"].tolist(), expected):
        assert abs(got - float(want)) <= 2 * np.spacing(np.float32(abs(want)) + np.float32(1e-30)), (got, want)
    assert write_ply(tmp_path / "z.ply", Gaussians(gs.means, gs.quats, gs.scales, torch.tensor([0.0, 0.3, 1e-9]),
                                                   rgb)) == 2  # exactly 0 is dropped, as DiffSplat's `> 0`

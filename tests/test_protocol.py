"""The DiffSplat protocol in one module (issue 13): chibisplat/protocol.py holds the facts, nothing repeats them.

* Values: the protocol's numbers against docs/diffsplat-reference.md, and the one camera-axis flip against the
  hand-written matrix; cameras, geometry and the loader give the same camera-to-world matrices as before (hand values).
* Greps: no module outside the protocol writes its literals (the radius 1.4, "4 views" as ``[:4]`` / ``num_views=4``,
  the axis flip as a diagonal or a column negation, the inference azimuths), and no module imports another's
  private names (packed rows have one public reader, chibisplat/dataset/rows.py).
"""

from __future__ import annotations

import ast
import io
import math
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from chibisplat import cameras, geometry, protocol
from chibisplat.dataset.loader import canonical_cameras

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "chibisplat" / "protocol.py"
SCANNED = sorted(
    p for p in [*REPO.glob("chibisplat/**/*.py"), *REPO.glob("stages/*.py"), *REPO.glob("benchmarks/*.py")]
    if p != PROTOCOL
)

# ---------------------------------------------------------------------------------------------------------------
# Values.


def test_protocol_values_are_diffsplats():
    """docs/diffsplat-reference.md §2, §4, §5: 4 input views of 8, radius 1.4, fxfy 1422.222 / 1024, cx = cy = 0.5,
    azimuths 0/90/180/270 at elevation 10."""
    assert (protocol.NUM_INPUT_VIEWS, protocol.NUM_RENDER_VIEWS, protocol.NUM_SUPERVISION_VIEWS) == (4, 8, 4)
    assert protocol.CANONICAL_RADIUS == 1.4
    assert protocol.FOCAL_NORMALISED == pytest.approx(1422.222 / 1024, abs=1e-6)
    assert protocol.PRINCIPAL_POINT_NORMALISED == 0.5
    assert math.degrees(2 * math.atan(0.5 / protocol.FOCAL_NORMALISED)) == pytest.approx(39.598, abs=1e-3)
    assert protocol.INFERENCE_AZIMUTHS == (0.0, 90.0, 180.0, 270.0) and protocol.INFERENCE_ELEVATION == 10.0
    assert protocol.NUM_SLOTS == 40 and protocol.DUPLICATE_SLOTS == (24, 39) and protocol.TOP_DOWN_SLOTS == (25, 26)
    assert protocol.RING_A == tuple(range(24)) and protocol.RING_B == tuple(range(27, 39))


def test_even_view_sets_are_diffsplats_90_degree_sets():
    """§5: (i0 + 6k) % 24 on ring A, 27 + (i0 + 3k) % 12 on ring B; written out by hand."""
    assert protocol.EVEN_VIEW_SETS == (
        (0, 6, 12, 18), (1, 7, 13, 19), (2, 8, 14, 20), (3, 9, 15, 21), (4, 10, 16, 22), (5, 11, 17, 23),
        (27, 30, 33, 36), (28, 31, 34, 37), (29, 32, 35, 38),
    )
    assert protocol.even_views(protocol.RING_A, 22) == (22, 4, 10, 16)  # wraps around the ring
    assert protocol.even_views(protocol.RING_B, 11) == (38, 29, 32, 35)
    slots = {s.index: s for s in cameras.camera_slots()}
    for views in protocol.EVEN_VIEW_SETS:  # 90 degrees apart on one ring
        az = [slots[i].azimuth_deg for i in views]
        assert [(b - a) % 360 for a, b in zip(az, az[1:])] == [90.0, 90.0, 90.0]


FLIP_BY_HAND = np.array([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, -1.0, 0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("kind", ["numpy64", "numpy32", "torch64", "torch32"])
def test_the_one_axis_flip_is_the_hand_written_matrix_and_its_own_inverse(kind):
    np.testing.assert_array_equal(protocol.CAMERA_AXIS_FLIP, FLIP_BY_HAND)
    np.testing.assert_array_equal(protocol.CAMERA_AXIS_FLIP @ protocol.CAMERA_AXIS_FLIP, np.eye(4))
    dtype = np.float64 if kind.endswith("64") else np.float32
    m = np.random.default_rng(0).standard_normal((3, 4, 4)).astype(dtype)
    m[..., 3, :] = (0, 0, 0, 1)
    x = torch.from_numpy(m.copy()) if kind.startswith("torch") else m.copy()
    flipped = protocol.flip_camera_axes(x)
    assert type(flipped) is type(x) and flipped.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(flipped), m @ FLIP_BY_HAND.astype(dtype))  # exact: only signs change
    np.testing.assert_array_equal(np.asarray(protocol.flip_camera_axes(flipped)), m)
    np.testing.assert_array_equal(np.asarray(x), m)  # the input is left alone
    with pytest.raises(ValueError):
        protocol.CAMERA_AXIS_FLIP[1, 1] = 1.0  # the constant cannot be edited in place


S20, C20 = math.sin(math.radians(20.0)), math.cos(math.radians(20.0))
S10, C10 = math.sin(math.radians(10.0)), math.cos(math.radians(10.0))


def test_cameras_blender_camera_by_hand():
    """Slot 0 (azimuth 0, elevation 20, distance 1.645): OpenCV axes x = (1,0,0), y = (0,-s,-c), z = (0,c,-s) in the
    Blender world; Blender's camera has y and z negated."""
    d = cameras.DISTANCE_RING_A
    expected = np.array([[1.0, 0, 0, 0], [0, S20, -C20, -d * C20], [0, C20, S20, d * S20], [0, 0, 0, 1]])
    got = cameras.opencv_to_blender_camera(cameras.slot_c2w(cameras.camera_slots()[0]))
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_geometry_inference_camera_by_hand():
    """orbit_camera(-10, 0, 1.4) sits at (0, 1.4 sin 10, 1.4 cos 10) in the OpenGL world; with OpenCV axes x = (1,0,0),
    y = (0,-c,s), z = (0,-s,-c) (looking at the origin)."""
    expected = np.array([[1.0, 0, 0, 0], [0, -C10, -S10, 1.4 * S10], [0, S10, -C10, 1.4 * C10], [0, 0, 0, 1]])
    got = geometry.opengl_to_opencv_camera(geometry.orbit_camera(-10.0, 0.0, 1.4).double())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(geometry.opengl_to_opencv_camera(got).numpy(), expected @ FLIP_BY_HAND, atol=1e-12)


def test_loader_canonical_cameras_by_hand():
    """Slots 6 (azimuth 90) then 0 (azimuth 0), both at elevation 20 on ring A: view 0 becomes azimuth 0 at radius 1.4
    in the OpenGL world, view 1 azimuth 270 (on -x); Blender normals rotate so that +X (towards camera 6) is +z."""
    slots = cameras.camera_slots()
    out = canonical_cameras(np.stack([cameras.slot_c2w(slots[6]), cameras.slot_c2w(slots[0])]))
    r = 1.4
    view0 = np.array([[1.0, 0, 0, 0], [0, -C20, -S20, r * S20], [0, S20, -C20, r * C20], [0, 0, 0, 1]])
    view1 = np.array([[0.0, -S20, C20, -r * C20], [0, -C20, -S20, r * S20], [1, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(out["C2W"].numpy(), np.stack([view0, view1]), atol=1e-9)
    np.testing.assert_allclose(out["normal_rotation"].numpy(), [[0.0, 1, 0], [0, 0, 1], [1, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(out["cam_pose"].numpy(), [[-math.radians(20), 0, r], [-math.radians(20), 1.5 * math.pi, r]],
                               atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Greps: the protocol's literals and private imports outside their home.

_FSTRING_MIDDLE = getattr(tokenize, "FSTRING_MIDDLE", None)  # Python >= 3.12 splits f-strings into tokens
_KEY = re.compile(r"^[rbuRBU]?(['\"])\w+\1$")  # a short string such as "num_views" (a dict key) is kept

FORBIDDEN = {
    "the canonical radius 1.4 (protocol.CANONICAL_RADIUS)": re.compile(r"(?:^| )1\.40*(?: |$)"),
    "a view count of 4/8 (protocol.NUM_INPUT_VIEWS / NUM_RENDER_VIEWS)": re.compile(
        r"\b(?:num_views|num_input_views|num_render_views)['\"]? (?:: \w+ )?[=:] [48](?: |$)"),
    "a views constant (protocol)": re.compile(r"(?:^| )[A-Z_]*(?:VIEWS|SLOTS) (?:: [\w\[\], .]+ )?= [(\d]"),
    "the even view sets (protocol.EVEN_VIEW_SETS)": re.compile(r"(?:^| )EVEN_VIEW_SETS (?:: [\w\[\], .]+ )?="),
    "a [:4] / [4:] view slice (protocol.NUM_INPUT_VIEWS)": re.compile(r"[\[,] (?:: 4|4 :) [\],]"),
    "the axis flip (protocol.flip_camera_axes / CAMERA_AXIS_FLIP)": re.compile(
        r"\bdiag \( (?:[\w.]+ (?:\. \w+ )*\( )?\[ 1(?:\.0*)? , - 1|1 : 3 \] (?:\*= - 1|= -)"),
    "the inference azimuths (protocol.INFERENCE_AZIMUTHS)": re.compile(r"\b90(?:\.0*)? , 180(?:\.0*)? , 270\b"),
    "the ring-A probability 2/3 (protocol.RING_A_PROBABILITY)": re.compile(r"(?:^| )2(?:\.0*)? / 3(?:\.0*)?(?: |$)"),
}


def logical_lines(text: str):
    """(first line number, code tokens joined by spaces) per logical line; comments and prose strings left out."""
    tokens, start = [], None
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if tokens:
                yield start, " ".join(tokens)
            tokens, start = [], None
            continue
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT) or tok.type == _FSTRING_MIDDLE:
            continue
        if tok.type == tokenize.STRING and not _KEY.match(tok.string):
            tok = tok._replace(string='""')
        start = tok.start[0] if start is None else start
        tokens.append(tok.string)


def protocol_literals(text: str) -> list[str]:
    return [f"{n}: {what}: {code}" for n, code in logical_lines(text) for what, rx in FORBIDDEN.items() if rx.search(code)]


# Literals that look like the protocol's but are not about views: (file, the logical line's code, why).
ALLOWED = {
    ("chibisplat/render/formats.py", 'if data [ : 4 ] == b"glTF" :'): "the 4-byte glTF magic",
}


def test_literal_patterns_match_what_they_must_forbid():
    bad = [
        "NUM_VIEWS = 4", "NUM_INPUT_VIEWS: int = 4", "distance: float = 1.4", "scale = 1.4 / r",
        "config = ViewConfig(num_views=8, num_input_views=4, resolution=r)", "num_views: int = 8",
        'unet(x, t, e, cross_attention_kwargs={"num_views": 4})', "g = f(c2w[:4], intr[:4])", "x = c2w[4:]",
        "cams = (data.C2W[i, :4], data.fxfycxcy[i, :4])", "gt = data.target_rgba[i, :4, :3]", "return c2w @ np.diag([1.0, -1.0, -1.0, 1.0])",
        "F = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))", "out[..., :3, 1:3] = -out[..., :3, 1:3]",
        "c2w[:, :3, 1:3] *= -1", "AZIMUTHS = (0.0, 90.0, 180.0, 270.0)", "EVEN_VIEW_SETS = tuple(x)", "ring_a_prob: float = 2.0 / 3.0",
        "ring = (\n    1.4,\n)",
    ]
    ok = [
        "a = rgba[:, 3:4]", "x = out[3:4].clamp(0, 1)", "c2w.reshape(-1, 4, 4)", "r = 1.45", "y = 11.4",
        '"""Cameras at distance 1.4 and [:4] views."""', "# distance 1.4", 'log(f"x 4 views at 1.4")',
        "views = NUM_INPUT_VIEWS + 1", "ViewConfig(num_views=1, num_input_views=1)", "num_views: int = 1",
        "c2w[:NUM_INPUT_VIEWS]", "x = c2w @ CAMERA_AXIS_FLIP", 'key = {"num_views": len(scores)}',
    ]
    assert [bool(protocol_literals(s)) for s in bad] == [True] * len(bad)
    assert [protocol_literals(s) for s in ok] == [[]] * len(ok)


def test_no_module_repeats_the_protocols_literals():
    assert len(SCANNED) > 40
    found = {}
    for path in SCANNED:
        rel = str(path.relative_to(REPO))
        hits = [h for h in protocol_literals(path.read_text())
                if (rel, h.split(": ", 2)[2]) not in ALLOWED]
        if hits:
            found[rel] = hits
    assert found == {}, "import these from chibisplat.protocol (one home for DiffSplat's facts)"


def _is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_uses(text: str, package: str) -> list[str]:
    """``from chibisplat.x import _name`` and ``module._name`` on an imported chibisplat module, in the source ``text``
    of a module of ``package``."""
    tree = ast.parse(text)
    modules, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("chibisplat"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    out.append(f"{node.lineno}: from {base} import {alias.name}")
                elif _is_module(f"{base}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("chibisplat"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            out.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return sorted(out, key=lambda u: int(u.split(":")[0]))


def test_private_use_pattern_matches_what_it_must_forbid():
    text = ("from chibisplat.training.latents import _rows, load_latent_set\nfrom chibisplat.dataset import loader\n"
            "from ..dataset.loader import _Views\nimport chibisplat.dataset.schema as schema\n"
            "x = loader._Views(1)\ny = schema._private\nz = loader.object_views\nw = x._internal\n")
    found = private_uses(text, "chibisplat.training")
    assert found == ["1: from chibisplat.training.latents import _rows", "3: from chibisplat.dataset.loader import _Views",
                     "5: loader._Views", "6: schema._private"]


def test_no_module_uses_another_modules_private_names():
    found = {}
    for path in SCANNED:
        rel = path.relative_to(REPO)
        found[str(rel)] = private_uses(path.read_text(), ".".join(rel.parts[:-1]))
    assert {k: v for k, v in found.items() if v} == {}, (
        "make the name public in its module (e.g. chibisplat.dataset.rows.packed_rows), don't reach into privates")


def test_the_protocol_imports_numpy_only():
    """The Blender render worker reaches the protocol through chibisplat.cameras: no torch, no project imports."""
    tree = ast.parse(PROTOCOL.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "numpy"}


def test_the_lora_adapter_is_configured_in_one_place():
    """``train.lora_config`` builds the adapter for training, parameter counts, checkpoints and the benchmarks."""
    home = REPO / "chibisplat" / "training" / "train.py"
    found = {str(p.relative_to(REPO)): [n for n, code in logical_lines(p.read_text()) if re.search(r"\bLoraConfig \(", code)]
             for p in SCANNED}
    assert {k: v for k, v in found.items() if v} == {str(home.relative_to(REPO)): found[str(home.relative_to(REPO))]}
    assert len(found[str(home.relative_to(REPO))]) == 1

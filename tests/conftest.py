"""Shared fixtures. Blender runs only in subprocesses (the render stage's workers), never in pytest itself."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"
sys.path.insert(0, str(Path(__file__).parent))  # tests/asset_factory.py, tests/synthetic_renders.py, ...

from project_config import project_params  # noqa: E402  (needs the path above)

# The bundled sample used for Blender-backed fixtures (the product's own character, not a shared asset).
FIXTURE_SAMPLE = "witch_girl"


def in_ci() -> bool:
    """CI sets CI=true (GitHub Actions, GitLab, .ci/run): there a missing prerequisite is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Outside CI, skip (a developer machine may lack ../shared/assets or sshd); under CI=true, fail, so a green CI
    run never hides a test that did not run."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def default_render_params() -> dict:
    """params.yaml's render section at the tests' baseline (tests/project_config.py)."""
    return project_params()["render"]


def render_params(tmp: Path, **overrides) -> dict:
    """Render params for a test folder: assets in tmp/assets, outputs in tmp/renders (small and fast)."""
    params = default_render_params()
    params.update(
        assets_dir=str(tmp / "assets"),
        out_dir=str(tmp / "renders"),
        report=str(tmp / "reports" / "render.json"),
        resolution=64,
        samples=4,
        workers=2,
    )
    params.update(overrides)
    return params


def sample_asset(name: str = FIXTURE_SAMPLE) -> Path:
    matches = sorted((REPO / "data" / "assets").glob(f"{name}.*"))
    matches = [m for m in matches if m.suffix != ".txt"]
    if not matches:
        pytest.fail(f"bundled sample {name} not found in data/assets (run `make samples`)")
    return matches[0]


def shared_asset(name: str) -> Path:
    path = SHARED_ASSETS / name
    if not path.is_file():
        skip_or_fail(f"{path} is not available (../shared/assets is provided next to the repository)")
    return path


@pytest.fixture(scope="session")
def rendered_character_128(tmp_path_factory) -> Path:
    """One bundled sample character rendered by the real render stage at 128x128 (16 samples).
    Returns its folder ``<renders>/<uid>/`` (docs/dataset-contract.md §4)."""
    from chibisplat.render.stage import run_render_stage

    tmp = tmp_path_factory.mktemp("rendered128")
    (tmp / "assets").mkdir()
    asset = sample_asset()
    shutil.copy(asset, tmp / "assets" / asset.name)
    report = run_render_stage(render_params(tmp, resolution=128, samples=16, workers=1), log=lambda *_: None)
    assert report["counts"]["rendered"] == 1, report
    return tmp / "renders" / asset.stem

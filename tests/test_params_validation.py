"""params.yaml is validated (type, range, choices, unknown keys) before any stage does any work."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from chibisplat.config_schema import SCHEMA, ConfigError, validate_params
from chibisplat.params import load_params

REPO = Path(__file__).resolve().parents[1]


def _yaml():
    y = YAML(typ="safe", pure=True)
    y.default_flow_style = False
    return y


def repo_params() -> dict:
    """params.yaml at the tests' baseline (tests/project_config.py: a used checkout's experiments undone)."""
    from project_config import project_params

    return project_params()


def write_params(path: Path, params: dict) -> Path:
    with open(path, "w") as f:
        _yaml().dump(params, f)
    return path


def snapshot(root: Path) -> dict:
    """Every file and folder below ``root``: bytes and mtime, so "untouched" means untouched."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[p.relative_to(root).as_posix()] = (p.is_dir(), None if p.is_dir() else p.read_bytes(), st.st_mtime_ns)
    return out


@pytest.fixture
def render_workspace(tmp_path):
    """A params file whose render section points at tmp folders that already hold a render and a report."""
    params = repo_params()
    for key, sub in (("assets_dir", "assets"), ("out_dir", "renders"), ("report", "reports/render.json")):
        params["render"][key] = str(tmp_path / sub)
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "hero.glb").write_bytes(b"glTF not really")
    (tmp_path / "renders" / "hero").mkdir(parents=True)
    (tmp_path / "renders" / "hero" / "meta.json").write_text('{"uid": "hero"}')
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "render.json").write_text("{}\n")
    return tmp_path, params


def run_render_main(tmp_path: Path, params: dict, capsys) -> tuple[int, str]:
    from stages.render import main

    path = write_params(tmp_path / "params.yaml", params)
    before = snapshot(tmp_path)
    rc = main(["--params", str(path)])
    err = capsys.readouterr().err
    assert snapshot(tmp_path) == before, "an invalid params file touched the outputs"
    return rc, err


def test_negative_resolution_stops_render_before_any_file_is_touched(render_workspace, capsys):
    tmp_path, params = render_workspace
    params["render"]["resolution"] = -5
    rc, err = run_render_main(tmp_path, params, capsys)
    assert rc == 1
    assert "render.resolution" in err and "-5" in err and "out of range" in err, err
    assert "Traceback" not in err


def test_bad_pose_names_the_allowed_values(render_workspace, capsys):
    tmp_path, params = render_workspace
    params["render"]["pose"] = "frame:one"
    rc, err = run_render_main(tmp_path, params, capsys)
    assert rc == 1
    assert "render.pose" in err and "'rest'" in err and "frame:<n>" in err, err


def test_unknown_model_source_is_one_clear_line(tmp_path, capsys):
    # issue 10 item 9: `models.source: foo` printed a traceback before the message.
    from stages.embed import main

    params = repo_params()
    params["models"]["source"] = "foo"
    rc = main(["--params", str(write_params(tmp_path / "params.yaml", params))])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == (f"embed: error: {tmp_path / 'params.yaml'}: models.source = 'foo' is not allowed; "
                           "allowed: one of 'tiny', 'pretrained'"), err


def test_unknown_key_suggests_the_nearest(tmp_path, capsys):
    from stages.pack import main

    params = repo_params()
    params["pack"]["num_shard"] = params["pack"].pop("num_shards")
    params["pack"]["out_dir"] = str(tmp_path / "packed")
    rc = main(["--params", str(write_params(tmp_path / "params.yaml", params))])
    err = capsys.readouterr().err
    assert rc == 1
    assert "pack.num_shard is not a known key; did you mean pack.num_shards?" in err, err
    assert not (tmp_path / "packed").exists()
    params = repo_params()
    params["models"]["sd15"]["revison"] = params["models"]["sd15"].pop("revision")
    with pytest.raises(ConfigError, match=r"models\.sd15\.revison is not a known key; did you mean models\.sd15\.revision\?"):
        validate_params(params)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("pack", "val_fraction", 1.0, "pack.val_fraction = 1.0 is out of range; allowed: a number >= 0 and < 1"),
        ("pack", "num_shards", 0, "pack.num_shards = 0 is out of range; allowed: an integer >= 1 and <= 100000"),
        ("pack", "num_shards", 2.5, "pack.num_shards = 2.5 is not an integer"),
        ("pack", "default_caption", "a {nmae}", "unknown placeholder(s) ['nmae']"),
        ("models", "image_conditioned", "yes", "models.image_conditioned = 'yes' is not true or false"),
        ("embed", "device", "gpu", "embed.device = 'gpu' is not allowed; allowed: auto, cpu, cuda or cuda:<index>"),
        ("train", "mode", "lroa", "train.mode = 'lroa' is not allowed (did you mean 'lora'?)"),
        ("train", "resume", True, "train.resume = True is not text; allowed: one of 'auto', 'never'"),
        ("latents", "resolution", 100, "latents.resolution = 100 is not a multiple of 8"),
        ("evaluate", "view_sets", [0, 9], "evaluate.view_sets = [0, 9] has [9] outside 0..8"),
        ("evaluate", "view_sets", [0, 0], "evaluate.view_sets = [0, 0] repeats an element"),
        ("generate", "sampler", "euler", "generate.sampler = 'euler' is not allowed; allowed: one of 'sde-dpmsolver++'"),
    ],
)
def test_bad_values_name_key_and_allowed_values(section, key, value, expected):
    params = repo_params()
    params[section][key] = value
    with pytest.raises(ConfigError) as e:
        validate_params(params, "params.yaml", full=True)
    assert expected in str(e.value), str(e.value)


def test_every_error_is_reported_at_once():
    params = repo_params()
    params["pack"]["rows_per_group"] = 0
    params["train"]["lr"] = "fast"
    params["generate"]["turntable_fps"] = -1
    with pytest.raises(ConfigError) as e:
        validate_params(params, "p.yaml", full=True)
    msg = str(e.value)
    assert msg.startswith("p.yaml: 3 invalid parameter(s)")
    assert all(k in msg for k in ("pack.rows_per_group", "train.lr", "generate.turntable_fps")), msg


def test_presets_are_checked_and_null_means_the_preset_value():
    params = repo_params()
    assert params["train"]["lr"] is None  # params.yaml declares it null: the preset's value
    validate_params(params, full=True)
    # A bad value in the preset of the source that is NOT selected is still an error (switching must not surprise).
    bad = copy.deepcopy(params)
    bad["train"]["presets"]["pretrained"]["mixed_precision"] = "fp8"
    with pytest.raises(ConfigError, match=r"train\.presets\.pretrained\.mixed_precision = 'fp8' is not allowed"):
        validate_params(bad, full=True)
    bad = copy.deepcopy(params)
    bad["train"]["presets"]["tiny"]["max_step"] = 3
    with pytest.raises(ConfigError, match=r"train\.presets\.tiny\.max_step is not a known key; did you mean "
                                          r"train\.presets\.tiny\.max_steps\?"):
        validate_params(bad, full=True)
    # null for a key the selected preset does not define: nothing would give it a value.
    bad = copy.deepcopy(params)
    del bad["train"]["presets"]["tiny"]["lr"]
    with pytest.raises(ConfigError, match=r"train\.lr = None is not set; allowed: a number > 0 and <= 1"):
        validate_params(bad, full=True)
    # An explicit value wins over the preset and is checked like any value.
    bad = copy.deepcopy(params)
    bad["train"]["lr"] = 0
    with pytest.raises(ConfigError, match=r"train\.lr = 0 is out of range"):
        validate_params(bad, full=True)


def test_unknown_section_suggests_the_nearest():
    params = repo_params()
    params["trian"] = {"lr": 1.0}
    with pytest.raises(ConfigError, match="trian: is not a known section; did you mean train?"):
        validate_params(params)


def test_the_repository_params_validate():
    validate_params(load_params(REPO / "params.yaml", validate=False), REPO / "params.yaml", full=True)


def test_yaml_syntax_error_names_the_line(tmp_path):
    (tmp_path / "params.yaml").write_text("render:\n  resolution: 64\n  samples: [4\n")
    with pytest.raises(ConfigError, match=r"params.yaml, line \d+: YAML syntax error"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("name", [n for n, s in SCHEMA.items() if s.fields_of is not None])
def test_schema_lists_every_dataclass_field(name):
    """A key a stage's parameter dataclass reads has its own entry (type/range/choices), and no entry is stale."""
    cls = SCHEMA[name].fields_of.get(full=True)
    fields = {f.name for f in dataclasses.fields(cls) if "derived" not in f.metadata}  # derived: chibisplat/config.py
    assert sorted(fields - set(SCHEMA[name].keys)) == [], f"add these {name} keys to chibisplat/config_schema.py"
    assert sorted(set(SCHEMA[name].keys) - fields) == [], f"{name} keys no dataclass field reads"


def test_the_dvc_exp_run_rewrite_still_validates(tmp_path):
    # `dvc exp run -S train.lr=3e-4` rewrites params.yaml with ruamel: the value arrives as a float.
    params = repo_params()
    params["train"]["lr"] = 3e-4
    validate_params(load_params(write_params(tmp_path / "params.yaml", params)), full=True)
    assert os.path.getsize(tmp_path / "params.yaml") > 0


def test_stage_sections_are_the_dvc_params_of_each_stage():
    """Each stage validates exactly the sections DVC tracks for it (dvc.yaml `params:`)."""
    from chibisplat.config_schema import STAGE_SECTIONS

    stages = _yaml().load((REPO / "dvc.yaml").read_text())["stages"]
    from_dvc = {name: sorted({str(p).split(".")[0] for p in stage.get("params", [])}) for name, stage in stages.items()}
    assert from_dvc == {name: sorted(s) for name, s in STAGE_SECTIONS.items()}


def test_a_stage_checks_only_its_own_sections(tmp_path):
    params = repo_params()
    params["train"]["lr"] = -1.0
    path = write_params(tmp_path / "params.yaml", params)
    load_params(path, sections=("pack",))  # pack does not read train: its run is not blocked
    with pytest.raises(ConfigError, match=r"train\.lr = -1.0 is out of range"):
        load_params(path, sections=("train", "models"))
    params["trian"] = {}
    with pytest.raises(ConfigError, match="trian: is not a known section"):
        load_params(write_params(tmp_path / "params.yaml", params), sections=("pack",))


def test_a_dataclass_key_without_schema_entry_is_type_checked_from_the_dataclass(monkeypatch):
    """Tolerance while a new key's entry is missing: the parameter dataclass's annotation decides its type."""
    monkeypatch.delitem(SCHEMA["train"].keys, "log_every")
    monkeypatch.delitem(SCHEMA["train"].keys, "lpips_weights")
    params = repo_params()
    params["train"]["log_every"] = 5
    params["train"]["lpips_weights"] = None  # `str | None`: null allowed
    validate_params(params, full=True)
    params["train"]["log_every"] = "often"
    with pytest.raises(ConfigError, match=r"train\.log_every = 'often' is not an integer"):
        validate_params(params, full=True)
    params["train"]["log_evry"] = 5  # not a dataclass field either: unknown
    with pytest.raises(ConfigError, match=r"train\.log_evry is not a known key"):
        validate_params(params, full=True)


def test_choice_lists_match_the_code_that_consumes_them():
    from diffusers.optimization import SchedulerType

    from chibisplat.config_schema import LR_SCHEDULERS, MODEL_SOURCES
    from chibisplat.config import model_source

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert [model_source({"models": {"source": s}}) for s in MODEL_SOURCES] == list(MODEL_SOURCES)

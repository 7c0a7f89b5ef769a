"""The typed config layer (chibisplat/config.py): presets, null-means-preset, explicit keys, unknown keys, paths,
derived values, and the one-home-for-defaults rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from project_config import REPO, parse_params, project_params
from ruamel.yaml import YAML

from chibisplat.config import (
    DERIVED, SECTIONS, Config, EvaluateParams, ModelsParams, PackParams, SnapshotParams, build, config_from_params,
    load_config, plain,
)
from chibisplat.config_schema import PRESETS_KEY, SCHEMA, ConfigError


def write(path: Path, params: dict) -> Path:
    with open(path, "w") as f:
        YAML(typ="safe", pure=True).dump(params, f)
    return path


@pytest.fixture
def params() -> dict:
    """The baseline params with hand-picked preset values the assertions below know."""
    p = project_params()
    p["train"][PRESETS_KEY]["tiny"]["lr"] = 0.002
    p["train"][PRESETS_KEY]["pretrained"]["lr"] = 0.0003
    p["latents"][PRESETS_KEY]["tiny"]["resolution"] = 64
    p["latents"][PRESETS_KEY]["pretrained"]["resolution"] = 256
    p["pack"].update(out_dir="somewhere/packed", num_shards=3)
    return p


def test_presets_follow_models_source_and_null_means_the_preset(params, tmp_path):
    assert params["train"]["lr"] is None  # committed as null: the preset's value
    cfg = load_config(write(tmp_path / "params.yaml", params))
    assert cfg.train.lr == 0.002 and cfg.latents.resolution == 64
    params["models"]["source"] = "pretrained"
    cfg = load_config(write(tmp_path / "params.yaml", params))
    assert cfg.train.lr == 0.0003 and cfg.latents.resolution == 256
    assert cfg.models.source == "pretrained" and not cfg.models.tiny


def test_an_explicit_key_wins_over_either_preset(params, tmp_path):
    params["train"]["lr"] = 0.05
    for source in ("tiny", "pretrained"):
        params["models"]["source"] = source
        assert load_config(write(tmp_path / "params.yaml", params)).train.lr == 0.05, source


def test_null_for_a_key_no_preset_defines_stays_null(params, tmp_path):
    params["train"]["lpips_weights"] = None
    assert "lpips_weights" not in params["train"][PRESETS_KEY]["tiny"]
    assert load_config(write(tmp_path / "params.yaml", params)).train.lpips_weights is None


def test_unknown_key_names_the_nearest_valid_one(params, tmp_path):
    params["train"]["lr_sheduler"] = "constant"
    with pytest.raises(ConfigError, match=r"train\.lr_sheduler is not a known key; did you mean train\.lr_scheduler\?"):
        load_config(write(tmp_path / "params.yaml", params))
    # The builder says the same when it is handed a mapping without the schema in front of it.
    values = plain(load_config(write(tmp_path / "ok.yaml", project_params()), sections=("pack",)).pack) | {"num_shard": 2}
    with pytest.raises(ConfigError, match=r"pack\.num_shard is not a known key; did you mean pack\.num_shards\?"):
        build(PackParams, values, "pack")


def test_a_key_that_moved_says_where(params):
    params["train"]["finetune_gsvae"] = True
    with pytest.raises(KeyError, match="finetune.gsrecon / finetune.gsvae"):
        config_from_params(params, ("train", "models"))


def test_a_missing_key_is_named(params):
    del params["pack"]["num_shards"]
    with pytest.raises(ConfigError, match=r"pack\.num_shards is not set; add it to params\.yaml"):
        config_from_params(params, ("pack",), validate=False)


def test_paths_tuples_and_nested_sections_are_typed(params, tmp_path):
    params["models"]["sd15"]["path"] = "local/sd15"
    params["models"]["finetuned"] = "models/ft"
    cfg = load_config(write(tmp_path / "params.yaml", params))
    assert cfg.pack.out_dir == Path("somewhere/packed") and isinstance(cfg.pack.out_dir, Path)
    assert cfg.pack.num_shards == 3 and cfg.pack.default_caption is None
    assert cfg.models.sd15 == SnapshotParams(repo=params["models"]["sd15"]["repo"],
                                             revision=params["models"]["sd15"]["revision"], path=Path("local/sd15"))
    assert cfg.models.sd15.label == "local/sd15"
    assert isinstance(cfg.evaluate.clip, SnapshotParams) and cfg.evaluate.clip.path is None
    assert cfg.evaluate.view_sets == tuple(params["evaluate"]["view_sets"]) and isinstance(cfg.evaluate.view_sets, tuple)
    assert cfg.train.lpips_weights is None and cfg.models.finetuned == Path("models/ft")
    # A dataclass built by hand holds Paths too, whatever it was given.
    direct = dataclasses.replace(cfg.pack, renders_dir="a/b")
    assert direct.renders_dir == Path("a/b")


def test_derived_values_are_computed_once_from_their_source(params, tmp_path):
    cfg = load_config(write(tmp_path / "params.yaml", params))
    assert cfg.evaluate.resolution == 64 and cfg.generate.resolution == 64  # latents.resolution (tiny preset)
    params["models"]["source"] = "pretrained"
    cfg = load_config(write(tmp_path / "params.yaml", params))
    assert cfg.evaluate.resolution == 256 and cfg.generate.resolution == 256
    params["evaluate"]["resolution"] = 32
    with pytest.raises(ConfigError, match=r"evaluate\.resolution is derived from latents\.resolution"):
        config_from_params(params, ("evaluate",), validate=False)


def test_sections_not_asked_for_are_none(params, tmp_path):
    cfg = load_config(write(tmp_path / "params.yaml", params), sections=("pack",))
    assert cfg.pack is not None and cfg.train is None and cfg.models is None
    # ... and are not checked either: a stage never fails on a section it does not read.
    params["train"]["lr"] = -1.0
    assert load_config(write(tmp_path / "params.yaml", params), sections=("pack",)).pack.num_shards == 3
    with pytest.raises(ConfigError, match=r"train\.lr = -1\.0 is out of range"):
        load_config(tmp_path / "params.yaml", sections=("train", "models"))


def test_the_source_switch_is_decided_in_one_place(params):
    models = config_from_params(params, ("models",)).models
    assert models.tiny and not dataclasses.replace(models, source="pretrained").tiny
    with pytest.raises(ConfigError, match="models.source = 'huge' is not allowed"):
        dataclasses.replace(models, source="huge").tiny


def test_plain_gives_back_the_values_params_yaml_holds(params):
    """Fingerprints and manifests hash ``plain(...)``: they keep hashing what the raw sections held."""
    cfg = config_from_params(params)
    assert plain(cfg.models) == params["models"]
    assert plain(cfg.pack) == params["pack"]
    assert plain(cfg.render) == {**params["render"], "scratch_dir": None}


def test_every_section_of_params_yaml_is_typed():
    raw = parse_params(REPO / "params.yaml")
    cfg = config_from_params(project_params())
    assert isinstance(cfg, Config)
    assert sorted(n for n in raw if n in SECTIONS) == sorted(SECTIONS)
    assert all(getattr(cfg, n) is not None for n in SECTIONS)


def _set_keys(section: dict) -> set[str]:
    """Keys a params.yaml section sets: explicitly (null included), or in every preset."""
    presets = [p for p in (section.get(PRESETS_KEY) or {}).values()]
    in_every = set.intersection(*(set(p) for p in presets)) if presets else set()
    return (set(section) - {PRESETS_KEY}) | in_every


def _nested(cls) -> dict[str, type]:
    hints = __import__("typing").get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = [a for a in (*__import__("typing").get_args(hints[f.name]), hints[f.name]) if dataclasses.is_dataclass(a)]
        if args:
            out[f.name] = args[0]
    return out


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_defaults_live_in_one_place(name):
    """A key params.yaml sets has no default in its dataclass (the file is its one home); a key it does not set
    keeps its field default."""
    section = parse_params(REPO / "params.yaml")[name]

    def check(cls, values: dict, where: str):
        set_keys = _set_keys(values)
        for f in dataclasses.fields(cls):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if DERIVED in f.metadata:
                continue
            if f.name in set_keys:
                assert not has_default, f"{where}.{f.name} is set in params.yaml: remove its default from {cls.__name__}"
            else:
                assert has_default, f"{where}.{f.name} is not in params.yaml: give {cls.__name__}.{f.name} a default"
        for key, sub in _nested(cls).items():
            if isinstance(values.get(key), dict):
                check(sub, values[key], f"{where}.{key}")

    check(SECTIONS[name], section, name)


def _schema_keys(name: str) -> set[str]:
    if SCHEMA[name].validator is not None:  # render: checked by chibisplat/render/options.py
        return set(SCHEMA[name].validator.get(full=True).__globals__["KEYS"])
    return set(SCHEMA[name].keys)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_field_is_a_schema_key_and_back(name):
    cls = SECTIONS[name]
    fields = {f.name for f in dataclasses.fields(cls) if DERIVED not in f.metadata}
    assert sorted(fields - _schema_keys(name)) == [], f"add these {name} keys to chibisplat/config_schema.py"
    assert sorted(_schema_keys(name) - fields) == [], f"{name} keys no field of {cls.__name__} reads"
    for key, sub in _nested(cls).items():
        spec = SCHEMA[name].keys[key]
        assert set(spec.keys) == {f.name for f in dataclasses.fields(sub)}, f"{name}.{key}"


def test_derived_fields_name_an_existing_key():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if DERIVED in f.metadata:
                src, key = f.metadata[DERIVED].split(".")
                assert key in {g.name for g in dataclasses.fields(SECTIONS[src])}, (name, f.name)
    assert dataclasses.fields(EvaluateParams)[-1].metadata[DERIVED] == "latents.resolution"
    assert isinstance(ModelsParams.tiny, property)


def test_one_sd15_resolver_and_one_error_class(tmp_path):
    """The text encoder and the model stack find SD1.5 through the same resolver and fail with the same class."""
    import chibisplat.models.sources as sources
    from chibisplat.dataset import text_encoder
    from chibisplat.models import hub

    assert text_encoder.TextEncoderMissing is hub.ModelSourceError is sources.ModelSourceError
    assert text_encoder.sd15_folder is hub.sd15_folder is sources.sd15_folder
    models = config_from_params(project_params(), ("models",)).models
    nowhere = dataclasses.replace(models, sd15=dataclasses.replace(models.sd15, path=tmp_path / "nowhere"))
    with pytest.raises(hub.ModelSourceError, match=r"(?s)models\.sd15\.path = .*nowhere does not exist .*hf download"):
        hub.sd15_folder(nowhere, ["tokenizer/"])
    (tmp_path / "sd15" / "tokenizer").mkdir(parents=True)
    found = dataclasses.replace(models, sd15=dataclasses.replace(models.sd15, path=tmp_path / "sd15"))
    assert hub.sd15_folder(found, ["tokenizer/"]) == tmp_path / "sd15"
    with pytest.raises(hub.ModelSourceError, match="lacks text_encoder/"):
        hub.sd15_folder(found, ["tokenizer/", "text_encoder/"])
    unpinned = dataclasses.replace(models, sd15=dataclasses.replace(models.sd15, revision=None))
    with pytest.raises(hub.ModelSourceError, match=r"neither models\.sd15\.path nor both .*pinned commit"):
        hub.sd15_folder(unpinned, ["tokenizer/"])

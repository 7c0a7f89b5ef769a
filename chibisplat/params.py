"""Reading ``params.yaml`` (the single source of the pipeline's parameters).

Every reader goes through :func:`load_params`, which validates the file (a stage: the sections it reads) against
``chibisplat/config_schema.py`` before anything else happens: a bad value stops a stage with one message naming
each bad key and what is allowed, before any output is touched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from chibisplat.config_schema import STAGE_SECTIONS, ConfigError, validate_params


def load_params(path: str | Path = "params.yaml", validate: bool = True, sections=None) -> dict:
    """The parsed params file, validated (:class:`~chibisplat.config_schema.ConfigError` if anything is invalid).

    ``sections``: validate only these (a stage's ``STAGE_SECTIONS``); None: every section.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stages from the repository root (where params.yaml is)")
    # YAML 1.2 (ruamel, as DVC writes it with `dvc exp run -S`): PyYAML's YAML 1.1 would read an unquoted
    # `no` as False.
    try:
        with open(path) as f:
            params = YAML(typ="safe", pure=True).load(f)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: YAML syntax error: {e.problem or e.context}") from None
    params = {} if params is None else params
    if validate:
        validate_params(params, path, sections=sections)
    return params


def section(name: str, path: str | Path = "params.yaml") -> dict:
    params = load_params(path, sections=(name,))
    if name not in params:
        raise KeyError(f"{path} has no '{name}:' section")
    return params[name]


def params_path(argv: list[str] | None = None, doc: str | None = None) -> Path:
    """``--params FILE`` from the command line (default params.yaml)."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv).params


def run_stage(name: str, doc: str | None, body: Callable[[dict], object], errors: tuple[type[BaseException], ...],
              argv: list[str] | None = None) -> int:
    """The ``main`` of a stage module: ``--params FILE`` (default params.yaml), validated, then ``body(params)``.

    An expected error (``errors``, plus a missing or invalid params file) prints ``<name>: error: <message>`` and
    returns 1, so DVC shows one clear message instead of a traceback; anything else propagates.
    """
    path = params_path(argv, doc)
    try:
        body(load_params(path, sections=STAGE_SECTIONS.get(name)))
    except (FileNotFoundError, ConfigError, *errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return 0

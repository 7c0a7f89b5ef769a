"""Reading ``params.yaml`` (the single source of the pipeline's parameters) in a stage.

A stage's ``main`` is :func:`run_stage`: ``--params FILE``, then :func:`chibisplat.config.load_config` for the
sections the stage reads (:data:`~chibisplat.config_schema.STAGE_SECTIONS`, its ``params:`` in dvc.yaml): parsed,
validated against ``chibisplat/config_schema.py`` (a bad value stops the stage with one message naming each bad key
and what is allowed, before any output is touched), presets applied, typed. The stage's body gets that
:class:`~chibisplat.config.Config`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from chibisplat.config import Config, load_config, read_params
from chibisplat.config_schema import STAGE_SECTIONS, ConfigError, validate_params


def load_params(path: str | Path = "params.yaml", validate: bool = True, sections=None) -> dict:
    """The parsed params file as plain mappings, validated (:class:`~chibisplat.config_schema.ConfigError` if
    anything is invalid). ``sections``: validate only these; None: every section. Stages use :func:`run_stage`
    (typed); this is for tools that need the file as written."""
    params = read_params(path)
    if validate:
        validate_params(params, path, sections=sections)
    return params


def params_path(argv: list[str] | None = None, doc: str | None = None) -> Path:
    """``--params FILE`` from the command line (default params.yaml)."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    return parser.parse_args(argv).params


def run_stage(name: str, doc: str | None, body: Callable[[Config], object], errors: tuple[type[BaseException], ...],
              argv: list[str] | None = None) -> int:
    """The ``main`` of a stage module: ``--params FILE`` (default params.yaml), loaded, then ``body(config)``.

    An expected error (``errors``, plus a missing or invalid params file) prints ``<name>: error: <message>`` and
    returns 1, so DVC shows one clear message instead of a traceback; anything else propagates.
    """
    path = params_path(argv, doc)
    try:
        body(load_config(path, sections=STAGE_SECTIONS[name]))
    except (FileNotFoundError, ConfigError, *errors) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return 0

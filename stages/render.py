"""DVC stage ``render``: assets -> 40 calibrated views + camera JSON per character.

    python -m stages.render                    # reads params.yaml `render:`
    python -m stages.render --params FILE
"""

import sys

from chibisplat.config import load_config
from chibisplat.config_schema import STAGE_SECTIONS, ConfigError
from chibisplat.executors import executor_config
from chibisplat.params import params_path
from chibisplat.render.options import RenderParamsError
from chibisplat.render.stage import run_render_stage


def summary(report: dict, allow_failures: bool) -> tuple[int, str | None]:
    """Exit code and the closing message (None when there is nothing to say), true to the counts."""
    counts = report["counts"]
    failed = counts["failed"]
    if not failed:
        return 0, None
    ok = counts["rendered"] + counts["cached"]
    if ok == 0:
        state = "no character was rendered"
    else:
        state = f"the other {ok} are rendered ({counts['rendered']} now, {counts['cached']} up to date)"
    where = report.get("report_path") or "the render report"
    if allow_failures:
        return 0, f"render: {failed} character(s) failed (see {where}); {state}. render.allow_failures is true: " \
                  "continuing with a partial dataset."
    return 1, f"render: {failed} character(s) failed (see {where}); {state}. Fix them, or set " \
              "render.allow_failures: true to accept a partial dataset."


def main(argv: list[str] | None = None) -> int:
    try:
        path = params_path(argv, __doc__)
        cfg = load_config(path, sections=STAGE_SECTIONS["render"])  # validated first (chibisplat/config_schema.py)
        params = cfg.render
        # cluster.render: where the characters render (never what; not tracked by DVC, see chibisplat/executors)
        report = run_render_stage(params, executor=executor_config(cfg.raw, "render"))
    except (ConfigError, RenderParamsError, FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"render: error: {e}", file=sys.stderr)
        return 1
    code, message = summary(report, params.allow_failures)
    if message:
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end DVC tests (issue #6): granular re-runs, remote storage, pinned versions on another machine.

Everything runs on real DVC against real remotes, in a throwaway copy of this repository:

    <tmp>/repo                      the files git tracks here + untracked-but-not-ignored ones, `git init`-ed,
                                    small render settings (32 px, 1 sample) written into its params.yaml
    <tmp>/chibisplat-dvc-remote     the committed default remote (.dvc/config: url ../../chibisplat-dvc-remote,
                                    which DVC resolves from .dvc/ to a folder next to the repository)
    <tmp>/clone, <tmp>/consumer ... "another machine": git clones / other projects that only see git + the remote

The pipeline is built once per module (fixture ``built``): `dvc repro` from scratch, `git commit`, `dvc push`,
`git tag data-v1`. Tests after that change one thing at a time and commit; they run in file order.
The SSH test starts its own `sshd` on 127.0.0.1 and stops it. Where sshd or dvc-ssh is missing it is skipped on a
developer machine and FAILS under CI=true (.ci/run installs sshd), so CI never passes without having run it.

The copy starts from the tests' baseline, not from this checkout's state: params.yaml at tests/project_config.py's
baseline and .dvc/config as committed (an experiment or `dvc remote add -d ...` here changes neither).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import skip_or_fail
from project_config import baseline, committed_text, parse_params

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")
UPSTREAM = ("render", "pack", "embed", "finetune", "latents")  # stages a train parameter must never re-run

GIT_ENV = {
    "GIT_AUTHOR_NAME": "chibisplat test",
    "GIT_AUTHOR_EMAIL": "test@chibisplat.invalid",
    "GIT_COMMITTER_NAME": "chibisplat test",
    "GIT_COMMITTER_EMAIL": "test@chibisplat.invalid",
}


def _env(**extra) -> dict:
    # Stage commands call `python`: the venv's bin first on PATH, as in `make repro`.
    env = {**os.environ, **GIT_ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(DVC_NO_ANALYTICS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 300, check: bool = True, **env) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} (in {cwd}) failed with {out.returncode}:\n"
                             f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def dvc(*args: str, cwd: Path, timeout: float = 300, check: bool = True, **env) -> subprocess.CompletedProcess:
    return run([DVC, *args], cwd, timeout=timeout, check=check, **env)


def git(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run(["git", *args], cwd, timeout=120, check=check)


def commit(repo: Path, message: str) -> None:
    git("add", "-A", cwd=repo)
    git("commit", "-q", "--allow-empty", "-m", message, cwd=repo)


def stages_run(out: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out.stdout)


def pushed(out: subprocess.CompletedProcess) -> int:
    """`dvc push` says "N file(s) pushed" or "Everything is up to date."."""
    text = out.stdout + out.stderr
    m = re.search(r"(\d+) files? pushed", text)
    if m:
        return int(m.group(1))
    assert "Everything is up to date" in text, text
    return 0


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parquet_hashes(packed: Path) -> dict[str, str]:
    return {p.relative_to(packed).as_posix(): sha256(p) for p in sorted(packed.rglob("*.parquet"))}


def pipeline_stages(repo: Path) -> list[str]:
    return list((yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {}))


def stage_outputs(repo: Path) -> list[str]:
    outs = []
    for stage in ((yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            for o in stage.get(key) or []:
                outs.append(next(iter(o)) if isinstance(o, dict) else o)
    return outs


def copy_worktree(src: Path, dst: Path) -> None:
    """The files git would commit here (tracked + untracked-but-not-ignored): works before the lead commits.
    Pipeline outputs are left out (a fresh repo has none), except small git-tracked ones such as render.json."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=src,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tracked = set(subprocess.run(["git", "ls-files", "-z"], cwd=src, capture_output=True,
                                 check=True).stdout.decode().split("\0"))
    outs = [o.rstrip("/") for o in stage_outputs(src)]
    for rel in filter(None, listed):
        s = src / rel
        under_out = any(rel == o or rel.startswith(o + "/") for o in outs)
        if s.is_file() and (rel in tracked or not under_out):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / rel)


# Small settings: 32 px / 1 sample renders; the training side (when present) a couple of steps on small latents.
# Explicit keys win over the `presets:` of models.source (chibisplat/config.py).
SMALL = {
    "latents": {"resolution": 64, "render_resolution": 32},
    "train": {"max_steps": 2, "checkpointing_steps": 2, "log_every": 1, "lr_warmup_steps": 0, "batch_size": 1},
    "evaluate": {"steps": 2, "render_resolution": 32},
    "generate": {"steps": 2, "render_resolution": 32, "turntable_frames": 2},
}


def shrink_params(params: dict) -> dict:
    params["render"].update(resolution=32, samples=1, workers=2)
    for section, values in SMALL.items():
        if isinstance(params.get(section), dict):
            params[section].update(values)
    return params


def data_targets(built) -> list[str]:
    """`dvc repro` targets for the data-side tests: up to latents (training is tested on its own)."""
    return ["latents"] if "latents" in built["stages"] else []


def render_report(repo: Path) -> dict:
    """What the last render run did (rendered / cached / removed): the untracked run record. The DVC-tracked
    data/reports/render.json holds only run-independent facts (issue 10, item 6)."""
    return json.loads((repo / "data" / ".cache" / "render" / "last_run.json").read_text())


def shard_state(repo: Path) -> dict[str, tuple[str, int]]:
    packed = repo / "data" / "packed"
    return {p.relative_to(packed).as_posix(): (sha256(p), p.stat().st_mtime_ns) for p in packed.rglob("*.parquet")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The pipeline reproduced from scratch in a throwaway repo, pushed to its default remote, tagged data-v1."""
    base = tmp_path_factory.mktemp("dvcpipe")
    repo = base / "repo"
    repo.mkdir()
    copy_worktree(REPO, repo)
    (repo / ".dvc" / "config").write_text(committed_text(".dvc/config"))  # the default remote as committed
    params = shrink_params(baseline(parse_params(repo / "params.yaml")))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("init", "-q", cwd=repo)
    commit(repo, "chibisplat (test copy)")

    t = time.perf_counter()
    first = dvc("repro", cwd=repo, timeout=900)
    from_scratch_s = time.perf_counter() - t
    commit(repo, "dvc repro")
    push = dvc("push", cwd=repo, timeout=600)
    git("tag", "data-v1", cwd=repo)
    state = {
        "base": base,
        "repo": repo,
        "remote": base / "chibisplat-dvc-remote",
        "first": first,
        "from_scratch_s": from_scratch_s,
        "first_push": pushed(push),
        "v1_parquet": parquet_hashes(repo / "data" / "packed"),
        "v1_embeddings": sha256(repo / "data/embeddings/prompt_embeds.parquet"),
        "stages": pipeline_stages(repo),
    }
    yield state
    dvc("queue", "stop", "--kill", cwd=repo, timeout=60, check=False)


def test_committed_default_remote_is_a_folder_next_to_the_repository(tmp_path):
    """Fast: the committed .dvc/config's default remote `local` resolves (from .dvc/) to <repo>/../chibisplat-dvc-remote.

    Read from the last commit into a repository of its own: this checkout's remotes (`dvc remote add -d ...`,
    .dvc/config.local) are its user's business."""
    repo = tmp_path / "checkout"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text(committed_text(".dvc/config"))
    git("init", "-q", cwd=repo)
    out = dvc("remote", "list", cwd=repo, timeout=60, COLUMNS="1000")  # one line per remote, however long the path
    remotes = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    assert "local" in remotes, out.stdout
    url, *flags = remotes["local"]
    assert Path(url) == tmp_path / "chibisplat-dvc-remote", url
    assert "(default)" in flags, out.stdout


@pytest.mark.slow
def test_repro_from_scratch_then_noop_repro_is_fast(built):
    repo = built["repo"]
    assert stages_run(built["first"])[:3] == ["render", "pack", "embed"], built["first"].stdout[-2000:]
    assert set(stages_run(built["first"])) == set(built["stages"])
    assert render_report(repo)["counts"]["rendered"] == 7
    assert len(built["v1_parquet"]) == 6  # 5 train shards + 1 val shard for the 7 samples
    # The committed remote landed next to the repository and holds everything pushed.
    assert built["first_push"] > 7 * 120, built["first_push"]
    assert len(files_under(built["remote"])) == built["first_push"]

    t = time.perf_counter()
    again = dvc("repro", cwd=repo, timeout=120)
    noop_s = time.perf_counter() - t
    print(f"\ndvc repro from scratch: {built['from_scratch_s']:.1f} s; no-op dvc repro: {noop_s:.2f} s")
    assert stages_run(again) == [], again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    assert noop_s < 5.0, f"no-op dvc repro took {noop_s:.2f} s"
    assert dvc("status", "--json", cwd=repo).stdout.strip() in ("{}", "")


@pytest.mark.slow
def test_clone_checkout_tag_and_pull_gives_identical_parquet(built):
    """Another machine: git clone + `git checkout data-v1 && dvc pull` from the committed default remote."""
    base, repo = built["base"], built["repo"]
    clone = base / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=base)
    git("checkout", "-q", "data-v1", cwd=clone)
    listed = dvc("remote", "list", cwd=clone).stdout
    assert str(built["remote"]) in listed and "(default)" in listed, listed
    dvc("pull", cwd=clone, timeout=600)
    assert parquet_hashes(clone / "data" / "packed") == built["v1_parquet"]
    assert sha256(clone / "data/embeddings/prompt_embeds.parquet") == built["v1_embeddings"]
    assert dvc("status", "--json", cwd=clone).stdout.strip() in ("{}", "")

    # Hugging Face datasets straight from the pulled files, no project code.
    script = textwrap.dedent(
        f"""
        import datasets, sys
        ds = datasets.load_dataset("parquet", data_files={{"train": {str(clone / "data/packed/train/*.parquet")!r},
                                   "val": {str(clone / "data/packed/val/*.parquet")!r}}}, cache_dir={str(base / "hf")!r})
        assert ds["train"].num_rows + ds["val"].num_rows == 7, ds
        for row in list(ds["train"]) + list(ds["val"]):
            assert len(row["images"]) == 40 and len(row["normal_depth"]) == 40 and len(row["cameras"]) == 40
            assert row["images"][0].size == (32, 32), row["images"][0].size
        assert not any(m.startswith("chibisplat") for m in sys.modules)
        print("ok", ds["train"].num_rows, ds["val"].num_rows)
        """
    )
    out = run([sys.executable, "-c", script], base, timeout=300)
    assert out.stdout.startswith("ok 6 1"), out.stdout

    if "train" in built["stages"]:
        _assert_checkpoint_loads(clone)


def _assert_checkpoint_loads(repo: Path) -> None:
    """The pulled checkpoint loads with the project's loader (train's cached outputs, as dvc.lock lists them)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = [o["path"] for o in lock["stages"]["train"].get("outs", [])]
    unet = "models/train/unet"
    assert unet in outs and (repo / unet / "config.json").is_file(), (outs, f"{unet} missing after dvc pull")
    script = textwrap.dedent(
        f"""
        from chibisplat.training.inference import load_trained_unet  # the project's loader
        unet = load_trained_unet({str(repo / unet)!r})
        print("loaded", type(unet).__name__, sum(p.numel() for p in unet.parameters()))
        """
    )
    out = run([sys.executable, "-c", script], repo, timeout=300)
    assert out.stdout.startswith("loaded"), out.stdout


@pytest.mark.slow
def test_dvc_get_and_import_from_another_project(built):
    base, repo = built["base"], built["repo"]
    got = base / "got"
    dvc("get", str(repo), "data/packed", "--rev", "data-v1", "-o", str(got), cwd=base, timeout=300)
    assert parquet_hashes(got) == built["v1_parquet"]

    consumer = base / "consumer"
    consumer.mkdir()
    git("init", "-q", cwd=consumer)
    dvc("init", "-q", cwd=consumer)
    dvc("import", str(repo), "data/packed", "--rev", "data-v1", "-o", "chibi_packed", cwd=consumer, timeout=300)
    meta = yaml.safe_load((consumer / "chibi_packed.dvc").read_text())
    assert meta["frozen"] is True
    assert meta["deps"][0]["repo"]["rev"] == "data-v1"
    assert meta["deps"][0]["repo"]["rev_lock"] == git("rev-parse", "data-v1", cwd=repo).stdout.strip()
    assert parquet_hashes(consumer / "chibi_packed") == built["v1_parquet"]
    commit(consumer, "import chibisplat data-v1")
    assert dvc("status", "--json", cwd=consumer).stdout.strip() in ("{}", "")

    # HF datasets reading a pinned version through DVCFileSystem, no checkout at all. (datasets 5 passes
    # storage_options to fsspec's url_to_fs, so the repository goes in `repo`, not `url`.)
    script = textwrap.dedent(
        f"""
        import datasets
        ds = datasets.load_dataset("parquet", data_files={{"train": "dvc://data/packed/train/*.parquet"}}, split="train",
                                   storage_options={{"repo": {str(repo)!r}, "rev": "data-v1"}},
                                   cache_dir={str(base / "hf-dvc")!r})
        assert ds.num_rows == 6 and all(len(r["images"]) == 40 for r in ds), ds
        print("ok", ds.num_rows)
        """
    )
    # (not HF offline mode: datasets refuses any non-local fsspec URL then, dvc:// included)
    assert run([sys.executable, "-c", script], base, timeout=300, HF_DATASETS_OFFLINE="0").stdout.startswith("ok 6")


def _train_lr(repo: Path) -> float:
    """train.lr as the train stage sees it: the explicit key, else the preset of models.source."""
    params = parse_params(repo / "params.yaml")
    lr = params["train"]["lr"]
    if lr is None:  # null: the preset's value
        lr = params["train"]["presets"][params["models"]["source"]]["lr"]
    return float(lr)


@pytest.mark.slow
def test_changing_train_lr_reruns_only_train_and_later_stages(built):
    repo = built["repo"]
    lr = _train_lr(repo)
    params = parse_params(repo / "params.yaml")
    params["train"]["lr"] = lr * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(dvc("status", "--json", cwd=repo).stdout or "{}")
    assert set(status) == {"train"}, status
    out = dvc("repro", cwd=repo, timeout=600)
    ran = stages_run(out)
    assert "train" in ran, out.stdout
    assert not set(ran) & set(UPSTREAM), ran
    for stage in UPSTREAM:
        if stage in built["stages"]:
            assert f"Stage '{stage}' didn't change, skipping" in out.stdout, out.stdout
    commit(repo, "train.lr x2")


# ----------------------------------------------------------------------------------------------- experiments


def _walk_exps(node, found: dict) -> None:
    """{experiment name or rev: (params, metrics)} from `dvc exp show --json` (any nesting)."""
    if isinstance(node, list):
        for item in node:
            _walk_exps(item, found)
    elif isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and ("params" in data or "metrics" in data):
            name = node.get("name") or node.get("rev")
            found[name] = (data.get("params") or {}, data.get("metrics") or {})
        for v in node.values():
            if isinstance(v, (list, dict)):
                _walk_exps(v, found)


def _param_value(params: dict, key: str):
    section, _, leaf = key.partition(".")
    for file_data in params.values():
        value = ((file_data or {}).get("data") or {}).get(section, {})
        if isinstance(value, dict) and leaf in value:
            return value[leaf]
    return None


@pytest.mark.slow
def test_experiments_run_and_queued_sweep_show_their_params_and_metrics(built):
    repo = built["repo"]
    lr = _train_lr(repo)
    key, values = "train.lr", [lr * 0.5, lr * 3, lr * 5]
    # Target `train` (its metrics are the experiment's): evaluate/generate would only add minutes here.
    targets = ["train"]
    # The key exists in params.yaml (train.lr: null = the preset's value), so plain `-S key=value` works.
    out = dvc("exp", "run", *targets, "-n", "exp-one", "-S", f"{key}={values[0]}", cwd=repo, timeout=600, check=False)
    if out.returncode and "mixed_precision mode: False" in out.stdout + out.stderr:
        pytest.fail("`dvc exp run -S` rewrites params.yaml with ruamel (YAML 1.2) and drops the quotes of "
                    "`mixed_precision: \"no\"`; chibisplat/params.py reads it with PyYAML (YAML 1.1) as False. "
                    "Read params.yaml as YAML 1.2 (ruamel.yaml YAML(typ='safe')), like DVC does.")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = stages_run(out)
    assert ran == ["train"], ran

    for i, v in enumerate(values[1:]):
        dvc("exp", "run", *targets, "--queue", "-n", f"sweep-{i}", "-S", f"++{key}={v}", cwd=repo, timeout=120)
    dvc("queue", "start", "-j", "1", cwd=repo, timeout=120)
    deadline = time.monotonic() + 480
    status = ""
    while time.monotonic() < deadline:
        status = dvc("queue", "status", cwd=repo, timeout=60).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    else:
        dvc("queue", "kill", "sweep-0", "sweep-1", cwd=repo, timeout=60, check=False)
        pytest.fail(f"the queued sweep did not finish in 8 min:\n{status}")
    assert status.count("Success") >= 2, status + dvc("queue", "logs", "sweep-1", cwd=repo, check=False).stdout

    shown = json.loads(dvc("exp", "show", "--json", cwd=repo, timeout=120).stdout)
    found: dict = {}
    _walk_exps(shown, found)
    for name, v in zip(["exp-one", "sweep-0", "sweep-1"], values):
        assert name in found, sorted(found)
        params, metrics = found[name]
        assert _param_value(params, key) == v, (name, params)
        assert metrics, (name, found[name])
    print(f"\nexperiments on {key}: " + ", ".join(f"{n}={_param_value(found[n][0], key)} metrics={found[n][1]}"
                                             for n in ("exp-one", "sweep-0", "sweep-1")))

    # Back to the committed state (exp-one was applied to the workspace) for the tests that follow.
    git("reset", "-q", "--hard", "HEAD", cwd=repo)
    git("clean", "-fdq", "--", "models", "metrics", "out", cwd=repo)
    dvc("checkout", "--force", cwd=repo, timeout=300)
    assert dvc("status", "--json", cwd=repo).stdout.strip() in ("{}", "")


@pytest.mark.slow
def test_changed_fbx_rerenders_one_character_rewrites_one_shard_pushes_only_changes(built):
    repo, remote = built["repo"], built["remote"]
    assets = repo / "data" / "assets"
    dvc("push", cwd=repo, timeout=600)  # earlier tests (train.lr, experiments) made outputs of their own: push them first
    before_shards = shard_state(repo)
    before_remote = files_under(remote)
    cat_files = len(files_under(repo / "data" / "renders" / "cat_girl"))

    # A different character under the same name. The CC0 FBX next to the repository gives new pixels; another
    # bundled FBX would do too, but its views would then equal that sample's and DVC (content-addressed) would
    # push almost nothing.
    shared = REPO.parent / "shared" / "assets" / "quaternius_Female_Casual.fbx"
    donor = shared if shared.is_file() else assets / "gamer_boy.fbx"
    (assets / "cat_girl.fbx").write_bytes(donor.read_bytes())
    assert dvc("status", cwd=repo).stdout.count("changed deps") >= 1
    out = dvc("repro", *data_targets(built), cwd=repo, timeout=600)
    report = render_report(repo)
    assert report["counts"] == {"rendered": 1, "cached": 6, "failed": 0, "removed": 0}, report["counts"]
    assert [c["uid"] for c in report["characters"] if c["status"] == "rendered"] == ["cat_girl"]
    assert "render: 7 characters, 6 up to date, 1 to render" in out.stdout

    after_shards = shard_state(repo)
    assert after_shards.keys() == before_shards.keys()
    changed = [k for k in after_shards if after_shards[k] != before_shards[k]]
    assert changed == ["train/shard-00007.parquet"], changed  # cat_girl's shard (shared with witch_girl)
    assert re.search(r"pack: 7 characters; 1 shards written, 5 unchanged", out.stdout), out.stdout
    if "embed" in stages_run(out):  # captions unchanged: nothing re-encoded
        assert re.search(r"embed: \d+ captions \(0 encoded", out.stdout), out.stdout
    if "latents" in built["stages"]:  # one character's latents re-encoded
        assert re.search(r"latents: 1 encoded, 6 reused, 0 removed", out.stdout), out.stdout[-3000:]
    commit(repo, "cat_girl.fbx replaced")

    push = dvc("push", cwd=repo, timeout=600)
    new = files_under(remote) - before_remote
    n = pushed(push)
    print(f"\nafter changing one FBX: {n} files pushed (first push: {built['first_push']}); "
          f"cat_girl render folder has {cat_files} files")
    assert n == len(new), (n, len(new))
    # cat_girl's changed views + its folder's meta files + renders/packed .dir listings + 1 shard + manifest
    # (+ its latents and the latents .dir listing)
    assert 0 < n <= cat_files + 15, n
    if donor == shared:
        assert n >= 80, n  # at least its 40 views + 40 normal/depth maps are new objects
    assert n < built["first_push"] / 5


@pytest.mark.slow
def test_changed_caption_reencodes_one_caption_and_renders_nothing(built):
    repo = built["repo"]
    before_shards = shard_state(repo)
    caption = repo / "data" / "assets" / "idol_girl.txt"
    caption.write_text(caption.read_text().strip() + ", holding a microphone\n")
    out = dvc("repro", *data_targets(built), cwd=repo, timeout=600)
    # `render` depends on data/assets (captions included), so DVC runs it, but it renders nothing.
    assert render_report(repo)["counts"]["rendered"] == 0
    assert "0 to render" in out.stdout or "render" not in stages_run(out)
    changed = [k for k, v in shard_state(repo).items() if before_shards.get(k) != v]
    assert len(changed) == 1, changed
    m = re.search(r"embed: (\d+) captions \((\d+) encoded, (\d+) reused\)", out.stdout)
    assert m and m.group(2) == "1", out.stdout[-3000:]
    if "latents" in built["stages"]:
        m = re.search(r"latents: (\d+) encoded, (\d+) reused", out.stdout)
        assert m and int(m.group(1)) <= 1, out.stdout[-3000:]
    commit(repo, "idol_girl caption")
    status = json.loads(dvc("status", "--json", *data_targets(built), cwd=repo).stdout or "{}")
    assert status == {}, status


# ----------------------------------------------------------------------------------------------- SSH remote


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """A throwaway sshd on 127.0.0.1: its own config, host key and user key; only the current user may log in."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    def start(self) -> Sshd:
        sshd = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
                                             if os.access(p, os.X_OK)), None)
        if sshd is None:
            skip_or_fail("no sshd (Debian: apt-get install openssh-server; .ci/run installs it)")
        if shutil.which("ssh-keygen") is None:
            skip_or_fail("no ssh-keygen (Debian: openssh-client)")
        try:
            import dvc_ssh  # noqa: F401
        except ImportError:
            skip_or_fail("dvc-ssh is not installed (pip install -e '.[ssh]')")
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir (root only)
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(f / key)], check=True, timeout=60)
        shutil.copy(f / "user_key.pub", f / "authorized_keys")
        self.user = getpass.getuser()
        self.port = _free_port()
        (f / "sshd_config").write_text(textwrap.dedent(f"""\
            ListenAddress 127.0.0.1
            Port {self.port}
            HostKey {f / "host_key"}
            AuthorizedKeysFile {f / "authorized_keys"}
            PidFile {f / "sshd.pid"}
            StrictModes no
            UsePAM no
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            AllowUsers {self.user}
            Subsystem sftp internal-sftp
            """))
        check = subprocess.run([sshd, "-t", "-f", str(f / "sshd_config")], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            skip_or_fail(f"sshd refuses the test config: {check.stderr.strip()}")
        self.log = open(f / "sshd.log", "w")
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(f / "sshd_config")], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"sshd exited: {(f / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            self.stop()
            pytest.fail("sshd did not listen within 20 s")
        # A HOME of its own for the DVC client: known_hosts pins the throwaway host key (no trust-on-first-use).
        self.home = f / "home"
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True)
        host_pub = " ".join((f / "host_key.pub").read_text().split()[:2])
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()

    def configure(self, repo: Path, store: Path, name: str = "ssh") -> None:
        """An ssh:// remote with keyfile and port, in .dvc/config.local (not committed)."""
        dvc("remote", "add", "--local", "-f", name, f"ssh://127.0.0.1{store}", cwd=repo)
        dvc("remote", "modify", "--local", name, "port", str(self.port), cwd=repo)
        dvc("remote", "modify", "--local", name, "user", self.user, cwd=repo)
        dvc("remote", "modify", "--local", name, "keyfile", str(self.folder / "user_key"), cwd=repo)


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "sshd")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.slow
def test_push_and_pull_through_a_real_ssh_server(built, sshd, tmp_path):
    repo = built["repo"]
    store = tmp_path / "ssh-store"
    sshd.configure(repo, store)
    home = str(sshd.home)
    push = dvc("push", "-r", "ssh", cwd=repo, timeout=600, HOME=home)
    n = pushed(push)
    assert n > 6 * 120 and len(files_under(store)) == n, (n, len(files_under(store)))
    assert pushed(dvc("push", "-r", "ssh", cwd=repo, timeout=300, HOME=home)) == 0

    clone = tmp_path / "clone-ssh"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sshd.configure(clone, store)
    dvc("pull", "-r", "ssh", cwd=clone, timeout=600, HOME=home)
    assert parquet_hashes(clone / "data" / "packed") == parquet_hashes(repo / "data" / "packed")
    # (the data side: the tests above reproduced HEAD up to latents only)
    status = json.loads(dvc("status", "--json", *data_targets(built), cwd=clone).stdout or "{}")
    assert status == {}, status
    print(f"\nssh://127.0.0.1:{sshd.port}: {n} files pushed, pulled into a clone, Parquet identical")

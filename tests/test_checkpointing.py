"""Training checkpoints (chibisplat/training/checkpointing.py): LoRA checkpoints hold the adapter only, the base UNet
they belong to is checked on resume, folders are swapped in with renames only, adapter files have stable bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import fake_latent_dir, make_params, run_train

from chibisplat.training import checkpointing as ck
from chibisplat.training.checkpointing import ADAPTER_FILE, STATE_FILE

REPO = Path(__file__).resolve().parents[1]
LORA_RANK = 4


def lora_shapes(unet, rank: int) -> dict[str, int]:
    """Elements of each LoRA matrix the adapter must hold, from the UNet's own Linear layers (independent of peft):
    ``<layer>.lora_A.weight`` is (rank, in), ``<layer>.lora_B.weight`` (out, rank) for every attention projection."""
    from chibisplat.training.train import LORA_TARGETS

    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS):
            out[f"{name}.lora_A.weight"] = rank * m.in_features
            out[f"{name}.lora_B.weight"] = m.out_features * rank
    return out


def _tensor_elements(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_tensor_elements(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_elements(v) for v in obj)
    return 0


def _train(tmp_path: Path, name: str, **train):
    latents, embeddings = fake_latent_dir(tmp_path)
    settings = dict(max_steps=2, checkpointing_steps=2, lr=1e-3, use_ema=True, ema_decay=0.9) | train
    return run_train(make_params(tmp_path / name, latents, embeddings, **settings)), tmp_path / name / "models"


def test_a_lora_checkpoint_holds_the_adapter_and_no_base_weight(tmp_path):
    from chibisplat.models.sources import tiny_model_stack

    _, models = _train(tmp_path, "lora", mode="lora", lora_rank=LORA_RANK, lora_alpha=LORA_RANK)
    (folder,) = ck.checkpoints(models / "checkpoints")
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert sorted(p for p in files if p.endswith(".safetensors")) == [ADAPTER_FILE]  # no accelerate model*.safetensors

    base = tiny_model_stack(0).unet
    want = lora_shapes(base, LORA_RANK)
    n = sum(want.values())
    adapter = load_file(str(folder / ADAPTER_FILE))
    assert {k: v.numel() for k, v in adapter.items()} == want  # every tensor a lora_A / lora_B of a target layer
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert not set(adapter) & set(base.state_dict())  # not one base-UNet key
    # AdamW's two moments and the EMA cover exactly the adapter's parameters (plus AdamW's step scalars)
    optimizer = torch.load(folder / "optimizer.bin", weights_only=False)
    assert _tensor_elements(optimizer["state"]) == 2 * n + len(want)
    assert _tensor_elements(torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)) == n

    # Size: adapter + 2 moments + EMA in float32 (16 bytes per adapter element), <= 2 KiB of pickle per tensor and
    # 32 KiB for the RNG states, scheduler and state file: far below one copy of the base UNet.
    bound = 16 * n + 2048 * len(want) + 32 * 1024
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert bound < base_bytes / 4
    assert sum(files.values()) < bound, (files, bound)

    # the final outputs are still the merged UNet and the adapter
    assert (models / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert load_file(str(models / "unet" / "lora" / ADAPTER_FILE)).keys() == want.keys()


def test_a_full_checkpoint_still_holds_every_weight(tmp_path):
    from chibisplat.models.sources import tiny_model_stack

    _, models = _train(tmp_path, "full", mode="full")
    (folder,) = ck.checkpoints(models / "checkpoints")
    assert not (folder / ADAPTER_FILE).exists()
    saved = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == tiny_model_stack(0).unet.state_dict().keys()


def test_a_changed_base_unet_is_not_resumed(tmp_path, monkeypatch):
    """The base UNet is rebuilt from models: on resume; if its weights changed, the adapter is not put on it."""
    from chibisplat.models import sources
    from chibisplat.training import train as train_mod

    latents, embeddings = fake_latent_dir(tmp_path)
    settings = dict(mode="lora", max_steps=2, checkpointing_steps=2, lr=1e-3)
    params = make_params(tmp_path / "run", latents, embeddings, **settings)
    assert run_train(params).resumed_from == 0
    same = run_train(make_params(tmp_path / "run", latents, embeddings, **(settings | {"max_steps": 3})))
    assert same.resumed_from == 2  # the same base: resumed

    def other_base(cfg, *args, **kwargs):
        stack = sources.load_model_stack(cfg, *args, **kwargs)
        with torch.no_grad():
            stack.unet.conv_out.bias.add_(1e-3)  # e.g. the model files behind models: were replaced
        return stack

    monkeypatch.setattr(train_mod, "load_model_stack", other_base)
    logs: list[str] = []
    from project_config import project_config

    from chibisplat.training.train import train

    cfg = project_config(make_params(tmp_path / "run", latents, embeddings, **(settings | {"max_steps": 4})))
    again = train(cfg.train, cfg.models, log=logs.append)
    assert again.resumed_from == 0
    assert any("belong to other settings" in line for line in logs), logs


def test_a_lora_checkpoint_without_its_adapter_is_a_clear_error(tmp_path):
    latents, embeddings = fake_latent_dir(tmp_path)
    settings = dict(mode="lora", max_steps=2, checkpointing_steps=2)
    run_train(make_params(tmp_path / "run", latents, embeddings, **settings))
    (folder,) = ck.checkpoints(tmp_path / "run" / "models" / "checkpoints")
    (folder / ADAPTER_FILE).unlink()
    with pytest.raises(ck.CheckpointError, match=rf"{ADAPTER_FILE} is missing.*train.resume: never"):
        run_train(make_params(tmp_path / "run", latents, embeddings, **(settings | {"max_steps": 3})))


class _Boom(RuntimeError):
    pass


class FakeAccelerator:
    """One process; ``save_state`` writes two files, or half of them and fails (a kill inside save_state)."""

    is_main_process = True

    def __init__(self, fail: bool = False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, folder: str):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "optimizer.bin").write_bytes(b"state")
        if self.fail:
            raise _Boom()
        (Path(folder) / "scheduler.bin").write_bytes(b"sched")


def test_checkpoint_folders_appear_whole_and_old_ones_go(tmp_path):
    root = tmp_path / "models" / "checkpoints"
    for step in (1, 2, 3):
        ck.save_checkpoint(FakeAccelerator(), root, step, f"fp{step}", limit=2, log=lambda *_: None)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    assert sorted(p.name for p in root.parent.iterdir()) == ["checkpoints"]  # no temporary or trash folder left
    assert ck.read_state(root / "checkpoint-000003") == {"step": 3, "fingerprint": "fp3"}
    assert sorted(p.name for p in (root / "checkpoint-000003").iterdir()) == ["optimizer.bin", "scheduler.bin",
                                                                              STATE_FILE]
    # killed inside save_state: the complete checkpoints stay, the half one is never listed, the next save cleans up
    with pytest.raises(_Boom):
        ck.save_checkpoint(FakeAccelerator(fail=True), root, 4, "fp4", limit=2, log=lambda *_: None)
    assert [p.name for p in ck.checkpoints(root)] == ["checkpoint-000002", "checkpoint-000003"]
    ck.save_checkpoint(FakeAccelerator(), root, 4, "fp4", limit=2, log=lambda *_: None)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000003", "checkpoint-000004"]
    # a folder that merely looks like one (a stray copy, no state file) is not a checkpoint
    (root / "checkpoint-000009.1234").mkdir()
    (root / "checkpoint-000009.1234" / STATE_FILE).write_text("{}")
    (root / "checkpoint-000010").mkdir()
    assert [p.name for p in ck.checkpoints(root)] == ["checkpoint-000003", "checkpoint-000004"]
    ck.remove_checkpoints(root)
    assert not root.exists() and sorted(p.name for p in root.parent.iterdir()) == []


def _adapted_unet(seed: int = 0):
    from chibisplat.models.sources import tiny_model_stack
    from chibisplat.training.train import lora_config

    unet = tiny_model_stack(0).unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(lora_config(LORA_RANK, LORA_RANK))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero; make the adapter do something
    return unet


def test_adapter_file_round_trips_bit_exactly_and_loads_with_diffusers(tmp_path):
    a, b = _adapted_unet(0), _adapted_unet(1)
    trained = {n: p.detach().clone() for n, p in a.named_parameters() if p.requires_grad}
    assert any(not torch.equal(p, trained[n]) for n, p in b.named_parameters() if p.requires_grad)
    ck.save_adapter(a, tmp_path)
    ck.load_adapter(b, tmp_path)  # the resume path
    assert all(torch.equal(p, trained[n]) for n, p in b.named_parameters() if p.requires_grad)
    # the file is diffusers' LoRA format: load_lora_adapter on a plain base UNet gives the same weights
    from chibisplat.models.sources import tiny_model_stack

    c = tiny_model_stack(0).unet
    c.load_lora_adapter(str(tmp_path), weight_name=ADAPTER_FILE, prefix=None, adapter_name="default")
    loaded = {n: p for n, p in c.named_parameters() if "lora" in n}
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[n], trained[n]) for n in trained)
    # a different rank is refused with the file named
    from peft import LoraConfig

    other = tiny_model_stack(0).unet.requires_grad_(False)
    other.add_adapter(LoraConfig(r=2 * LORA_RANK, lora_alpha=LORA_RANK, target_modules=["to_q"]))
    with pytest.raises((ck.CheckpointError, RuntimeError), match="size mismatch|does not fit"):
        ck.load_adapter(other, tmp_path)


_BYTES_SCRIPT = """
import sys, hashlib
sys.path.insert(0, {tests!r})
from test_checkpointing import _adapted_unet
from chibisplat.training.checkpointing import adapter_bytes
print(hashlib.sha256(adapter_bytes(_adapted_unet(0))).hexdigest())
"""


@pytest.mark.slow
def test_adapter_bytes_are_the_same_in_every_process():
    """safetensors' header order and the LoRA config's set order vary with the process (hash seed); the file not."""
    digests = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        r = subprocess.run([sys.executable, "-c", _BYTES_SCRIPT.format(tests=str(REPO / "tests"))], cwd=REPO,
                           env=env, capture_output=True, text=True, check=True)
        digests.add(r.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


def test_sha256_state_hashes_names_dtypes_shapes_and_bytes():
    from chibisplat.identity import sha256_state

    w = torch.tensor([[1.0, 2.0]])
    b = torch.tensor([3], dtype=torch.int64)
    h = hashlib.sha256()
    h.update(b"b:torch.int64:(1,)" + (3).to_bytes(8, "little"))  # name order: b before w
    h.update(b"w:torch.float32:(1, 2)" + bytes.fromhex("0000803f") + bytes.fromhex("00000040"))
    assert sha256_state({"w": w, "b": b}) == h.hexdigest()
    assert sha256_state({"w": w.t().contiguous().t(), "b": b}) == h.hexdigest()  # layout does not matter
    assert sha256_state({"w": w.to(torch.bfloat16), "b": b}) != h.hexdigest()  # dtype does
    assert sha256_state({"w": w.reshape(2, 1), "b": b}) != h.hexdigest()  # shape does


def test_accelerate_layout_files_are_written_atomically(tmp_path, monkeypatch):
    """models/checkpoints.py: the same bytes as a direct save_file, and a writer killed mid-file leaves no file."""
    from safetensors.torch import save

    from chibisplat.models import checkpoints

    model = torch.nn.Linear(3, 2)
    path = checkpoints.save_accelerate_checkpoint(model, tmp_path / "tag", 7)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    assert path == tmp_path / "tag" / "checkpoints" / "000007" / "model.safetensors"
    assert path.read_bytes() == save(state, metadata={"format": "pt"})

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(save(tensors, metadata=metadata)[:20])
        raise _Boom()

    monkeypatch.setattr(checkpoints, "save_file", half_written)
    with pytest.raises(_Boom):
        checkpoints.save_accelerate_checkpoint(model, tmp_path / "tag", 8)
    assert sorted(p.name for p in (tmp_path / "tag" / "checkpoints" / "000008").iterdir()) == []
    with pytest.raises(_Boom):  # over an existing file: the old one stays whole
        checkpoints.save_accelerate_checkpoint(model, tmp_path / "tag", 7)
    assert path.read_bytes() == save(state, metadata={"format": "pt"})


def test_a_failed_final_save_keeps_the_previous_unet(tmp_path, monkeypatch):
    """models/train/unet/ is written beside and swapped in with renames: a run that dies while saving it leaves the
    previous inference UNet (and adapter) as they were."""
    from chibisplat.training import train as train_mod

    latents, embeddings = fake_latent_dir(tmp_path)
    settings = dict(mode="lora", max_steps=1, checkpointing_steps=1)
    run_train(make_params(tmp_path / "run", latents, embeddings, **settings))
    unet_dir = tmp_path / "run" / "models" / "unet"
    before = {p.relative_to(unet_dir): p.read_bytes() for p in unet_dir.rglob("*") if p.is_file()}
    assert Path("lora") / ADAPTER_FILE in before

    def dies_while_saving(*args, **kwargs):
        raise _Boom()

    monkeypatch.setattr(train_mod, "merged_unet", dies_while_saving)
    with pytest.raises(_Boom):
        run_train(make_params(tmp_path / "run", latents, embeddings, **(settings | {"max_steps": 2})))
    assert {p.relative_to(unet_dir): p.read_bytes() for p in unet_dir.rglob("*") if p.is_file()} == before

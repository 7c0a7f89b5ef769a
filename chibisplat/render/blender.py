"""Everything that runs inside Blender (``bpy``): import one asset, normalise it, render the 40 slots.

This module is executed in a worker process (``python -m chibisplat.render.worker``), one process per
character, so a crash inside Blender can only ever take one character down. Its source text is part of
the render configuration hash: editing it invalidates every cached character.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import bpy  # noqa: F401  (imported first: it fixes up sys.path for its bundled modules)
import mathutils
import numpy as np

from chibisplat import cameras
from chibisplat.render.errors import AssetError
from chibisplat.render.formats import LEGACY_FBX_MIN_VERSION, read_gltf_json, sniff_fbx, vrm_major_version
from chibisplat.render.options import MISSING_TEXTURES_BASE_COLOR, MISSING_TEXTURES_CHOICES, MISSING_TEXTURES_FAIL

GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "META", "FONT", "CURVES"}


@dataclass
class ImportResult:
    importer: str
    warnings: list[str] = field(default_factory=list)
    animation_count: int = 0
    armature_count: int = 0


# --------------------------------------------------------------------------------------- import


def _disable_script_execution() -> None:
    # Scripts embedded in a .blend (registered text blocks, Python drivers) must never run.
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False


def reset_scene() -> None:
    _disable_script_execution()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    _disable_script_execution()


def _import_fbx(path: Path, pose: str) -> ImportResult:
    kind, version = sniff_fbx(path)
    use_anim = pose != "rest"
    if kind == "binary" and version >= LEGACY_FBX_MIN_VERSION:
        try:
            bpy.ops.import_scene.fbx(filepath=str(path), use_anim=use_anim, use_image_search=True)
            return ImportResult(importer=f"import_scene.fbx (binary FBX {version})")
        except Exception as e:  # the legacy importer rejects some files the ufbx importer reads
            legacy_error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            _clear_all_objects()
            bpy.ops.wm.fbx_import(filepath=str(path), use_anim=use_anim)
            return ImportResult(
                importer=f"wm.fbx_import (binary FBX {version})",
                warnings=[f"legacy FBX importer failed ({legacy_error}); imported with Blender's ufbx importer"],
            )
    # ASCII and pre-7.1 binary files: only Blender's newer ufbx-based importer reads them.
    bpy.ops.wm.fbx_import(filepath=str(path), use_anim=use_anim)
    return ImportResult(importer=f"wm.fbx_import ({kind} FBX {version or 'unknown version'})")


def _clear_all_objects() -> None:
    for obj in list(bpy.data.objects):
        bpy.data.objects.remove(obj, do_unlink=True)


def _import_gltf(path: Path) -> ImportResult:
    gltf = read_gltf_json(path)
    bpy.ops.import_scene.gltf(filepath=str(path))
    result = ImportResult(importer="import_scene.gltf")
    vrm = vrm_major_version(gltf)
    if path.suffix.lower() == ".vrm" or vrm is not None:
        result.importer = f"import_scene.gltf (VRM {'1.0' if vrm == 1 else '0.x' if vrm == 0 else 'unknown'})"
        result.warnings.append("VRM MToon materials, outlines and spring bones are not imported (glTF fallback)")
        if vrm == 0:
            # VRM 0.x faces -Z in glTF, i.e. +Y in Blender after import: turn it to face -Y.
            turn = mathutils.Matrix.Rotation(math.pi, 4, "Z")
            for obj in bpy.context.scene.objects:
                if obj.parent is None:
                    obj.matrix_world = turn @ obj.matrix_world
    return result


def _import_blend(path: Path) -> ImportResult:
    with open(path, "rb") as f:
        magic = f.read(7)
    if magic not in (b"BLENDER",) and magic[:2] not in (b"\x1f\x8b", b"\x28\xb5"):  # plain, gzip, zstd
        raise AssetError("not a .blend file (bad header)", "save the file again from Blender")
    _disable_script_execution()
    # use_scripts=False: registered text blocks and Python drivers stay disabled.
    bpy.ops.wm.open_mainfile(filepath=str(path), load_ui=False, use_scripts=False)
    _disable_script_execution()
    result = ImportResult(importer="wm.open_mainfile (scripts disabled)")
    if any(t.use_module for t in bpy.data.texts):
        result.warnings.append("the .blend contains registered scripts; they were NOT executed")
    # The file's own cameras and lights would change the look; our rig replaces them.
    for obj in list(bpy.data.objects):
        if obj.type in {"CAMERA", "LIGHT", "LIGHT_PROBE", "SPEAKER"}:
            bpy.data.objects.remove(obj, do_unlink=True)
    return result


def import_asset(path: Path, pose: str) -> ImportResult:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise AssetError("the file is empty", "re-export the asset from its DCC tool")
    if suffix == ".fbx":
        result = _import_fbx(path, pose)
    elif suffix in (".glb", ".gltf", ".vrm"):
        result = _import_gltf(path)
    elif suffix == ".blend":
        result = _import_blend(path)
    else:
        raise AssetError(f"unsupported file type {suffix}", "convert it to .fbx, .glb, .vrm or .blend")
    for obj in bpy.data.objects:
        if obj.type == "ARMATURE":
            result.armature_count += 1
    result.animation_count = len(bpy.data.actions)
    return result


# --------------------------------------------------------------------------------------- pose and bbox


def apply_pose(pose: str) -> None:
    """``rest``: armatures in rest position, actions cleared. ``frame:N``: evaluate the animation at frame N."""
    scene = bpy.context.scene
    if pose == "rest":
        for obj in bpy.data.objects:
            if obj.animation_data is not None:
                obj.animation_data.action = None
            if obj.type == "ARMATURE":
                obj.data.pose_position = "REST"
        for key in bpy.data.shape_keys:
            if key.animation_data is not None:
                key.animation_data.action = None
    elif pose.startswith("frame:"):
        scene.frame_set(int(pose.split(":", 1)[1]))
    else:
        raise AssetError(f"unknown pose policy {pose!r}", "set render.pose to 'rest' or 'frame:<n>' in params.yaml")
    bpy.context.view_layer.update()


def _renderable(obj) -> bool:
    if obj.type not in GEOMETRY_TYPES or obj.hide_render or not obj.visible_get():
        return False
    return not any(c.hide_render for c in obj.users_collection)


def renderable_objects() -> list:
    """Geometry that renders; everything else (e.g. the glTF importer's hidden bone shape ``Icosphere``) is
    also hidden from the render so that what is measured is exactly what is seen."""
    keep = []
    for obj in bpy.context.scene.objects:
        if _renderable(obj):
            keep.append(obj)
        elif obj.type in GEOMETRY_TYPES:
            obj.hide_render = True
    return keep


def evaluated_bbox(objects) -> tuple[np.ndarray, int, int]:
    """World-space bbox (2, 3) of the evaluated geometry, plus vertex and face counts."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    n_verts = n_faces = 0
    for obj in objects:
        ev = obj.evaluated_get(depsgraph)
        mesh = ev.to_mesh()
        try:
            n = len(mesh.vertices)
            if n == 0:
                continue
            co = np.empty(n * 3, dtype=np.float64)
            mesh.vertices.foreach_get("co", co)
            co = co.reshape(-1, 3)
            m = np.array(ev.matrix_world)
            world = co @ m[:3, :3].T + m[:3, 3]
            lo, hi = np.minimum(lo, world.min(0)), np.maximum(hi, world.max(0))
            n_verts += n
            n_faces += len(mesh.polygons)
        finally:
            ev.to_mesh_clear()
    if n_verts == 0:
        raise AssetError(
            "the scene has no visible mesh (only empties, bones, cameras or hidden helper objects)",
            "check the export settings include the character's meshes and that they are not hidden",
        )
    return np.stack([lo, hi]), n_verts, n_faces


def normalise_scene(objects) -> dict:
    """Scale the largest bbox extent to 1 and move the bbox centre to the origin (docs/dataset-contract.md §2)."""
    bbox, n_verts, n_faces = evaluated_bbox(objects)
    extent = float((bbox[1] - bbox[0]).max())
    if not math.isfinite(extent) or extent <= 1e-9:
        raise AssetError("the visible geometry has zero size", "check the asset's scale and export units")
    scale = 1.0 / extent
    centre = (bbox[0] + bbox[1]) / 2.0
    root = bpy.data.objects.new("chibisplat_normalise", None)
    bpy.context.scene.collection.objects.link(root)
    for obj in bpy.context.scene.objects:
        if obj.parent is None and obj is not root:
            world = obj.matrix_world.copy()
            obj.parent = root
            obj.matrix_parent_inverse = mathutils.Matrix.Identity(4)
            obj.matrix_world = world
    root.matrix_world = mathutils.Matrix.Translation(-centre * scale) @ mathutils.Matrix.Scale(scale, 4)
    bpy.context.view_layer.update()
    normalised, _, _ = evaluated_bbox(objects)
    return {
        "scale": scale,
        "offset": (-centre * scale).tolist(),
        "original_bbox": bbox.tolist(),
        "bbox": normalised.tolist(),
        "vertex_count": n_verts,
        "face_count": n_faces,
    }


def fix_invisible_materials(objects) -> list[str]:
    """Materials whose constant opacity is 0 (no alpha texture) make a character invisible. Old FBX
    exporters write such values (e.g. Blender 2.79's transparency factor); render them opaque, and say so."""
    warnings = []
    seen = set()
    for obj in objects:
        for slot in getattr(obj, "material_slots", []):
            mat = slot.material
            if mat is None or mat.name in seen or mat.node_tree is None:
                continue
            seen.add(mat.name)
            for node in mat.node_tree.nodes:
                if node.type != "BSDF_PRINCIPLED":
                    continue
                alpha = node.inputs["Alpha"]
                if not alpha.is_linked and alpha.default_value < 0.01:
                    alpha.default_value = 1.0
                    warnings.append(f"material '{mat.name}' had constant opacity 0 (an FBX exporter quirk); rendered opaque")
    return warnings


def _node_trees(material) -> list:
    """The material's node tree and every node group it uses (nested), each once."""
    trees, todo = [], [material.node_tree] if material.node_tree is not None else []
    while todo:
        tree = todo.pop()
        if any(t == tree for t in trees):
            continue
        trees.append(tree)
        todo += [n.node_tree for n in tree.nodes if n.type == "GROUP" and n.node_tree is not None]
    return trees


def _materials(objects) -> list:
    seen, out = set(), []
    for obj in objects:
        for slot in getattr(obj, "material_slots", []):
            mat = slot.material
            if mat is not None and mat.name not in seen and mat.node_tree is not None:
                seen.add(mat.name)
                out.append(mat)
    return out


def _image_missing(img) -> bool:
    """True when Blender would render ``img`` as its magenta placeholder: an external (not packed) file that does
    not exist or cannot be read."""
    if img is None or img.packed_file is not None or img.source not in {"FILE", "SEQUENCE", "TILED"}:
        return False
    if img.source != "TILED":  # UDIM paths hold a <UDIM> token; only the load below can tell for those
        path = bpy.path.abspath(img.filepath) if img.filepath else ""
        if not path or not Path(path).is_file():
            return True
    return tuple(img.size) == (0, 0)  # reading .size loads the file: 0 x 0 = unreadable


def find_missing_textures(objects, asset: Path) -> list[dict]:
    """Image files that the materials of the rendered objects use but that are not there (or unreadable), as
    ``{"file": path relative to the asset's folder (or as stored), "image": name, "materials": [names]}``."""
    found: dict[str, dict] = {}
    for mat in _materials(objects):
        for tree in _node_trees(mat):
            for node in tree.nodes:
                if node.type == "TEX_IMAGE" and _image_missing(node.image):
                    img = node.image
                    stored = bpy.path.abspath(img.filepath) if img.filepath else ""
                    try:
                        shown = Path(stored).resolve().relative_to(asset.parent.resolve()).as_posix() if stored else ""
                    except ValueError:
                        shown = img.filepath
                    entry = found.setdefault(img.name, {"file": shown or f"(image '{img.name}' has no file path)",
                                                        "image": img.name, "materials": []})
                    if mat.name not in entry["materials"]:
                        entry["materials"].append(mat.name)
    return sorted(found.values(), key=lambda e: (e["file"], e["image"]))


def _feeds_shading(node) -> bool:
    """Nodes where a texture's signal turns into shading: BSDFs/emission (SHADER outputs) and output nodes."""
    return node.type in {"OUTPUT_MATERIAL", "GROUP_OUTPUT"} or any(s.type == "SHADER" for s in node.outputs)


def _constant_input(node, socket, chain: set) -> object | None:
    """The constant on the other side of a multiply in the texture's chain: glTF's baseColorFactor (a Mix node in
    MULTIPLY mode), a roughness/metallic factor (a Math node), or an RGB/Value node feeding that input."""
    if node.type == "MIX" and node.data_type == "RGBA" and node.blend_type == "MULTIPLY":
        names = ("A_Color", "B_Color")
    elif node.type == "MIX_RGB" and node.blend_type == "MULTIPLY":
        names = ("Color1", "Color2")
    elif node.type == "MATH" and node.operation == "MULTIPLY":
        names = (node.inputs[0].identifier, node.inputs[1].identifier)
    else:
        return None
    wanted = "RGBA" if socket.type == "RGBA" else "VALUE"
    for inp in node.inputs:
        if inp.identifier not in names or not inp.enabled:
            continue
        if not inp.is_linked:
            if (inp.type == "RGBA") == (wanted == "RGBA"):
                return tuple(inp.default_value) if wanted == "RGBA" else float(inp.default_value)
        else:
            src = inp.links[0].from_node
            if src.name not in chain and src.type in {"RGB", "VALUE"}:
                value = src.outputs[0].default_value
                return tuple(value) if wanted == "RGBA" else float(value)
    return None


def use_base_colour_for_missing_textures(objects, missing: list[dict]) -> None:
    """Replace every missing image's contribution by the material's own base colour: the links that carry a
    missing texture's signal into a shader are removed, and the shader input takes the constant factor the texture
    was multiplied with (glTF baseColorFactor and friends), else keeps its own value (FBX: the diffuse colour;
    otherwise the Principled BSDF default). A missing emission texture emits nothing. Never magenta."""
    names = {e["image"] for e in missing}
    for mat in _materials(objects):
        for tree in _node_trees(mat):
            starts = [n for n in tree.nodes if n.type == "TEX_IMAGE" and n.image is not None and n.image.name in names]
            chain = {n.name for n in starts}
            frontier, cut = list(starts), []
            while frontier:
                node = frontier.pop()
                for out in node.outputs:
                    for link in out.links:
                        to = link.to_node
                        if _feeds_shading(to):
                            cut.append(link)
                        elif to.name not in chain:
                            chain.add(to.name)
                            frontier.append(to)
            for link in cut:
                socket, node = link.to_socket, link.from_node
                value = None
                todo, seen = [node], set()
                while todo and value is None:  # the nearest multiply-by-constant upstream, within the chain
                    n = todo.pop(0)
                    if n.name in seen:
                        continue
                    seen.add(n.name)
                    value = _constant_input(n, socket, chain)
                    todo += [i.links[0].from_node for i in n.inputs if i.is_linked and i.links[0].from_node.name in chain]
                tree.links.remove(link)
                if value is not None and hasattr(socket, "default_value"):
                    socket.default_value = value
                elif socket.node.type == "BSDF_PRINCIPLED" and socket.name == "Emission Color":
                    socket.default_value = (0.0, 0.0, 0.0, 1.0)


def handle_missing_textures(objects, asset: Path, mode: str) -> list[str]:
    """``fail``: raise AssetError listing the missing files. ``base_color``: neutralise them, return warnings."""
    missing = find_missing_textures(objects, asset)
    if not missing:
        return []
    listing = "; ".join(f"{e['file']} (material {', '.join(repr(m) for m in e['materials'])})" for e in missing)
    if mode == MISSING_TEXTURES_BASE_COLOR:
        use_base_colour_for_missing_textures(objects, missing)
        return [f"missing texture {e['file']} (material {', '.join(repr(m) for m in e['materials'])}): rendered with "
                "the material's base colour" for e in missing]
    if mode != MISSING_TEXTURES_FAIL:
        raise AssetError(f"unknown render.missing_textures {mode!r}",
                         f"set it to one of {', '.join(MISSING_TEXTURES_CHOICES)}")
    raise AssetError(
        f"{len(missing)} texture file(s) the asset references are missing or unreadable: {listing} "
        f"(paths relative to {asset.parent})",
        "put the listed files there (or embed the textures in the asset: a .glb with embedded images, an FBX with "
        "embedded media, a .blend with packed resources) and re-run, which re-renders this character only; or set "
        "render.missing_textures: base_color to render the materials' own base colours instead",
    )


# --------------------------------------------------------------------------------------- scene setup


def setup_render(config: dict) -> str:
    """Engine, colour management, light rig and camera. Returns the Cycles device actually used."""
    scene = bpy.context.scene
    render = scene.render
    render.engine = config["engine"]
    render.resolution_x = render.resolution_y = int(config["resolution"])
    render.resolution_percentage = 100
    render.film_transparent = True
    render.use_persistent_data = True  # 40 views of one scene: build the BVH once
    render.dither_intensity = 0.0
    render.use_stamp = False
    if config.get("threads"):
        render.threads_mode = "FIXED"
        render.threads = int(config["threads"])
    scene.display_settings.display_device = "sRGB"
    scene.view_settings.view_transform = "Standard"  # Blender 5 defaults to AgX, which shifts colours
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0

    cyc = scene.cycles
    cyc.samples = int(config["samples"])
    cyc.seed = int(config["seed"])
    cyc.use_animated_seed = False
    cyc.use_adaptive_sampling = False
    cyc.use_denoising = bool(config["denoise"])
    cyc.max_bounces = 4
    cyc.diffuse_bounces = 2
    cyc.glossy_bounces = 2
    cyc.transmission_bounces = 4
    cyc.transparent_max_bounces = 8
    cyc.volume_bounces = 0
    cyc.caustics_reflective = cyc.caustics_refractive = False
    device = _choose_device(config.get("device", "auto"))
    cyc.device = "GPU" if device != "CPU" else "CPU"

    view_layer = scene.view_layers[0]
    view_layer.use_pass_normal = True
    view_layer.use_pass_z = True

    world = bpy.data.worlds.new("chibisplat_world")
    world.use_nodes = True
    bg = world.node_tree.nodes.get("Background")
    strength = float(config["lights"]["world_strength"])
    bg.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    bg.inputs["Strength"].default_value = strength
    scene.world = world
    for i, sun in enumerate(config["lights"]["suns"]):
        light = bpy.data.lights.new(f"chibisplat_sun{i}", type="SUN")
        light.energy = float(sun["energy"])
        light.angle = math.radians(float(sun.get("angle", 5.0)))
        obj = bpy.data.objects.new(light.name, light)
        scene.collection.objects.link(obj)
        position = cameras.camera_position(float(sun["azimuth"]), float(sun["elevation"]), 1.0)
        # A sun shines along its local -Z: point -Z from the light's position towards the origin.
        obj.matrix_world = mathutils.Matrix(cameras.opencv_to_blender_camera(cameras.look_at_c2w(position)).tolist())

    cam_data = bpy.data.cameras.new("chibisplat_camera")
    cam_data.lens = cameras.LENS_MM
    cam_data.sensor_width = cam_data.sensor_height = cameras.SENSOR_MM
    cam_data.sensor_fit = "AUTO"
    cam_data.clip_start, cam_data.clip_end = 0.01, 100.0
    cam = bpy.data.objects.new("chibisplat_camera", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    return device


def _choose_device(wanted: str) -> str:
    if wanted == "CPU":
        return "CPU"
    try:
        prefs = bpy.context.preferences.addons["cycles"].preferences
    except KeyError:
        return "CPU"
    order = ["OPTIX", "CUDA", "HIP", "ONEAPI", "METAL"] if wanted == "auto" else [wanted]
    for backend in order:
        try:
            prefs.compute_device_type = backend
        except TypeError:
            continue
        prefs.get_devices()
        gpus = [d for d in prefs.devices if d.type == backend]
        if gpus:
            for d in prefs.devices:
                d.use = d.type == backend
            return backend
    if wanted != "auto":
        raise AssetError(f"Cycles device {wanted} is not available here", "set render.device to auto or CPU")
    return "CPU"


# --------------------------------------------------------------------------------------- rendering


def render_slot(slot: cameras.CameraSlot, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """Render one slot; returns (RGBA uint8 straight alpha sRGB, normal-depth RGBA uint16)."""
    import cv2
    import OpenEXR

    scene = bpy.context.scene
    scene.camera.matrix_world = mathutils.Matrix(cameras.opencv_to_blender_camera(cameras.slot_c2w(slot)).tolist())
    bpy.ops.render.render(write_still=False)
    result = bpy.data.images["Render Result"]
    settings = scene.render.image_settings
    png_path, exr_path = tmp / "view.png", tmp / "view.exr"
    # The PNG goes through Blender's own colour management (Standard view transform, straight alpha).
    settings.media_type = "IMAGE"
    settings.file_format = "PNG"
    settings.color_mode = "RGBA"
    settings.color_depth = "8"
    settings.compression = 0
    result.save_render(str(png_path))
    settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    settings.color_depth = "32"
    settings.exr_codec = "NONE"
    result.save_render(str(exr_path))

    bgra = cv2.imread(str(png_path), cv2.IMREAD_UNCHANGED)
    rgba = np.ascontiguousarray(bgra[:, :, [2, 1, 0, 3]])
    with OpenEXR.File(str(exr_path)) as exr:
        channels = {name: ch.pixels for part in exr.parts for name, ch in part.channels.items()}

    def channel(suffix: str) -> np.ndarray:
        for name, pixels in channels.items():
            if name.endswith(suffix):
                return pixels.astype(np.float64)
        raise RuntimeError(f"Blender did not write the {suffix} pass")

    normal = np.stack([channel("Normal.X"), channel("Normal.Y"), channel("Normal.Z")], axis=-1)
    depth = channel("Depth.Z")
    return rgba, encode_normal_depth(normal, depth)


def encode_normal_depth(normal: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Cycles passes -> the contract's 16-bit RGBA: RGB = n*0.5+0.5 (unit world normal), A = depth/5.

    The normal pass is coverage-weighted at silhouette edges, so it is re-normalised. Pixels the
    depth pass did not hit (Cycles writes 1e10 there) are all zero: "0 where nothing was hit".
    """
    hit = np.isfinite(depth) & (depth > 0) & (depth < 1e6)
    length = np.linalg.norm(normal, axis=-1, keepdims=True)
    unit = np.where(length > 1e-8, normal / np.maximum(length, 1e-8), 0.0)
    if (depth[hit] >= cameras.DEPTH_SCALE).any():
        raise RuntimeError("depth >= 5 cannot be stored as depth/5 in 16 bits")
    nd = np.zeros(depth.shape + (4,), dtype=np.float64)
    nd[..., :3] = unit * 0.5 + 0.5
    nd[..., 3] = depth / cameras.DEPTH_SCALE
    nd[~hit] = 0.0
    return np.round(np.clip(nd, 0.0, 1.0) * 65535.0).astype(np.uint16)


def render_character(asset: Path, out_dir: Path, config: dict, progress=None) -> dict:
    """Import, normalise and render one asset into ``out_dir`` (a fresh folder). Returns the meta record
    without the identity fields, which the caller adds."""
    from chibisplat import png

    reset_scene()
    pose = config["pose"]
    result = import_asset(asset, pose)
    apply_pose(pose)
    objects = renderable_objects()
    norm = normalise_scene(objects)
    warnings = list(result.warnings) + fix_invisible_materials(objects)
    warnings += handle_missing_textures(objects, asset, config["missing_textures"])
    device = setup_render(config)
    material_count = len({m.name for o in objects for m in getattr(o.data, "materials", []) if m is not None})
    layout = cameras.SlotLayout(**config["cameras"])
    res = int(config["resolution"])
    tmp = out_dir / ".blender"
    tmp.mkdir()
    for slot in cameras.camera_slots(layout):
        rgba, nd = render_slot(slot, tmp)
        png.write_png(out_dir / f"{slot.index:05d}.png", rgba)
        png.write_png(out_dir / f"{slot.index:05d}_nd.png", nd)
        record = cameras.camera_record(slot, res, res, norm["bbox"])
        (out_dir / f"{slot.index:05d}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if progress is not None:
            progress(slot.index)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return {
        "importer": result.importer,
        "pose_policy": pose,
        "scale": norm["scale"],
        "offset": norm["offset"],
        "original_bbox": norm["original_bbox"],
        "bbox": norm["bbox"],
        "vertex_count": norm["vertex_count"],
        "face_count": norm["face_count"],
        "material_count": material_count,
        "object_count": len(objects),
        "armature_count": result.armature_count,
        "animation_count": result.animation_count,
        "warnings": warnings,
        "bpy_version": bpy.app.version_string,
        "device": device,
    }

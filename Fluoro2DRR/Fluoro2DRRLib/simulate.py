"""Knee flexion sequences with known truth: frames, calibration, bone models, truth poses.

Output folder (written to a temporary sibling and renamed at the end, so an interrupted run never
leaves a folder that looks complete)::

    DIR/frames/frame_0000.tif ...      clean DRRs (16-bit, bone bright) or simulated fluoroscopy (8-bit)
    DIR/calibration.json               our CArmGeometry (world = JointTrack source frame)
    DIR/calibration.txt                the same as JointTrack JT_INTCALIB
    DIR/models/{femur,tibia}.stl       bone surfaces in their bone frames (RAS, header SPACE=RAS)
    DIR/truth/{femur,tibia}.jts        truth poses, JointTrack JT_EULER_312 (model in the source frame)
    DIR/truth/poses.csv                truth world_from_bone matrices
    DIR/truth/bones.json               per-bone centroid (mm, bone frame) and file_from_bone
    DIR/simulation.json                what was simulated (seed, realism, intensity scale, ...)
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .bones import BoneModel, bone_from_mesh_file, bones_from_ct_files, knee_frame, write_bones_json, write_mesh
from .errors import InputError
from .geometry import CArmGeometry, apply_transform, knee_default_geometry
from .phantom import FLEXION_CENTRE_MM, knee_motion, make_knee_phantom

# Clean DRR frames store the summed line integral (mm x relative density) times this, as uint16.
CLEAN_DRR_COUNTS_PER_MM = 1000.0
BONE_NAMES = ("femur", "tibia")


def knee_frame_from_bones(femur: BoneModel, tibia: BoneModel) -> np.ndarray:
    """bone_from_knee for two bones in one frame (label map, or meshes exported together): bones.knee_frame."""
    pts = femur.surface_points_mm if femur.surface_points_mm is not None else femur.corners_mm()
    return knee_frame(pts, femur.centroid_mm, tibia.centroid_mm)


def load_subject(seed: int = 0, labelmap=None, femur_label: int = 5, tibia_label: int = 6,
                 femur_mesh=None, tibia_mesh=None, mesh_coordinate_system: str = "auto", mesh_units: str = "mm",
                 phantom_voxel_mm: float = 0.6):
    """(bones, knee_from_femur, knee_from_tibia, flexion_centre_knee, description)."""
    if labelmap is not None and (femur_mesh or tibia_mesh):
        raise InputError("--labelmap", "give either a label map or meshes, not both")
    if labelmap is not None:
        bones = bones_from_ct_files(None, labelmap, {"femur": femur_label, "tibia": tibia_label})
        description = f"label map {labelmap} (femur {femur_label}, tibia {tibia_label})"
    elif femur_mesh or tibia_mesh:
        if not (femur_mesh and tibia_mesh):
            raise InputError("--femur/--tibia", "both meshes are needed")
        bones = {"femur": bone_from_mesh_file(femur_mesh, "femur", mesh_coordinate_system, mesh_units),
                 "tibia": bone_from_mesh_file(tibia_mesh, "tibia", mesh_coordinate_system, mesh_units)}
        description = f"meshes {femur_mesh}, {tibia_mesh}"
    else:
        bones = make_knee_phantom(seed, voxel_mm=phantom_voxel_mm)
        return bones, np.eye(4), np.eye(4), FLEXION_CENTRE_MM, f"procedural knee phantom (seed {seed})"
    bone_from_knee = knee_frame_from_bones(bones["femur"], bones["tibia"])
    knee_from_bone = np.linalg.inv(bone_from_knee)
    # both bones come in one shared frame (the label map's RAS, or meshes exported together)
    return bones, knee_from_bone, knee_from_bone, np.zeros(3), description


def simulate_sequence(out_dir, n_frames: int = 20, seed: int = 0, realism: str = "none", image_size: int = 512,
                      labelmap=None, femur_label: int = 5, tibia_label: int = 6, femur_mesh=None, tibia_mesh=None,
                      mesh_coordinate_system: str = "auto", mesh_units: str = "mm", max_flexion_deg: float = 60.0,
                      geometry: CArmGeometry | None = None, progress: bool = True, overwrite: bool = False,
                      phantom_voxel_mm: float = 0.6, fluoro_strength: float = 1.0,
                      fluoro_effects_per: str = "frame", fluoro_effects: list[str] | tuple[str, ...] = ()) -> dict:
    """``fluoro_effects``: ``KEY=VALUE`` changes of :class:`fluoro_sim.FluoroEffects` for ``realism="fluoro"``
    (:meth:`FluoroEffects.with_overrides`), e.g. ``("focal_sigma_px=0.1,0.4",)``."""
    from . import calibration_io, frames_io, pose_io
    from .render import TwoBoneRenderer, bone_outside_view

    if realism not in ("none", "fluoro"):
        raise InputError("--realism", f"must be 'none' or 'fluoro', not {realism!r}")
    if fluoro_effects_per not in ("frame", "sequence"):
        raise InputError("--effects-per", f"must be 'frame' or 'sequence', not {fluoro_effects_per!r}")
    if n_frames < 1:
        raise InputError("--frames", "must be at least 1")
    from .fluoro_sim import FluoroEffects

    effects = FluoroEffects().with_overrides(fluoro_effects)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (overwrite or (out_dir / "simulation.json").exists()):
            raise InputError(out_dir, "exists and is not empty (and not an earlier simulation): choose another --out")
    t0 = time.time()
    geometry = geometry or knee_default_geometry().resized(image_size)
    bones, knee_from_femur, knee_from_tibia, centre, description = load_subject(
        seed, labelmap, femur_label, tibia_label, femur_mesh, tibia_mesh, mesh_coordinate_system, mesh_units,
        phantom_voxel_mm)
    depth = geometry.source_to_patient_mm or 0.85 * geometry.source_to_detector_mm
    poses = knee_motion(n_frames, geometry.world_from_source, depth, knee_from_femur, knee_from_tibia, centre,
                        seed, max_flexion_deg)
    for name in BONE_NAMES:
        for k in range(n_frames):
            if bone_outside_view(geometry, bones[name], poses[name][k]):
                raise InputError(name, f"the simulated {name} leaves the field of view at frame {k}")

    renderer = TwoBoneRenderer(geometry, [bones[n] for n in BONE_NAMES])
    stacked = np.stack([poses[n] for n in BONE_NAMES], 1)
    rng = np.random.default_rng(seed + 7)
    frames = []
    import torch
    from tqdm import tqdm

    with torch.inference_mode():
        for k in tqdm(range(n_frames), desc="simulate", unit="frame", disable=not progress):
            li = renderer(torch.as_tensor(stacked[k:k + 1], dtype=torch.float32))[0].numpy()
            if realism == "none":
                frames.append(np.clip(li.sum(0) * CLEAN_DRR_COUNTS_PER_MM, 0, 65535))
            else:
                from .fluoro_sim import simulate_fluoroscopy

                if fluoro_effects_per == "sequence":  # one scene for the sequence, fresh noise per frame
                    image = simulate_fluoroscopy(li, np.random.default_rng(seed + 11), effects,
                                                 strength=fluoro_strength, noise_rng=rng)
                else:  # every effect drawn again for every frame (not how a real trial looks; the default)
                    image = simulate_fluoroscopy(li, rng, effects, strength=fluoro_strength)
                frames.append(np.clip(image * 255.0, 0, 255))

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "truth").mkdir(parents=True)
    (tmp / "models").mkdir()
    frames_io.write_frames(tmp / "frames", np.array(frames), dtype="uint16" if realism == "none" else "uint8")
    geometry.save_json(tmp / "calibration.json")
    geometry.save_json(tmp / "truth" / "calibration.json")
    calibration_io.write_jt_intcalib(tmp / "calibration.txt", geometry)
    for name in BONE_NAMES:
        b = bones[name]
        write_mesh(tmp / "models" / f"{name}.stl", b.surface_points_mm, b.surface_triangles, "RAS")
        b.file_from_bone = np.eye(4)  # the STL we wrote stores the bone frame as is
        pose_io.write_jts(tmp / "truth" / f"{name}.jts",
                          pose_io.file_pose_from_world_pose(poses[name], geometry, b.file_from_bone))
    pose_io.write_poses_csv(tmp / "truth" / "poses.csv", poses)
    write_bones_json(tmp / "truth" / "bones.json", bones)
    info = {"n_frames": n_frames, "seed": seed, "realism": realism, "image_size": list(geometry.image_size),
            "subject": description, "clean_drr_counts_per_mm": CLEAN_DRR_COUNTS_PER_MM,
            "polarity": "drr" if realism == "none" else "xray",
            "fluoro_strength": fluoro_strength if realism == "fluoro" else None,
            "fluoro_effects_per": fluoro_effects_per if realism == "fluoro" else None,
            "fluoro_effects": list(fluoro_effects) if realism == "fluoro" else None,
            # every effect's range as drawn (defaults and overrides): a later change of the simulator's defaults
            # is then visible here, not only a changed --fluoro-effect
            "fluoro_effect_ranges": effects.as_json() if realism == "fluoro" else None,
            "seconds": round(time.time() - t0, 2)}
    (tmp / "simulation.json").write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def centroids_world(bones: dict[str, BoneModel], poses: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: apply_transform(poses[n], bones[n].centroid_mm[None])[:, 0] for n in poses}

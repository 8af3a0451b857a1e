"""The headless jobs behind ``fluoro2drr register`` and ``fluoro2drr demo``.

Frames + calibration + bones -> (translation) -> registration -> poses -> files. Results are written
after every frame (atomically, so a crash never leaves a half-written file), ``--resume`` continues
from the last finished frame, and Ctrl-C keeps every finished frame on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .errors import InputError

BONE_NAMES = ("femur", "tibia")


# ---- inputs -------------------------------------------------------------------------------------
def load_bones(femur=None, tibia=None, ct=None, labels=None, femur_label=None, tibia_label=None,
               mesh_space="auto", units="mm") -> dict:
    from .bones import bone_from_mesh_file, bones_from_ct_files

    if labels is not None:
        if femur_label is None or tibia_label is None:
            raise InputError("--labels", "give --femur-label and --tibia-label with a label map")
        return bones_from_ct_files(ct, labels, {"femur": femur_label, "tibia": tibia_label})
    if ct is not None:
        raise InputError("--ct", "a CT needs a label map / segmentation (--labels)")
    if not (femur and tibia):
        raise InputError("bones", "give --femur and --tibia meshes, or --labels (with --ct) and the two labels")
    return {"femur": bone_from_mesh_file(femur, "femur", mesh_space, units),
            "tibia": bone_from_mesh_file(tibia, "tibia", mesh_space, units)}


def load_init_pose(path, bone, geometry, file_from_bone) -> np.ndarray:
    """A pose file -> world_from_bone (N, 4, 4), undoing the file's convention."""
    from . import pose_io

    return pose_io.load_world_poses(path, bone, geometry, file_from_bone)


def _fingerprint(frames: np.ndarray, geometry) -> str:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(frames[:, ::8, ::8]).tobytes())
    h.update(json.dumps(geometry.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---- outputs ------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class ResultWriter:
    """Writes OUT/poses.csv, OUT/{bone}.jts, OUT/{bone}.tra and OUT/report.json after every frame."""

    def __init__(self, out_dir, geometry, bones: dict, n_frames: int, report_base: dict):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.geometry = geometry
        self.bones = bones
        self.n = n_frames
        self.report = dict(report_base)

    def write(self, poses: dict, quality: list, status: str) -> None:
        from . import pose_io

        done = len(quality)
        finished = {k: v[:done] for k, v in poses.items()}
        _atomic_write(self.out / "poses.csv", lambda p: pose_io.write_poses_csv(p, finished, quality))
        for name, arr in finished.items():
            if done == 0:
                continue
            ffb = self.bones[name].file_from_bone
            _atomic_write(self.out / f"{name}.jts",
                          lambda p, a=arr, f=ffb: pose_io.write_jts(p, pose_io.file_pose_from_world_pose(a, self.geometry, f)))
            _atomic_write(self.out / f"{name}.tra",
                          lambda p, a=arr, f=ffb: pose_io.write_tra(p, pose_io.file_pose_from_world_pose(a, None, f)))
        sims = [q["similarity"] for q in quality]
        self.report.update({
            "status": status, "frames_done": done, "n_frames": self.n,
            "converged_frames": int(sum(q["converged"] for q in quality)),
            "reinitialised_frames": [q["frame"] for q in quality if q["reinitialised"]],
            "median_similarity": float(np.median(sims)) if sims else None,
            "seconds_per_frame": float(np.mean([q["seconds"] for q in quality])) if quality else None,
            "frames": quality,
        })
        _atomic_write(self.out / "report.json", lambda p: p.write_text(json.dumps(self.report, indent=2)))


def _read_previous(out_dir: Path, fingerprint: str, names) -> tuple[dict | None, list, int, str | None]:
    from . import pose_io

    report_path = out_dir / "report.json"
    if not report_path.exists():
        raise InputError(out_dir, "nothing to resume here (no report.json)")
    report = json.loads(report_path.read_text())
    if report.get("fingerprint") != fingerprint:
        raise InputError(out_dir, "was made from other frames or another calibration: cannot resume it")
    quality = report.get("frames", [])
    done = len(quality)
    if done == 0:
        return None, [], 0, report.get("status")
    previous = pose_io.read_poses_csv(out_dir / "poses.csv")
    return {k: previous[k][:done] for k in names}, quality, done, report.get("status")


def _knee_joint_report(registrar, progress: bool) -> dict:
    """What the registration knows of the knee joint (report.json), said once on the console when it has none."""
    joint = registrar.joint
    if joint is not None:
        return {"prior": "on", "scanned_gap_mm": round(joint.scanned_gap_mm, 2),
                "centre_femur_mm": [round(float(v), 2) for v in joint.centre_femur_mm],
                "centre_tibia_mm": [round(float(v), 2) for v in joint.centre_tibia_mm],
                "flexion_axis_femur": [round(float(v), 4) for v in joint.flexion_axis_femur],
                "max_off_axis_deg": registrar.settings.joint_max_off_axis_deg,
                "mediolateral_tolerance_mm": registrar.settings.joint_mediolateral_tolerance_mm}
    if registrar.settings.joint_prior_weight <= 0 or len(registrar.names) < 2:
        return {"prior": "off"}
    reason = ("femur and tibia do not meet as loaded (segmented from different scans, or each centred on its own "
              "origin?): no knee-joint prior, each bone's depth rests on its own outline")
    if progress:
        print(f"note: {reason}")
    return {"prior": "off", "reason": reason}


def run_registration(frames, geometry, bones: dict, out_dir, init_poses=None, translation="none",
                     device="auto", polarity="auto", resume=False, settings=None, progress=True,
                     inputs_description: dict | None = None, default_poses: dict | None = None):
    """Register and write results frame by frame. Returns the SequenceResult (poses for every frame)."""
    from tqdm import tqdm

    from .registration import (Registrar, RegistrationSettings, iter_revisit_weak_frames, off_motion_frames,
                               register_sequence, translating, weak_frames)

    settings = settings or RegistrationSettings()
    out = Path(out_dir)
    n = len(frames)
    names = [k for k in BONE_NAMES if k in bones]
    fingerprint = _fingerprint(frames, geometry)
    translator = None
    if translating(translation):  # loaded first: a wrong model folder fails before anything is written
        from .translation.inference import Translator

        translator = Translator.for_option(translation, device)
    previous, quality, start, previous_status = None, [], 0, None
    if resume and out.exists():
        previous, quality, start, previous_status = _read_previous(out, fingerprint, names)
    elif out.exists() and (out / "report.json").exists() and not resume:
        raise InputError(out, "already holds a registration: use --resume to continue it, or another --out")
    polarity_reason = "given by the caller"
    if polarity == "auto":  # once for the sequence (one frame alone can fool the cues)
        from .polarity import detect_sequence_polarity

        polarity, polarity_info = detect_sequence_polarity(frames)
        polarity_reason = polarity_info["reason"]
    report_base = {"fingerprint": fingerprint, "inputs": inputs_description or {}, "translation": translation,
                   "translation_model": None if translator is None else translator.info.get("config_hash"),
                   "polarity": polarity, "polarity_reason": polarity_reason, "settings": settings.to_dict(),
                   "device": device,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    writer = ResultWriter(out, geometry, bones, n, report_base)
    poses = {k: np.full((n, 4, 4), np.nan) for k in names}
    if previous is not None:
        for k in names:
            poses[k][:start] = previous[k]
    all_quality = list(quality)
    writer.write(poses, all_quality, "running")
    bar = tqdm(total=n, initial=start, desc="register", unit="frame", disable=not progress)

    def on_frame(fr):
        for k in names:
            poses[k][fr.frame] = fr.poses[k]
        all_quality.append(fr.quality())
        writer.write(poses, all_quality, "running")
        bar.set_postfix(similarity=f"{fr.similarity:.3f}", s=f"{fr.seconds:.1f}")
        bar.update(1)

    status = "complete"
    # a registration resumed after it completed (e.g. only to smooth it) already had its second pass: nothing
    # to render, so no renderers are built
    revisit = settings.revisit_weak_frames and n > 1 and not (start == n and previous_status == "complete")
    try:
        registrar = Registrar(geometry, bones, settings, device) if start < n or revisit else None
        if registrar is not None:
            writer.report["knee_joint"] = _knee_joint_report(registrar, progress)
        translated = None
        if translator is not None and start < n:
            translated = np.zeros(np.shape(frames), np.float32)
            translated[start:] = translator.translate(frames[start:])
        if start < n:
            register_sequence(frames, geometry, bones, init_poses=init_poses, translation=translation, device=device,
                              settings=settings, polarity=polarity, start_frame=start, previous=previous,
                              on_frame=on_frame, default_poses=default_poses, registrar=registrar,
                              translated_frames=translated)
        if revisit and len(all_quality) == n:
            weak = weak_frames(all_quality, settings.revisit_dissimilarity_ratio, settings.lost_dissimilarity_margin)[0]
            weak = weak or (settings.flag_off_motion_frames and list(off_motion_frames(poses, all_quality, registrar)))
            if weak and translator is not None and translated is None:  # resumed after every frame was done
                translated = translator.translate(frames)
            bar.close()
            bar = tqdm(total=None, desc="revisit weak frames", unit="frame", disable=not progress or not weak)
            for _frame, _revised in iter_revisit_weak_frames(frames, poses, all_quality, registrar, translated,
                                                              polarity):
                writer.write(poses, all_quality, "running")
                bar.update(1)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        bar.close()
        writer.write(poses, all_quality, status if len(all_quality) == n or status == "interrupted" else "incomplete")
    from .registration import SequenceResult

    return SequenceResult(poses=poses, quality=all_quality)


def write_smoothed(out_dir, result, geometry, bones: dict, window_frames: int, order: int = 2) -> Path:
    """OUT/smoothed/: the registered poses smoothed in time (:func:`smoothing.smooth_pose_sequence`; failed
    frames weigh 0 and get their neighbours' fit), in the same files as OUT. OUT itself is left as measured."""
    from .smoothing import smooth_poses

    failed = {int(q["frame"]) for q in result.quality if q.get("failed", False)}
    names = list(result.poses)
    n = len(result.poses[names[0]])
    smoothed = smooth_poses(result.poses, {k: bones[k].centroid_mm for k in names}, window_frames, order, failed)
    target = Path(out_dir) / "smoothed"
    writer = ResultWriter(target, geometry, {k: bones[k] for k in names}, n,
                          {"smoothing": {"window_frames": int(window_frames), "order": int(order),
                                         "failed_frames_ignored": sorted(failed)},
                           "measured_poses": str(Path(out_dir) / "poses.csv")})
    writer.write(smoothed, result.quality, "complete")
    return target


def register_command(args) -> None:
    from .calibration_io import load_calibration
    from .frames_io import check_frames_match_geometry, load_frames

    if args.smooth_window < 1 or args.smooth_window % 2 == 0:  # checked before an hour of registration
        raise InputError("--smooth-window", f"must be an odd number of frames >= 1, not {args.smooth_window}")
    stack = load_frames(args.frames)
    height, width = stack.frames.shape[1:]
    geometry = load_calibration(args.calibration, image_size=(width, height), pixel_spacing_mm=args.pixel_spacing)
    check_frames_match_geometry(stack, geometry)
    bones = load_bones(args.femur, args.tibia, args.ct, args.labels, args.femur_label, args.tibia_label,
                       args.mesh_space, args.units)
    from .render import bone_outside_view

    init = {}
    for name, path in (("femur", args.init_femur), ("tibia", args.init_tibia)):
        if path:
            init[name] = load_init_pose(path, name, geometry, bones[name].file_from_bone)
            if bone_outside_view(geometry, bones[name], init[name][0]):
                raise InputError(path, f"the {name} at this pose lies outside the field of view")
    from .registration import RegistrationSettings

    settings = RegistrationSettings()
    if args.detector_size != settings.detector_sizes[-1]:
        sizes = tuple(s for s in settings.detector_sizes if s < args.detector_size) + (args.detector_size,)
        settings.detector_sizes = sizes[-3:]
        settings.voxel_mm = settings.voxel_mm[-len(settings.detector_sizes):]
    settings.compile_renderer = bool(getattr(args, "compile", False))
    restart_deg = getattr(args, "restart_deg", None)
    if restart_deg is not None:
        if not (np.isfinite(restart_deg) and 0.0 <= restart_deg <= 30.0):
            raise InputError("--restart-deg", f"{restart_deg} is not between 0 (off) and 30 degrees")
        settings.restart_rotation_deg = float(restart_deg)
    wire_width_mm = getattr(args, "wire_width_mm", None)
    if wire_width_mm is not None:
        if not (np.isfinite(wire_width_mm) and 0.0 <= wire_width_mm <= 30.0):
            raise InputError("--wire-width-mm", f"{wire_width_mm} is not between 0 (off) and 30 mm")
        settings.raw_thin_line_width_mm = float(wire_width_mm)
    settings.fill_failed_frames = not getattr(args, "no_fill", False)
    settings.flag_off_motion_frames = not getattr(args, "no_motion_check", False)
    if getattr(args, "no_joint_prior", False):
        settings.joint_prior_weight = 0.0
    description = {"frames": str(args.frames), "calibration": str(args.calibration), "femur": args.femur,
                   "tibia": args.tibia, "ct": args.ct, "labels": args.labels}
    result = run_registration(stack.frames, geometry, bones, args.out, init or None, args.translation, args.device,
                              args.polarity, args.resume, settings, inputs_description=description)
    done = sum(np.all(np.isfinite(result.poses["femur"]), axis=(1, 2)))
    print(f"registered {done}/{len(stack.frames)} frames -> {args.out}/poses.csv, femur/tibia .jts and .tra, report.json")
    if args.smooth_window > 1 and len(result.quality) == len(stack.frames):
        target = write_smoothed(args.out, result, geometry, bones, args.smooth_window)
        print(f"smoothed in time ({args.smooth_window}-frame window) -> {target}/")


# ---- demo ---------------------------------------------------------------------------------------
def demo_command(args) -> None:
    """Simulate, register from the automatic start, evaluate, plot kinematics, write a Slicer scene."""
    from .calibration_io import load_calibration
    from .evaluate import evaluate_files, format_table
    from .frames_io import load_frames
    from .simulate import simulate_sequence

    out = Path(args.out)
    sim_dir = out / "simulation"
    reg_dir = out / "registration"
    print(f"1/4 simulating a {args.frames}-frame knee flexion ({args.realism}) in {sim_dir}")
    simulate_sequence(sim_dir, n_frames=args.frames, seed=args.seed, realism=args.realism, image_size=256,
                      overwrite=True)
    stack = load_frames(sim_dir / "frames")
    geometry = load_calibration(sim_dir / "calibration.json")
    bones = load_bones(sim_dir / "models" / "femur.stl", sim_dir / "models" / "tibia.stl")
    print("2/4 registering femur and tibia (automatic start on frame 0, then tracking)")
    if reg_dir.exists():
        import shutil

        shutil.rmtree(reg_dir)
    result = run_registration(stack.frames, geometry, bones, reg_dir, None, args.translation, args.device,
                              "auto", False, inputs_description={"demo": str(sim_dir)})
    print("3/4 accuracy against the simulation's truth")
    summary = evaluate_files(reg_dir, sim_dir / "truth")
    print(format_table(summary))
    (out / "accuracy.json").write_text(json.dumps(summary, indent=2, default=float))
    print("4/4 kinematics plot and Slicer scene")
    from . import pose_io
    from .kinematics import anatomical_frame_from_points, knee_kinematics

    truth = pose_io.read_poses_csv(sim_dir / "truth" / "poses.csv")
    anat = {k: anatomical_frame_from_points(bones[k].surface_points_mm, k) for k in BONE_NAMES}
    est_k = knee_kinematics(result.poses, anat["femur"], anat["tibia"])
    true_k = knee_kinematics(truth, anat["femur"], anat["tibia"])
    plot_path = out / "kinematics.png"
    plot_kinematics(est_k, true_k, plot_path)
    print(f"   kinematics plot: {plot_path}")
    try:
        scene_path = write_demo_scene(out / "demo_scene.mrb", stack.frames, geometry, bones, result, anat)
        print(f"   Slicer scene: {scene_path} (open it in 3D Slicer and press play in the sequence toolbar)")
    except ImportError as exc:  # slicer-core missing: the rest of the demo stands
        print(f"   Slicer scene skipped ({exc})")


def plot_kinematics(estimated: dict, truth: dict | None, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("flexion", "flexion (deg)"), ("adduction", "adduction (deg)"),
            ("internal_rotation", "internal rotation (deg)"), ("anterior_mm", "anterior translation (mm)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (k, label) in zip(axes, keys):
        if truth is not None:
            ax.plot(truth[k], "k--", lw=1, label="truth")
        ax.plot(estimated[k], "o-", ms=3, label="registered")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("frame")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Knee kinematics (Grood & Suntay)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_demo_scene(path, frames, geometry, bones, result, anat) -> Path:
    from . import mrml_adapter as ma
    from .bones import polydata_from_arrays
    from .kinematics import knee_kinematics

    scene = ma.new_scene()
    seq, browser, _ = ma.frames_to_volume_sequence(scene, frames, geometry, "Fluoroscopy")
    ma.calibration_to_nodes(scene, geometry)
    models = {k: ma.model_node_from_polydata(scene, polydata_from_arrays(bones[k].surface_points_mm,
                                                                         bones[k].surface_triangles), k.capitalize())
              for k in BONE_NAMES}
    ma.store_registration_result(scene, result.poses, result.quality, browser, models)
    angles = knee_kinematics(result.poses, anat["femur"], anat["tibia"])
    ma.kinematics_table_and_plot(scene, angles)
    ma.frame_plane_model(scene, geometry)
    return ma.save_scene_mrb(scene, path)

"""Capture range on simulated fluoroscopy: registration success against the initial offset, raw frames vs
frames translated by the bundled networks, from the same starts.

    .venv/bin/python Testing/benchmarks/bench_capture_range.py [--frames 3] [--trials 3]

Success: both bones' in-plane error below 1 mm. Each start is the truth moved by the offset in-plane and in
depth (random directions) and rotated by offset/2 degrees about a random axis; the engine runs its
first-frame refinement (no automatic start). Prints a table and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
LABELMAP = ROOT.parent / "shared" / "data" / "knee_mri_labels" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"


def perturbed(truth_pose, centroid, offset_mm, geometry, rng):
    from scipy.spatial.transform import Rotation

    beam = geometry.beam_direction_world
    ip = rng.normal(size=3)
    ip -= ip @ beam * beam
    ip /= np.linalg.norm(ip)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    c = (truth_pose @ np.r_[centroid, 1.0])[:3]
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(axis * np.radians(offset_mm / 2.0)).as_matrix()
    m[:3, 3] = c + ip * offset_mm + beam * offset_mm * rng.choice([-1, 1]) - m[:3, :3] @ c
    return m @ truth_pose


MODES = ("raw", "translated", "translated + raw polish")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--offsets", default="2,5,10,15,20")
    ap.add_argument("--strength", type=float, default=1.0, help="fluoroscopy effect strength")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--translation", default="bundled",
                    help="translation model: bundled, or a model folder from 'fluoro2drr train'")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "capture_range"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.evaluate import pose_errors
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.registration import Registrar, polish_on_raw_frame, prepare_frame, prepare_translated_frame
    from Fluoro2DRRLib.simulate import simulate_sequence
    from Fluoro2DRRLib.translation.inference import Translator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = out / "sim"
    subject = {"labelmap": str(LABELMAP)} if LABELMAP.exists() else {}
    simulate_sequence(sim, n_frames=args.frames, seed=31, realism="fluoro", image_size=256, overwrite=True,
                      progress=False, fluoro_strength=args.strength, **subject)
    geometry = load_calibration(sim / "calibration.json")
    bones = {n: bone_from_mesh_file(sim / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
    truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
    frames = load_frames(sim / "frames").frames
    t0 = time.time()
    translated = Translator.for_option(args.translation, "cpu").translate(frames)
    translate_s = (time.time() - t0) / len(frames)
    raw = [prepare_frame(f) for f in frames]
    prepared = {"raw": raw,
                "translated": [prepare_translated_frame(f, t, fov=r[1]) for f, t, r in zip(frames, translated, raw)]}
    registrar = Registrar(geometry, bones)
    offsets = [float(o) for o in args.offsets.split(",")]
    rows = {}
    for offset in offsets:
        for mode in MODES:
            rng = np.random.default_rng(int(offset * 100))  # the same starts for both modes
            in_plane, rot, success = [], [], []
            for k in range(len(frames)):
                for _ in range(args.trials):
                    start = {n: perturbed(truth[n][k], bones[n].centroid_mm, offset, geometry, rng) for n in truth}
                    image, fov, info = prepared["raw" if mode == "raw" else "translated"][k]
                    res, *_ = registrar.register_frame(image, fov, start, False, False, info["polarity"])
                    if mode == "translated + raw polish":
                        res = polish_on_raw_frame(registrar, prepared["raw"][k], res, prepared["translated"][k])
                    errs = {n: pose_errors(res[n][None], truth[n][k:k + 1], bones[n].centroid_mm, geometry)
                            for n in truth}
                    in_plane += [float(e["in_plane_mm"][0]) for e in errs.values()]
                    rot += [float(e["rotation_deg"][0]) for e in errs.values()]
                    success.append(all(e["in_plane_mm"][0] < 1.0 for e in errs.values()))
            rows[(offset, mode)] = {"success_pct": 100.0 * np.mean(success), "in_plane_mm_median": float(np.median(in_plane)),
                                    "rotation_deg_median": float(np.median(rot)), "n": len(success)}
            print(offset, mode, rows[(offset, mode)], flush=True)
    lines = [f"Simulated fluoroscopy (strength {args.strength}), {'knee MRI label map' if subject else 'procedural phantom'}, "
             f"{len(frames)} frames x {args.trials} starts per offset; translation model {args.translation}, "
             f"{translate_s:.2f} s/frame.", "",
             "| initial offset (mm, deg = mm/2) | " + " | ".join(
                 f"{m}: success % | {m}: in-plane mm (median) | {m}: rotation deg (median)" for m in MODES) + " |",
             "|---|" + "---|" * (3 * len(MODES))]
    for offset in offsets:
        cells = [f"{rows[(offset, m)]['success_pct']:.0f} | {rows[(offset, m)]['in_plane_mm_median']:.2f} | "
                 f"{rows[(offset, m)]['rotation_deg_median']:.2f}" for m in MODES]
        lines.append(f"| {offset:g} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "capture_range.md").write_text(table + "\n")
    (out / "capture_range.json").write_text(json.dumps({f"{o}_{m}": v for (o, m), v in rows.items()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())

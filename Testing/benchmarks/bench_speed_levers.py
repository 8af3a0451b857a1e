"""Speed levers of the registration engine, measured one by one on the same tracking steps.

    .venv/bin/python Testing/benchmarks/bench_speed_levers.py [--frames 8] [--threads 1]

Subject: the knee MRI label map in ../shared/data when present, the procedural phantom otherwise; clean
256 x 256 frames. Every variant registers the same frames from the same starts (the previous frame's
true pose, as in tracking), so the columns differ only by the lever. Each row changes one thing from the
engine's defaults. A render micro-benchmark shows what batching several poses in one render buys
(the automatic start renders its candidates as one batch). Prints a table and writes it to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
LABELMAP = ROOT.parent / "shared" / "data" / "knee_mri_labels" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"


def variants():
    """(name, settings overrides, what it measures)."""
    return [
        ("engine defaults", {}, "64/128/256 px, trilinear in bone boxes, L-BFGS"),
        ("one level (256 px only)", {"detector_sizes": (256,), "voxel_mm": (1.2,), "track_iterations": (40,),
                                     "start_iterations": (80,), "track_bound_rotation_deg": (3.0,),
                                     "track_bound_translation_mm": (4.0,)},
         "coarse levels off: all iterations at full size"),
        ("Siddon at the finest level", {"renderer": ("trilinear", "trilinear", "siddon")}, "exact ray tracing at 256 px"),
        ("Siddon at every level", {"renderer": "siddon"}, "exact ray tracing everywhere"),
        ("finest volume 0.75 mm", {"voxel_mm": (2.4, 1.2, 0.75)}, "full-resolution model at 256 px"),
        ("Adam instead of L-BFGS", {"optimizer": "adam", "track_iterations": (40, 30, 10)},
         "same iteration budget"),
        ("torch.compile renderer", {"compile_renderer": True}, "compile time excluded (first frame dropped)"),
        ("samples for the box's diagonal", {"ray_step_voxels": 0.0},
         "samples per ray for the longest chord of any view (the engine until the fifteenth session)"),
    ]


def render_batching(registrar, poses, repeats=5):
    """Seconds per pose rendering B poses in one call vs one at a time (finest and coarsest level)."""
    out = {}
    for li in (0, len(registrar.levels) - 1):
        r = registrar.levels[li]
        single = torch.as_tensor(poses[None], dtype=torch.float32)
        with torch.inference_mode():
            r(single)
            for b in (1, 4, 16):
                batch = single.expand(b, -1, -1, -1).contiguous()
                t = time.perf_counter()
                for _ in range(repeats):
                    r(batch)
                out[f"{r.width}px_batch{b}"] = (time.perf_counter() - t) / repeats / b
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8, help="tracking steps per variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated variant numbers (1-based) to run")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "speed_levers"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.evaluate import pose_errors
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.registration import Registrar, RegistrationSettings, prepare_frame
    from Fluoro2DRRLib.simulate import simulate_sequence

    out = Path(args.out)
    subject = {"labelmap": str(LABELMAP)} if LABELMAP.exists() else {}
    subject_name = "knee MRI label map (../shared)" if subject else "procedural knee phantom"
    sim = out / "sim_clean"
    simulate_sequence(sim, n_frames=args.frames + 1, seed=21, image_size=256, overwrite=True, progress=False,
                      **subject)
    geometry = load_calibration(sim / "calibration.json")
    bones = {n: bone_from_mesh_file(sim / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
    truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
    frames = load_frames(sim / "frames").frames
    picks = [int(i) - 1 for i in args.only.split(",") if i] or range(len(variants()))
    rows, details = [], {}
    for vi in picks:
        name, overrides, what = variants()[vi]
        settings = dataclasses.replace(RegistrationSettings(), **overrides)
        registrar = Registrar(geometry, bones, settings, device="cpu")
        secs, est = [], {n: [] for n in truth}
        steps = list(range(1, len(frames)))
        if settings.compile_renderer:
            steps = [1] + steps  # the first call compiles: run it once more and drop it
        for j, k in enumerate(steps):
            image, fov, info = prepare_frame(frames[k])
            t = time.perf_counter()
            res, *_ = registrar.register_frame(image, fov, {n: truth[n][k - 1] for n in truth}, False, True,
                                               info["polarity"])
            dt = time.perf_counter() - t
            if settings.compile_renderer and j == 0:
                details.setdefault("compile_seconds", dt)
                continue
            secs.append(dt)
            for n in truth:
                est[n].append(res[n])
        errs = {n: pose_errors(np.array(est[n]), truth[n][1:], bones[n].centroid_mm, geometry) for n in truth}
        in_plane = np.concatenate([errs[n]["in_plane_mm"] for n in truth])
        rot = np.concatenate([errs[n]["rotation_deg"] for n in truth])
        depth = np.concatenate([errs[n]["out_of_plane_mm"] for n in truth])
        row = {"variant": name, "what": what, "s_per_frame": float(np.median(secs)),
               "in_plane_mm_median": float(np.median(in_plane)), "in_plane_mm_max": float(in_plane.max()),
               "out_of_plane_mm_median": float(np.median(depth)), "rotation_deg_median": float(np.median(rot))}
        rows.append(row)
        print(f"{name}: {row['s_per_frame']:.2f} s/frame, in-plane {row['in_plane_mm_median']:.3f} mm", flush=True)
        if vi == 0:
            details["render_seconds_per_pose"] = render_batching(registrar, np.stack([truth[n][0] for n in truth]))
    base = rows[0]["s_per_frame"] if picks[0] == 0 else None
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    lines = [f"Speed levers; subject: {subject_name}; clean 256 x 256 frames; {len(frames) - 1} tracking steps "
             f"from the previous frame's true pose; {machine}.", "",
             "| variant | what changes | s/frame (median) | vs defaults | in-plane mm med / max | out-of-plane mm med "
             "| rotation deg med |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['s_per_frame'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['variant']} | {r['what']} | {r['s_per_frame']:.2f} | {ratio} | "
                     f"{r['in_plane_mm_median']:.3f} / {r['in_plane_mm_max']:.3f} | {r['out_of_plane_mm_median']:.2f} "
                     f"| {r['rotation_deg_median']:.2f} |")
    if "compile_seconds" in details:
        lines.append(f"\ntorch.compile: the first frame took {details['compile_seconds']:.1f} s (compilation).")
    if "render_seconds_per_pose" in details:
        rb = details["render_seconds_per_pose"]
        lines.append("\nRender batching, milliseconds per pose (both bones): " + ", ".join(
            f"{k.replace('_', ' ')} {1000 * v:.1f}" for k, v in rb.items()))
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_levers.md").write_text(table + "\n")
    (out / "speed_levers.json").write_text(json.dumps({"rows": rows, **details}, indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""Registration benchmark: our engine vs a naive DiffDRR baseline on a simulated knee flexion sequence.

    .venv/bin/python Testing/benchmarks/bench_registration.py [--frames 20] [--baseline-frames 2]

Subject: the real knee MRI label map in ../shared/data when present, the procedural phantom otherwise.
Sequences (--cases): clean DRR frames, simulated fluoroscopy raw ("fluoro") and the same fluoroscopy
frames through the bundled translation networks ("translated"), 256 x 256 detector.
Our engine: automatic start on frame 0 from a default pose off by up to 30 mm in-plane, 50 mm in depth
and 15 deg, then tracking. Baseline: full-resolution Siddon, one scale, 100 Adam iterations (lr 1e-2 rad,
1 mm), started on the same frames from the same starts as a tracking step (previous frame's truth) --
and our engine from those same starts too, so both columns compare like with like.
Prints a table and writes it (markdown + JSON) to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
LABELMAP = SHARED / "knee_mri_labels" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def far_default(truth, bones, geometry, rng):
    from scipy.spatial.transform import Rotation

    out = {}
    beam = geometry.beam_direction_world
    for n in truth:
        p = truth[n][0]
        c = (p @ np.r_[bones[n].centroid_mm, 1.0])[:3]
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        ip = rng.normal(size=3)
        ip -= ip @ beam * beam
        ip /= np.linalg.norm(ip)
        m = np.eye(4)
        m[:3, :3] = Rotation.from_rotvec(axis * np.radians(rng.uniform(10, 15))).as_matrix()
        m[:3, 3] = c + ip * rng.uniform(15, 30) + beam * rng.uniform(-50, 50) - m[:3, :3] @ c
        out[n] = m @ p
    return out


def summarise(est, truth, bones, geometry, frames=None):
    from Fluoro2DRRLib.evaluate import pose_errors, summarise as summ

    out = {}
    for n in truth:
        idx = slice(None) if frames is None else frames
        out[n] = summ(pose_errors(est[n][idx], truth[n][idx], bones[n].centroid_mm, geometry))
    return out


def filled_bones(quality) -> dict[int, list[str]]:
    """frame -> the bones whose pose the second pass filled from the neighbours' motion (note "... pose
    interpolated/extrapolated ...": registration.fill_failed_frames), not measured."""
    out = {}
    for q in quality:
        m = re.search(r"([a-z, ]+) pose (?:interpolated|extrapolated)", q.get("note", ""))
        if m:
            out[int(q["frame"])] = [b.strip() for b in m.group(1).split(",")]
    return out


def flag_lines(label, quality, est, truth, bones, geometry, success_mm: float = 1.0) -> list[str]:
    """What the success rates in the table count: frames flagged failed, bones carrying a filled (not
    measured) pose, and the success rate over measured bone-frames only (a filled bone counted as a miss)."""
    from Fluoro2DRRLib.evaluate import pose_errors

    flagged = [int(q["frame"]) for q in quality if q.get("failed", False)]
    filled = filled_bones(quality)
    parts = []
    for n in truth:
        ip = pose_errors(est[n], truth[n], bones[n].centroid_mm, geometry)["in_plane_mm"]
        measured_hits = [k for k in range(len(ip)) if ip[k] < success_mm and n not in filled.get(k, [])]
        parts.append(f"{n} {100.0 * len(measured_hits) / len(ip):.0f} %")
    return [f"Engine, {label}: frames flagged failed {flagged or 'none'}; poses filled from the neighbours' motion "
            f"(not measured) {filled or 'none'}; success counting a filled pose as a miss: " + ", ".join(parts) + "."]


def naive_baseline(geometry, bones, frame, start, iterations=100):
    """Full-resolution Siddon, one scale, Adam: what a first DiffDRR registration loop looks like."""
    from Fluoro2DRRLib.registration import compose_update, prepare_frame, similarity
    from Fluoro2DRRLib.render import TwoBoneRenderer

    names = list(start)
    renderer = TwoBoneRenderer(geometry, [bones[n] for n in names], "siddon")
    image, fov, info = prepare_frame(frame)
    fixed = torch.as_tensor(image)[None, None]
    mask = torch.as_tensor(fov)[None, None]
    hp = 0.08 if info["polarity"] == "xray" else 0.0
    poses = torch.as_tensor(np.stack([start[n] for n in names])[None], dtype=torch.float32)
    c = torch.as_tensor(np.stack([(start[n] @ np.r_[bones[n].centroid_mm, 1])[:3] for n in names])[None],
                        dtype=torch.float32)
    w = torch.zeros(1, len(names), 3, requires_grad=True)
    v = torch.zeros(1, len(names), 3, requires_grad=True)
    opt = torch.optim.Adam([{"params": [w], "lr": 1e-2}, {"params": [v], "lr": 1.0}])
    for _ in range(iterations):
        opt.zero_grad()
        loss = -similarity(fixed, renderer(compose_update(poses, c, w, v)).sum(1, keepdim=True), mask, hp).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = compose_update(poses, c, w, v)[0].double().numpy()
    return {n: out[i] for i, n in enumerate(names)}


def run_case(label, sim_dir, args, rows, details):
    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.pipeline import run_registration
    from Fluoro2DRRLib.registration import Registrar, RegistrationSettings, prepare_frame

    geometry = load_calibration(sim_dir / "calibration.json")
    bones = {n: bone_from_mesh_file(sim_dir / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
    truth = pose_io.read_poses_csv(sim_dir / "truth" / "poses.csv")
    frames = load_frames(sim_dir / "frames").frames
    rng = np.random.default_rng(11)
    default = far_default(truth, bones, geometry, rng)
    out_dir = Path(args.out) / f"engine_{label}"
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.time()
    translation = args.translation if label == "translated" else "none"
    settings = RegistrationSettings(outlier_rounds=args.outlier_rounds, outlier_scale=args.outlier_scale,
                                    restart_rotation_deg=args.restart_deg).with_overrides(args.setting)
    result = run_registration(frames, geometry, bones, out_dir, None, translation, progress=True,
                              default_poses=default, settings=settings)
    total = time.time() - t0
    secs = [q["seconds"] for q in result.quality]
    summary = summarise(result.poses, truth, bones, geometry)
    rows.append((f"engine, {label}: auto start + tracking, all {len(frames)} frames", summary,
                 float(np.median(secs[1:])) if len(secs) > 1 else secs[0], secs[0]))
    details[f"engine_{label}"] = {"summary": summary, "seconds_per_frame": secs, "total_seconds": total,
                                  "quality": result.quality,
                                  "flags": flag_lines(label, result.quality, result.poses, truth, bones, geometry)}
    if args.smooth_window > 1:  # the product's optional temporal smoothing (register --smooth-window)
        from Fluoro2DRRLib.pipeline import write_smoothed

        smoothed = pose_io.read_poses_csv(write_smoothed(out_dir, result, geometry, bones, args.smooth_window)
                                          / "poses.csv")
        smoothed_summary = summarise(smoothed, truth, bones, geometry)
        rows.append((f"engine, {label}, smoothed in time ({args.smooth_window} frames)", smoothed_summary,
                     None, None))
        details[f"engine_{label}_smoothed"] = {"summary": smoothed_summary}

    if args.baseline_frames <= 0 or label not in args.baseline_cases.split(","):
        return
    # like-with-like: the same tracking starts (previous frame's truth) for both methods
    picks = list(range(1, len(frames), max(1, (len(frames) - 1) // max(args.baseline_frames, 1))))[:args.baseline_frames]
    registrar = Registrar(geometry, bones, RegistrationSettings())
    est_engine = {n: np.full_like(truth[n], np.nan) for n in truth}
    est_naive = {n: np.full_like(truth[n], np.nan) for n in truth}
    t_engine, t_naive = [], []
    for k in picks:
        start = {n: truth[n][k - 1] for n in truth}
        image, fov, info = prepare_frame(frames[k])
        t = time.time()
        res, *_ = registrar.register_frame(image, fov, start, False, True, info["polarity"])
        t_engine.append(time.time() - t)
        t = time.time()
        naive = naive_baseline(geometry, bones, frames[k], start)
        t_naive.append(time.time() - t)
        for n in truth:
            est_engine[n][k] = res[n]
            est_naive[n][k] = naive[n]
        print(f"  {label} frame {k}: engine {t_engine[-1]:.1f} s, naive {t_naive[-1]:.1f} s", flush=True)
    s_engine = summarise(est_engine, truth, bones, geometry, picks)
    s_naive = summarise(est_naive, truth, bones, geometry, picks)
    rows.append((f"engine, {label}: same starts as baseline ({len(picks)} frames)", s_engine,
                 float(np.median(t_engine)), None))
    rows.append((f"naive DiffDRR, {label}: Siddon 256 px, 1 scale, 100 Adam it. ({len(picks)} frames)", s_naive,
                 float(np.median(t_naive)), None))
    details[f"paired_{label}"] = {"frames": picks, "engine": s_engine, "naive": s_naive,
                                  "engine_seconds": t_engine, "naive_seconds": t_naive}


def memory_check(args, details):
    """Peak memory registering 1024 x 1024 frames (2 frames, tracking), in a child process of its own:
    simulating 1024 px frames here (full-size renders) must not count."""
    import subprocess

    from Fluoro2DRRLib.simulate import simulate_sequence

    d = Path(args.out) / "sim_1024"
    simulate_sequence(d, n_frames=2, seed=4, image_size=1024, overwrite=True, progress=False)
    subprocess.run([sys.executable, __file__, "--memory-child", str(d), "--threads", str(args.threads),
                    "--out", args.out, "--reuse-cpu-buffers", args.reuse_cpu_buffers,
                    "--max-pixels-per-evaluation", str(args.max_pixels_per_evaluation)], check=True)
    # the child reports its own peak (Linux /proc): RUSAGE_CHILDREN would count the forked copy of this process
    details["peak_rss_gb_1024"] = json.loads((Path(args.out) / "memory_child.json").read_text())["peak_rss_gb"]


def memory_child(sim_dir, out, reuse_cpu_buffers: bool, max_pixels_per_evaluation: int):
    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.pipeline import run_registration
    from Fluoro2DRRLib.registration import RegistrationSettings
    import shutil

    d = Path(sim_dir)
    geometry = load_calibration(d / "calibration.json")
    bones = {n: bone_from_mesh_file(d / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
    truth = pose_io.read_poses_csv(d / "truth" / "poses.csv")
    frames = load_frames(d / "frames").frames
    shutil.rmtree(Path(out) / "engine_1024", ignore_errors=True)
    run_registration(frames, geometry, bones, Path(out) / "engine_1024", {n: truth[n][:1] for n in truth},
                     settings=RegistrationSettings(reuse_cpu_buffers=reuse_cpu_buffers,
                                                   max_pixels_per_evaluation=max_pixels_per_evaluation),
                     progress=False)
    # VmHWM is this program's own high-water mark (ru_maxrss would keep the forking parent's across exec)
    hwm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmHWM:"))
    (Path(out) / "memory_child.json").write_text(json.dumps({"peak_rss_gb": hwm_kb / 1024 ** 2}))


def fmt_row(name, summary, sec, first):
    cells = []
    for bone in ("femur", "tibia"):
        s = summary[bone]
        cells.append(f"{s['in_plane_mm_median']:.2f} / {s['in_plane_mm_p95']:.2f} | "
                     f"{s['out_of_plane_mm_median']:.2f} / {s['out_of_plane_mm_p95']:.2f} | "
                     f"{s['rotation_deg_median']:.2f} / {s['rotation_deg_p95']:.2f} | {s['success_rate_pct']:.0f}")
    if sec is None:  # a post-process of the row above: no time of its own
        return f"| {name} | - | " + " | ".join(cells) + " |"
    first_s = f" (first frame {first:.1f})" if first is not None else ""
    return f"| {name} | {sec:.2f}{first_s} | " + " | ".join(cells) + " |"


def add_setting_option(ap: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--setting KEY=VALUE`` (repeatable), read by ``RegistrationSettings.with_overrides``."""
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="change one of the engine's RegistrationSettings (VALUE as JSON, e.g. "
                         "joint_mediolateral_tolerance_mm=null); repeat for more")


def add_fluoro_effect_option(ap: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--fluoro-effect KEY=LOW,HIGH`` (repeatable), read by ``FluoroEffects.with_overrides``."""
    ap.add_argument("--fluoro-effect", action="append", default=[], metavar="KEY=VALUE",
                    help="simulated fluoroscopy: change one effect's range (repeatable; simulate --fluoro-effect), "
                         "e.g. focal_sigma_px=0.1,0.4")


def main():
    from Fluoro2DRRLib.registration import RegistrationSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--seed", type=int, default=21, help="the simulated sequence (21: the one in README's tables)")
    ap.add_argument("--baseline-frames", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "registration"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="clean,fluoro,translated")
    ap.add_argument("--baseline-cases", default="clean,fluoro,translated",
                    help="cases that also run the naive baseline (about 11 minutes a frame on 2 CPU cores)")
    ap.add_argument("--translation", default="bundled",
                    help="model of the 'translated' case: bundled, or a model folder from 'fluoro2drr train'")
    ap.add_argument("--smooth-window", type=int, default=7,
                    help="also score the engine's poses smoothed over this many frames (1: off)")
    ap.add_argument("--outlier-rounds", type=int, default=RegistrationSettings().outlier_rounds,
                    help="RegistrationSettings.outlier_rounds of the engine (0: the plain objective on raw frames)")
    ap.add_argument("--restart-deg", type=float, default=RegistrationSettings().restart_rotation_deg,
                    help="RegistrationSettings.restart_rotation_deg: out-of-plane restarts on fluoroscopy frames (0: off)")
    ap.add_argument("--outlier-scale", type=float, default=RegistrationSettings().outlier_scale,
                    help="RegistrationSettings.outlier_scale (residuals this many robust sigmas weigh 1/2)")
    add_setting_option(ap)
    add_fluoro_effect_option(ap)
    ap.add_argument("--effects-per", choices=["frame", "sequence"], default="frame",
                    help="simulated fluoroscopy: effects drawn again per frame (default, the tables so far) or once "
                         "per sequence with fresh noise per frame (simulate --effects-per)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the 1024 x 1024 peak-memory check (its registration in a process of its own)")
    ap.add_argument("--reuse-cpu-buffers", choices=["on", "off"], default="on",
                    help="the memory check's RegistrationSettings.reuse_cpu_buffers (freed buffers kept for reuse)")
    ap.add_argument("--max-pixels-per-evaluation", type=int, default=RegistrationSettings().max_pixels_per_evaluation,
                    help="the memory check's RegistrationSettings.max_pixels_per_evaluation (0: every batch at once)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args.out, args.reuse_cpu_buffers == "on",
                            args.max_pixels_per_evaluation)
    from Fluoro2DRRLib.fluoro_sim import FluoroEffects
    from Fluoro2DRRLib.simulate import simulate_sequence

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subject = {"labelmap": str(LABELMAP)} if LABELMAP.exists() else {}
    subject_name = "knee MRI label map (../shared)" if subject else "procedural knee phantom"
    rows, details = [], {}
    if args.memory_only:
        memory_check(args, details)
        print(f"peak resident memory registering 1024 x 1024 frames: {details['peak_rss_gb_1024']:.2f} GB "
              f"(CPU buffer reuse {args.reuse_cpu_buffers}, max_pixels_per_evaluation "
              f"{args.max_pixels_per_evaluation})")
        return
    for case in args.cases.split(","):
        realism = "none" if case == "clean" else "fluoro"
        sim_dir = out / ("sim_clean" if realism == "none" else "sim_fluoro")  # raw and translated: same frames
        simulated = json.loads((sim_dir / "simulation.json").read_text()) if (sim_dir / "simulation.json").exists() \
            else {}
        if simulated.get("seed") != args.seed or case not in ("translated",) \
                or simulated.get("fluoro_effects_per", "frame") != args.effects_per \
                or simulated.get("fluoro_effect_ranges") != FluoroEffects().with_overrides(args.fluoro_effect).as_json():
            print(f"simulating {args.frames} {realism} frames of the {subject_name}", flush=True)
            simulate_sequence(sim_dir, n_frames=args.frames, seed=args.seed, realism=realism, image_size=256,
                              overwrite=True, progress=False, fluoro_effects_per=args.effects_per,
                              fluoro_effects=args.fluoro_effect, **subject)
        run_case(case, sim_dir, args, rows, details)
    if not args.skip_memory:
        memory_check(args, details)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'CPU'}"
    header = ("| run | s/frame (median) | femur in-plane mm med/p95 | out-of-plane mm | rotation deg | success % "
              "| tibia in-plane mm med/p95 | out-of-plane mm | rotation deg | success % |\n|" + "---|" * 10)
    lines = [f"Subject: {subject_name}; 256 x 256 detector; {machine}; torch {torch.__version__}"
             + (f"; translation model {args.translation}" if "translated" in args.cases.split(",") else "")
             + f"; sequence seed {args.seed}, fluoroscopy effects drawn per {args.effects_per}"
             + "".join(f", {item}" for item in args.fluoro_effect) + f"; raw frames re-weighted {args.outlier_rounds} rounds"
             f" (scale {args.outlier_scale:g}); out-of-plane restarts {args.restart_deg:g} deg"
             + "".join(f"; {item}" for item in args.setting) + ".", "",
             header]
    lines += [fmt_row(*r) for r in rows]
    lines.append("")
    for d in details.values():
        lines += d.get("flags", [])
    lines.append(f"Peak resident memory of this benchmark process: {peak_rss_gb():.2f} GB"
                 + (f"; of a two-frame 1024 x 1024 registration in its own process: {details['peak_rss_gb_1024']:.2f} GB"
                    if "peak_rss_gb_1024" in details else ""))
    table = "\n".join(lines)
    print("\n" + table)
    (out / "registration_benchmark.md").write_text(table + "\n")
    (out / "registration_benchmark.json").write_text(json.dumps(details, indent=2, default=float))


if __name__ == "__main__":
    sys.exit(main())

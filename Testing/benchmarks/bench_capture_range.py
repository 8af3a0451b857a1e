"""Capture range on simulated fluoroscopy: registration success against the initial offset, raw frames vs
frames translated by the bundled networks, from the same starts.

    .venv/bin/python Testing/benchmarks/bench_capture_range.py [--frames 3] [--trials 3]

Success: both bones' in-plane error below 1 mm. Each start is the truth moved by the offset in-plane and in
depth (random directions) and rotated by offset/2 degrees about a random axis; the engine runs its
first-frame refinement (no automatic start). Prints a table and writes it to --out.

    .venv/bin/python Testing/benchmarks/bench_capture_range.py --pool OUT1 OUT2 ... [--out DIR]

pools earlier runs (their capture_range.json): success over every start of every run, per offset and mode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_registration import add_fluoro_effect_option, add_setting_option  # run as a script: this folder is on sys.path

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


def table(rows: dict, offsets: list[float], modes=MODES) -> list[str]:
    """Markdown rows: per offset, each mode's success % and medians (``rows[(offset, mode)]``)."""
    lines = ["| initial offset (mm, deg = mm/2) | " + " | ".join(
                 f"{m}: success % | {m}: in-plane mm (median) | {m}: rotation deg (median)" for m in modes) + " |",
             "|---|" + "---|" * (3 * len(modes))]
    for offset in offsets:
        cells = [f"{rows[(offset, m)]['success_pct']:.0f} | {rows[(offset, m)]['in_plane_mm_median']:.2f} | "
                 f"{rows[(offset, m)]['rotation_deg_median']:.2f}" for m in modes]
        lines.append(f"| {offset:g} | " + " | ".join(cells) + " |")
    return lines


def pool(run_dirs: list[str], out: Path) -> None:
    """Success over every start of every run (from success_pct x n); medians over the runs' per-start values
    where a run stored them, else the median of the runs' medians (said in the caption)."""
    scenes: dict[str, dict] = {}  # a later run of the same scene replaces the modes it measured again
    for d in run_dirs:
        run = json.loads((Path(d) / "capture_range.json").read_text())
        scenes.setdefault(run.get("_scene", d), {}).update(run)
    runs = list(scenes.values())
    keys = {tuple(k.split("_", 1)) for r in runs for k in r if not k.startswith("_")}  # (offset, mode)
    keys = sorted(((float(o), m) for o, m in keys), key=lambda om: (om[0], MODES.index(om[1])))
    offsets = sorted({o for o, _ in keys})
    rows, per_start = {}, True
    for offset, mode in keys:
        have = [r[f"{offset}_{mode}"] for r in runs if f"{offset}_{mode}" in r]
        n = sum(h["n"] for h in have)
        ok = sum(h["success_pct"] / 100.0 * h["n"] for h in have)
        if all("in_plane_mm" in h for h in have):
            ip = np.median(np.concatenate([h["in_plane_mm"] for h in have]))
            rot = np.median(np.concatenate([h["rotation_deg"] for h in have]))
        else:
            per_start = False
            ip = np.median([h["in_plane_mm_median"] for h in have])
            rot = np.median([h["rotation_deg_median"] for h in have])
        rows[(offset, mode)] = {"success_pct": 100.0 * ok / n, "in_plane_mm_median": float(ip),
                                "rotation_deg_median": float(rot), "n": n}
    # the modes the runs measured (a run with --modes measures some): a mode missing at some offset is left out
    modes = [m for m in MODES if all((o, m) in rows for o in offsets)]
    lines = [f"Pooled over {len(runs)} scenes ({'; '.join(scenes)}; runs {', '.join(run_dirs)}); success over all their starts (n per offset: "
             + ", ".join(f"{o:g} mm {rows[(o, modes[0])]['n']}" for o in offsets) + "); medians "
             + ("over every start's bones." if per_start else "of the runs' medians (not every run stored its starts)."),
             ""] + table(rows, offsets, modes)
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_range_pooled.md").write_text(text + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--offsets", default="2,5,10,15,20")
    ap.add_argument("--strength", type=float, default=1.0, help="fluoroscopy effect strength")
    ap.add_argument("--seed", type=int, default=31, help="the simulated sequence (bench_registration.py's --seed)")
    add_fluoro_effect_option(ap)
    ap.add_argument("--effects-per", choices=["frame", "sequence"], default="frame",
                    help="fluoroscopy effects drawn per frame, or once per sequence (one scene, fresh noise)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--translation", default="bundled",
                    help="translation model: bundled, or a model folder from 'fluoro2drr train'")
    ap.add_argument("--modes", default=",".join(MODES), help="which of: " + ", ".join(MODES))
    add_setting_option(ap)
    ap.add_argument("--pool", nargs="+", metavar="RUN_DIR", help="pool earlier runs' results instead of running")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "capture_range"))
    args = ap.parse_args()
    if args.pool:
        return pool(args.pool, Path(args.out))
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: each of {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.evaluate import pose_errors
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.registration import (Registrar, RegistrationSettings, polish_on_raw_frame, prepare_frame,
                                            prepare_translated_frame, sequence_polarity)
    from Fluoro2DRRLib.simulate import simulate_sequence
    from Fluoro2DRRLib.translation.inference import Translator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = out / "sim"
    subject = {"labelmap": str(LABELMAP)} if LABELMAP.exists() else {}
    simulate_sequence(sim, n_frames=args.frames, seed=args.seed, realism="fluoro", image_size=256, overwrite=True,
                      progress=False, fluoro_strength=args.strength, fluoro_effects_per=args.effects_per,
                      fluoro_effects=args.fluoro_effect, **subject)
    geometry = load_calibration(sim / "calibration.json")
    bones = {n: bone_from_mesh_file(sim / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
    truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
    frames = load_frames(sim / "frames").frames
    t0 = time.time()
    translated = Translator.for_option(args.translation, "cpu").translate(frames)
    translate_s = (time.time() - t0) / len(frames)
    polarity = sequence_polarity(frames)  # decided once for the sequence, as register_sequence does
    raw = [prepare_frame(f, polarity) for f in frames]
    prepared = {"raw": raw,
                "translated": [prepare_translated_frame(f, t, fov=r[1]) for f, t, r in zip(frames, translated, raw)]}
    registrar = Registrar(geometry, bones, RegistrationSettings().with_overrides(args.setting))
    offsets = [float(o) for o in args.offsets.split(",")]
    rows = {}
    for offset in offsets:
        for mode in modes:
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
                                    "rotation_deg_median": float(np.median(rot)), "n": len(success),
                                    "in_plane_mm": in_plane, "rotation_deg": rot}
            print(offset, mode, {k: v for k, v in rows[(offset, mode)].items() if not isinstance(v, list)}, flush=True)
    # a changed effect range is another scene: --pool must not take one run's modes for the other's
    scene = f"seed {args.seed}, effects drawn per {args.effects_per}" + "".join(f", {e}" for e in args.fluoro_effect)
    settings_text = f"; settings {', '.join(args.setting)}" if args.setting else ""
    lines = [f"Simulated fluoroscopy (strength {args.strength}, {scene}), "
             f"{'knee MRI label map' if subject else 'procedural phantom'}, "
             f"{len(frames)} frames x {args.trials} starts per offset; translation model {args.translation}, "
             f"{translate_s:.2f} s/frame{settings_text}.", ""] + table(rows, offsets, modes)
    text = "\n".join(lines)
    print("\n" + text)
    (out / "capture_range.md").write_text(text + "\n")
    (out / "capture_range.json").write_text(json.dumps({"_scene": scene, **{f"{o}_{m}": v for (o, m), v in rows.items()}},
                                                       indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""Automatic-start benchmark: the first frame's seconds and errors for each setting of the automatic start.

    .venv/bin/python Testing/benchmarks/bench_auto_start.py [--seeds 22,23,24] [--frames 0,10] \
        [--kept "none;0,3"] [--variants "default;start_iterations=80,20,15"] [--threads 1]

Each chosen frame of each simulated sequence (bench_registration.py's: the knee MRI label map in ../shared/data when
present, the procedural phantom otherwise; full-strength fluoroscopy, 256 x 256) is registered alone, as a first
frame: the product's whole first-frame path (run_registration with the bundled translation: automatic start,
raw-frame polish, out-of-plane restarts) from bench_registration's far default drawn about that frame's truth.
``--kept``: values of RegistrationSettings.auto_candidates_kept_per_level ("none": every pair on every level, the
baseline; "0,3": all after the coarsest level, 3 after the next). ``--variants`` instead: any RegistrationSettings
fields, "name=v1,v2" joined by "+" ("default": the settings as they are). Every setting registers a frame before the
next frame is taken, so a load that changes during the run falls on all of them alike. Prints per frame and per
setting, with each setting's seconds as a ratio of the first setting's, measured in this run; writes markdown to --out.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_registration import LABELMAP, ROOT, far_default  # noqa: E402


def _value(text: str):
    """"none" -> None; "true" / "false" -> a bool; "80,20,15" -> a tuple; "2.4" -> a number; else the text."""
    if text == "none":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    parts = []
    for part in text.split(","):
        try:
            parts.append(int(part))
        except ValueError:
            try:
                parts.append(float(part))
            except ValueError:
                parts.append(part)
    return tuple(parts) if "," in text else parts[0]


def _overrides(variant: str) -> dict:
    """"default" -> {}; "start_iterations=80,20,15+auto_candidates=2" -> {field: value}."""
    if variant == "default":
        return {}
    out = {}
    for item in variant.split("+"):
        name, _, text = item.partition("=")
        value = _value(text)
        if name == "auto_candidates_kept_per_level" and value is not None and not isinstance(value, tuple):
            value = (value,)
        out[name] = value
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="22,23,24")
    ap.add_argument("--frames", default="0,10", help="frames of each sequence registered as first frames")
    ap.add_argument("--n-frames", type=int, default=20, help="length of each simulated sequence")
    ap.add_argument("--kept", default="none;0,3",
                    help="auto_candidates_kept_per_level values separated by ';' (the first is the baseline)")
    ap.add_argument("--variants", default=None,
                    help="settings separated by ';', each 'default' or field=value joined by '+' (replaces --kept)")
    ap.add_argument("--effects-per", choices=["frame", "sequence"], default="sequence")
    ap.add_argument("--success-mm", type=float, default=1.0)
    ap.add_argument("--success-deg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "auto_start"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.evaluate import pose_errors
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.pipeline import run_registration
    from Fluoro2DRRLib.registration import RegistrationSettings
    from Fluoro2DRRLib.simulate import simulate_sequence

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subject = {"labelmap": str(LABELMAP)} if LABELMAP.exists() else {}
    if args.variants:
        settings_text = args.variants.split(";")
    else:
        settings_text = [f"auto_candidates_kept_per_level={k}" for k in args.kept.split(";")]
    for text in settings_text:  # a misspelt field fails here, not after an hour of the others
        for name in _overrides(text):
            if not hasattr(RegistrationSettings(), name):
                ap.error(f"RegistrationSettings has no field {name!r} (in {text!r})")
    frames_wanted = [int(f) for f in args.frames.split(",")]
    rows = []  # (seed, frame, kept, seconds, similarity, {bone: errors})
    for seed in (int(s) for s in args.seeds.split(",")):
        sim = out / f"sim_seed{seed}"
        if not (sim / "simulation.json").exists():
            print(f"simulating sequence seed {seed}", flush=True)
            simulate_sequence(sim, n_frames=args.n_frames, seed=seed, realism="fluoro", image_size=256, overwrite=True,
                              progress=False, fluoro_effects_per=args.effects_per, **subject)
        geometry = load_calibration(sim / "calibration.json")
        bones = {n: bone_from_mesh_file(sim / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
        truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
        frames = load_frames(sim / "frames").frames
        for f in frames_wanted:
            truth_f = {n: truth[n][f:f + 1] for n in truth}
            default = far_default(truth_f, bones, geometry, np.random.default_rng(11 + f))
            for text in settings_text:
                settings = RegistrationSettings(**_overrides(text))
                tag = "".join(c if c.isalnum() else "-" for c in text)
                run_dir = out / f"run_seed{seed}_frame{f}_{tag}"
                shutil.rmtree(run_dir, ignore_errors=True)  # this run's own output, from an earlier run
                t0 = time.time()
                result = run_registration(frames[f:f + 1], geometry, bones, run_dir, None, "bundled", progress=False,
                                          default_poses=default, settings=settings)
                seconds = time.time() - t0
                errors = {n: {k: float(v[0]) for k, v in pose_errors(result.poses[n][:1], truth_f[n],
                                                                     bones[n].centroid_mm, geometry).items()}
                          for n in bones}
                rows.append((seed, f, text, seconds, float(result.quality[0]["similarity"]), errors))
                e = errors
                print(f"seed {seed} frame {f} {text}: {seconds:.1f} s, similarity {rows[-1][4]:.4f}, femur "
                      f"{e['femur']['in_plane_mm']:.2f} mm / {e['femur']['rotation_deg']:.1f} deg, tibia "
                      f"{e['tibia']['in_plane_mm']:.2f} mm / {e['tibia']['rotation_deg']:.1f} deg", flush=True)

    def hit(e):
        return e["in_plane_mm"] < args.success_mm and e["rotation_deg"] < args.success_deg

    machine = f"{platform.machine()}, {args.threads} torch thread(s), {platform.processor() or 'CPU'}"
    lines = [f"Automatic start, first frame alone ({'knee MRI label map' if subject else 'procedural phantom'}, "
             f"256 x 256, translated, effects per {args.effects_per}); {machine}; torch {torch.__version__}.", "",
             "| seed | frame | setting | seconds | similarity | femur in-plane mm / deg "
             "| tibia in-plane mm / deg |", "|---|---|---|---|---|---|---|"]
    for seed, f, text, seconds, sim_value, e in rows:
        lines.append(f"| {seed} | {f} | {text} | {seconds:.1f} | {sim_value:.4f} | "
                     f"{e['femur']['in_plane_mm']:.2f} / {e['femur']['rotation_deg']:.1f} | "
                     f"{e['tibia']['in_plane_mm']:.2f} / {e['tibia']['rotation_deg']:.1f} |")
    lines += ["", f"| setting | mean seconds | ratio to {settings_text[0]} | bone-frames within "
              f"{args.success_mm:g} mm and {args.success_deg:g} deg |", "|---|---|---|---|"]
    base = np.mean([r[3] for r in rows if r[2] == settings_text[0]])
    for text in settings_text:
        mine = [r for r in rows if r[2] == text]
        seconds = float(np.mean([r[3] for r in mine]))
        hits = sum(hit(e) for r in mine for e in r[5].values())
        lines.append(f"| {text} | {seconds:.1f} | {seconds / base:.2f}x | {hits} of {2 * len(mine)} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "auto_start_benchmark.md").write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())

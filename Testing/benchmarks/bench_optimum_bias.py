"""Where the similarity's optimum lies: registration started from the TRUE pose, frame by frame.

    .venv/bin/python Testing/benchmarks/bench_optimum_bias.py [--frames 20] [--threads 1]

A registration that starts at the truth and walks away from it shows that the image (and the similarity
computed on it), not the search, limits accuracy. Same simulated knee sequence as bench_registration.py
(seed 21, the real knee MRI label map when ../shared is there), each frame registered from its true poses
with the tracking settings on:

* clean DRR frames;
* raw simulated fluoroscopy (full strength);
* the same frames translated by the bundled networks, compared in line integrals (-log of the output,
  ``translated_space="log"``) and in the networks' output space (``"target"``);
* translated (target space), then polished on the raw frame unless the translated frame disagrees (the
  product's default path).

Prints median / 95th percentile in-plane, signed out-of-plane and rotation errors per input, and the share
of frames whose similarity at the found pose beats the similarity at the truth (1.0: the optimiser did its
job and the objective's optimum is elsewhere). Writes the table to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench_registration import add_setting_option  # run as a script: this folder is on sys.path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Fluoro2DRR"))
LABELMAP = ROOT.parent / "shared" / "data" / "knee_mri_labels" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"
INPUTS = ("clean DRR", "raw fluoroscopy", "translated (log space)", "translated (target space)",
          "translated + raw polish")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--translation", default="bundled",
                    help="translation model: bundled, or a model folder from 'fluoro2drr train'")
    ap.add_argument("--seed", type=int, default=21, help="the simulated sequence (bench_registration.py's --seed)")
    ap.add_argument("--effects-per", choices=["frame", "sequence"], default="frame",
                    help="fluoroscopy effects drawn per frame, or once per sequence (one scene, fresh noise)")
    ap.add_argument("--inputs", default=",".join(str(i) for i in range(len(INPUTS))),
                    help="which rows, by number: " + ", ".join(f"{i} {n}" for i, n in enumerate(INPUTS)))
    add_setting_option(ap)
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "optimum_bias"))
    args = ap.parse_args()
    inputs = [INPUTS[int(i)] for i in args.inputs.split(",")]
    torch.set_num_threads(args.threads)
    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.evaluate import pose_errors
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.registration import (Registrar, RegistrationSettings, polish_dissimilarity_ratios,
                                            prepare_frame, prepare_translated_frame)
    from Fluoro2DRRLib.simulate import simulate_sequence
    from Fluoro2DRRLib.translation.inference import Translator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subject = {"labelmap": str(LABELMAP)} if LABELMAP.exists() else {}
    sims = {}
    for realism in ("none", "fluoro"):
        sims[realism] = out / f"sim_{realism}"
        if not (sims[realism] / "simulation.json").exists():
            simulate_sequence(sims[realism], n_frames=args.frames, seed=args.seed, realism=realism, image_size=256,
                              overwrite=True, progress=False, fluoro_effects_per=args.effects_per, **subject)
    sim = sims["fluoro"]
    geometry = load_calibration(sim / "calibration.json")
    bones = {n: bone_from_mesh_file(sim / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
    truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
    frames = {r: load_frames(d / "frames").frames for r, d in sims.items()}
    translated = Translator.for_option(args.translation, "cpu").translate(frames["fluoro"])
    registrars = {space: Registrar(geometry, bones,
                                   RegistrationSettings(translated_space=space).with_overrides(args.setting))
                  for space in ("log", "target")}
    errors = {name: {"in_plane_mm": [], "out_of_plane_signed_mm": [], "rotation_deg": []} for name in inputs}
    beats_truth = {name: [] for name in inputs}
    polish_detail = []  # per frame: each bone's error on the translated frame and after the polish, and the ratios
    for k in range(len(truth["femur"])):
        start = {n: truth[n][k] for n in truth}
        raw = prepare_frame(frames["fluoro"][k])
        trans = prepare_translated_frame(frames["fluoro"][k], translated[k], fov=raw[1])
        for name in inputs:
            reg = registrars["log" if "log" in name else "target"]  # the polish row: the product's default
            image, fov, info = prepare_frame(frames["none"][k]) if name == "clean DRR" else \
                raw if name == "raw fluoroscopy" else trans
            found, *_ = reg.register_frame(image, fov, start, False, True, info["polarity"])
            if name == "translated + raw polish":  # registration.polish_on_raw_frame, step by step
                polished, *_ = reg.register_frame(raw[0], raw[1], found, False, True, raw[2]["polarity"])
                ratios = polish_dissimilarity_ratios(reg, trans, found, polished)
                rot = {}
                for n in truth:
                    for label, pose in (("translated", found), ("polished", polished)):
                        e = pose_errors(pose[n][None], truth[n][k:k + 1], bones[n].centroid_mm, geometry)
                        rot[f"{n}_{label}"] = {key: float(e[key][0]) for key in ("in_plane_mm", "rotation_deg")}
                polish_detail.append({"frame": k, "ratios": ratios, "errors": rot})
                print(f"  polish frame {k}: ratios " + ", ".join(f"{n} {v:.2f}" for n, v in ratios.items()) + "; " +
                      ", ".join(f"{n} {v['rotation_deg']:.2f} deg" for n, v in rot.items()), flush=True)
                if ratios["all"] <= reg.settings.polish_max_dissimilarity_ratio:
                    found = polished
                image, fov, info = raw
            beats_truth[name].append(reg.similarity_at(image, fov, found, info["polarity"]) >
                                     reg.similarity_at(image, fov, start, info["polarity"]))
            for n in truth:
                e = pose_errors(found[n][None], truth[n][k:k + 1], bones[n].centroid_mm, geometry)
                for key in errors[name]:
                    errors[name][key].append(float(e[key][0]))
        print(f"frame {k}: " + "; ".join(f"{name} rot {errors[name]['rotation_deg'][-1]:.2f}" for name in inputs),
              flush=True)
    lines = [f"Registration started from the true poses, {args.frames} frames x 2 bones, "
             f"{'knee MRI label map' if subject else 'procedural phantom'}, 256 px, tracking settings; seed {args.seed}, "
             f"effects per {args.effects_per}; translation model {args.translation}"
             + "".join(f"; {item}" for item in args.setting) + ".", "",
             "| input | in-plane mm med / p95 | out-of-plane mm (signed) median, |median| | rotation deg med / p95 "
             "| found pose scores above the truth |", "|---|---|---|---|---|"]
    for name in inputs:
        e = {k: np.asarray(v) for k, v in errors[name].items()}
        lines.append(f"| {name} | {np.median(e['in_plane_mm']):.2f} / {np.percentile(e['in_plane_mm'], 95):.2f} | "
                     f"{np.median(e['out_of_plane_signed_mm']):+.1f}, {np.median(np.abs(e['out_of_plane_signed_mm'])):.1f} | "
                     f"{np.median(e['rotation_deg']):.2f} / {np.percentile(e['rotation_deg'], 95):.2f} | "
                     f"{100 * np.mean(beats_truth[name]):.0f} % |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "optimum_bias.md").write_text(table + "\n")
    (out / "optimum_bias.json").write_text(json.dumps({"errors": errors, "beats_truth": beats_truth,
                                                                     "polish_detail": polish_detail}, indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""Image quality of a translation model on held-out simulated frames: raw input, stage 1, stages 1 + 2.

    .venv/bin/python Testing/benchmarks/eval_translation.py [--model-dir Resources/Models] [--n 16]

Held-out sets (none of them seen in training):
* "phantoms": DiffDRR renders of procedural knee phantoms with seeds 5000+ (training used 1000-1015);
* "MRI knee": DiffDRR renders of the real knee MRI label map in ../shared/data (an unseen bone shape;
  skipped when ../shared is absent);
* "2-D procedural": the analytic 2-D source (a different kind of image altogether).
Each frame goes through the fluoroscopy simulator at a random strength in [0.6, 1.2] with seeds [777777, k],
with the training pairs' effect ranges (``translation.data.training_effects``: the wider focal blur) or, with
``--effects simulator``, the simulator's defaults (what the registration benchmarks draw).
Metrics against the clean DRR target: PSNR (dB), SSIM, NCC over the image, and NCC / mean absolute error
inside the image-intensifier field (outside it the target still shows bone that the frame cannot).
Prints a table and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
LABELMAP = ROOT.parent / "shared" / "data" / "knee_mri_labels" / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd"


class LabelMapSource:
    """Line integrals of a knee label map's femur and tibia in the simulator's squat motion."""

    def __init__(self, labelmap, image_size=256):
        from Fluoro2DRRLib.geometry import knee_default_geometry
        from Fluoro2DRRLib.render import TwoBoneRenderer
        from Fluoro2DRRLib.simulate import load_subject

        self.geometry = knee_default_geometry().resized(image_size)
        bones, self.knee_from_femur, self.knee_from_tibia, self.centre, _ = load_subject(
            0, labelmap, 5, 6, None, None, "auto", "mm", 0.6)
        self.renderer = TwoBoneRenderer(self.geometry, [bones["femur"], bones["tibia"]])

    def sample(self, rng, size=256):
        from Fluoro2DRRLib.phantom import knee_motion

        g = self.geometry
        depth = float(rng.uniform(0.72, 0.92)) * g.source_to_detector_mm
        poses = knee_motion(8, g.world_from_source, depth, self.knee_from_femur, self.knee_from_tibia, self.centre,
                            int(rng.integers(1 << 30)), float(rng.uniform(20, 90)))
        j = int(rng.integers(8))
        with torch.inference_mode():
            li = self.renderer(torch.as_tensor(np.stack([poses["femur"][j], poses["tibia"][j]])[None],
                                               dtype=torch.float32))[0]
        return li.numpy()


def field_metrics(pred, target, fov):
    """NCC and mean absolute error inside the field of view, per image."""
    out_ncc, out_mae = [], []
    for p, t, m in zip(pred, target, fov):
        p, t = p[m > 0.5], t[m > 0.5]
        pc, tc = p - p.mean(), t - t.mean()
        out_ncc.append(float((pc * tc).sum() / max(np.linalg.norm(pc) * np.linalg.norm(tc), 1e-8)))
        out_mae.append(float(np.abs(p - t).mean()))
    return float(np.mean(out_ncc)), float(np.mean(out_mae))


def held_out_sets(n: int, effects=None) -> dict:
    """``{set name: (frames, targets, field-of-view masks)}``, ``n`` simulated frames per set, 256 px, simulated
    with ``effects`` (None: the training pairs')."""
    from Fluoro2DRRLib.fluoro_sim import clean_drr_target, simulate_fluoroscopy
    from Fluoro2DRRLib.metrics import field_of_view_mask
    from Fluoro2DRRLib.translation.data import DRRSource, Procedural2DKneeSource, training_effects

    sources = {"phantoms (seeds 5000+)": DRRSource(n_phantoms=4, first_phantom_seed=5000)}
    if LABELMAP.exists():
        sources["MRI knee (../shared)"] = LabelMapSource(LABELMAP)
    sources["2-D procedural"] = Procedural2DKneeSource()
    effects = training_effects() if effects is None else effects
    sets = {}
    for name, source in sources.items():
        frames, targets = [], []
        for k in range(n):
            rng = np.random.default_rng([777777, k])
            li = source.sample(rng, 256)
            frames.append(simulate_fluoroscopy(li, rng, effects, float(rng.uniform(0.6, 1.2))))
            targets.append(clean_drr_target(li))
        frames, targets = np.stack(frames).astype(np.float32), np.stack(targets).astype(np.float32)
        fov = np.stack([np.asarray(field_of_view_mask(f), np.float32) for f in frames])
        sets[name] = (frames, targets, fov)
    return sets


def evaluate(outputs: dict, targets, fov) -> dict:
    """``{label: metrics}`` for ``{label: (N, H, W) images}`` against the clean targets."""
    from Fluoro2DRRLib.translation.train import image_metrics

    t = torch.from_numpy(targets)[:, None]
    results = {}
    for label, img in outputs.items():
        m = image_metrics(torch.from_numpy(img)[:, None].float(), t)
        m["ncc_field"], m["mae_field"] = field_metrics(img, targets, fov)
        results[label] = m
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--n", type=int, default=16, help="frames per held-out set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--effects", choices=("training", "simulator"), default="training",
                    help="the frames' effect ranges: the training pairs' (default) or the simulator's defaults "
                         "(the registration benchmarks' scenes)")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "translation_eval"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from Fluoro2DRRLib.fluoro_sim import FluoroEffects
    from Fluoro2DRRLib.translation.data import robust_normalize, training_effects
    from Fluoro2DRRLib.translation.inference import Translator

    tr = Translator.load(args.model_dir, device="cpu")
    rows, results = [], {}
    effects = training_effects() if args.effects == "training" else FluoroEffects()
    for name, (frames, targets, fov) in held_out_sets(args.n, effects).items():
        # the raw frame in [0, 1] as the networks see it (bone dark on bright, like the target)
        outputs = {"raw frame": np.stack([robust_normalize(f) for f in frames]),
                   "stage 1": tr.translate(frames, stage="1"), "stages 1 + 2": tr.translate(frames, stage="both")}
        results[name] = evaluate(outputs, targets, fov)
        for label, m in results[name].items():
            rows.append(f"| {name} | {label} | {m['psnr']:.1f} | {m['ssim']:.3f} | {m['ncc']:.3f} | "
                        f"{m['ncc_field']:.3f} | {m['mae_field']:.3f} |")
            print(rows[-1], flush=True)
    table = "\n".join([f"Held-out simulated frames, {args.n} per set, 256 px, {args.effects} effects (focal blur {effects.focal_sigma_px[0]:g}-{effects.focal_sigma_px[1]:g} px); model: {args.model_dir or 'bundled (Resources/Models)'}.", "",
                       "| held-out set | output | PSNR dB | SSIM | NCC | NCC in field | MAE in field |",
                       "|---|---|---|---|---|---|---|", *rows])
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "translation_eval.md").write_text(table + "\n")
    (out / "translation_eval.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())

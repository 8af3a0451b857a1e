"""Ablation of the translation recipe: each loss term off, stage 2 off, each stage-2 backbone.

    .venv/bin/python Testing/benchmarks/ablate_translation.py [--epochs 10] [--stage2-epochs 4]
        [--cache DIR] [--bundled-run DIR] [--only NAME,NAME] [--out DIR]

Two parts, both measured on the held-out sets of ``eval_translation.py`` (unseen phantoms, the unseen MRI
knee when ../shared is there; 16 frames each) against the clean DRR target:

* Loss terms (stage 1 only): the bundled recipe ("all terms") and one variant per term -- L1, SSIM,
  perceptual, segmentation, adversarial switched off, and the edge / gradient term (weight 0 in the
  bundled recipe) switched on -- each trained from scratch with the same seed, the same training pairs and
  the same short budget (``--epochs`` x 100 steps, constant learning rate; the best validation epoch is
  kept, as in the real recipe); "all terms" is trained twice (seeds 0 and 1) to show the noise of so short a
  budget. The bundled model had 52 epochs; a CPU cannot afford that per variant,
  so these compare recipes at an equal, short budget, not the bundled weights.
* Stage 2: on top of the bundled (converged) stage-1 generator, no stage 2, and each backbone (DRUNet,
  SR-ResNet, NAFNet) trained for ``--stage2-epochs`` x 100 steps on the same stage-1 outputs.

``--cache``: a training cache (``train.npz`` / ``val.npz``) made by ``fluoro2drr train`` with the bundled
config (reused: rendering the 672 pairs takes about 10 CPU-minutes); built here when absent.
``--bundled-run``: the output folder of the bundled model's training (its ``checkpoints/`` hold the
stage-1 generator the stage-2 part starts from); without it the stage-2 part trains on this run's
"all terms" stage 1 instead. Prints a table and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Fluoro2DRR"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_translation import evaluate, held_out_sets  # noqa: E402

BUNDLED_CONFIG = ROOT / "Resources" / "Models" / "translation_config.json"
LOSS_VARIANTS = {  # name -> stage-1 loss weights changed from the bundled recipe
    "all terms (bundled recipe)": {},
    "all terms, another seed": {"_seed": 1},  # the spread between these two rows is the noise of this budget
    "no L1": {"l1": 0.0},
    "no SSIM": {"ssim": 0.0},
    "no perceptual": {"perceptual": 0.0},
    "no segmentation": {"seg": 0.0},
    "no adversarial": {"adv": 0.0},
    "+ edge / gradient (0.2)": {"gradient": 0.2},
}
BACKBONES = {  # name -> stage-2 network (None: stage 2 off)
    "stage 2 off": None,
    "DRUNet (bundled)": ("drunet", {"channels": [16, 32, 64, 128], "n_blocks": 2, "noise_level": 0.02}),
    "SR-ResNet": ("srresnet", {"width": 32, "n_blocks": 6, "noise_level": 0.02}),
    "NAFNet": ("nafnet", {"width": 24, "n_blocks": 2, "noise_level": 0.02}),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def share_cache(cache: Path, run_dir: Path):
    (run_dir / "cache").mkdir(parents=True, exist_ok=True)
    for f in ("train.npz", "val.npz"):
        dst = run_dir / "cache" / f
        if not dst.exists() and (cache / f).exists():
            dst.symlink_to((cache / f).resolve())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="stage-1 epochs (100 steps each) per loss variant")
    ap.add_argument("--stage2-epochs", type=int, default=4)
    ap.add_argument("--cache", default=str(ROOT / "bench_out" / "translation_drr" / "cache"))
    ap.add_argument("--bundled-run", default=str(ROOT / "bench_out" / "translation_drr"))
    ap.add_argument("--only", default=None, help="comma-separated variant names (slugs) to run")
    ap.add_argument("--n", type=int, default=16, help="held-out frames per set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "ablation"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from Fluoro2DRRLib.translation.data import robust_normalize
    from Fluoro2DRRLib.translation.inference import Translator
    from Fluoro2DRRLib.translation.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = json.loads(BUNDLED_CONFIG.read_text())
    base_cfg["time_budget_min"] = {"stage1": None, "stage2": None}
    cache = Path(args.cache)
    only = set(args.only.split(",")) if args.only else None
    print(f"held-out sets ({args.n} frames each)", flush=True)
    sets = held_out_sets(args.n)
    results_path = out / "ablation.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(part, name, tr, stage, minutes):
        res = {}
        for set_name, (frames, targets, fov) in sets.items():
            if set_name.startswith("2-D"):
                continue
            res[set_name] = evaluate({"out": tr.translate(frames, stage=stage)}, targets, fov)["out"]
        results.setdefault(part, {})[name] = {"metrics": res, "train_minutes": round(minutes, 1)}
        results_path.write_text(json.dumps(results, indent=2))
        print(name, {k: round(v["ncc"], 3) for k, v in res.items()}, flush=True)

    if "raw" not in results:
        results["raw"] = {s: evaluate({"raw": np.stack([robust_normalize(f) for f in fr])}, t, fv)["raw"]
                          for s, (fr, t, fv) in sets.items() if not s.startswith("2-D")}

    # ---- loss terms: stage 1 from scratch, equal budget
    for name, change in LOSS_VARIANTS.items():
        if (only and slug(name) not in only) or name in results.get("loss", {}):
            continue
        cfg = copy.deepcopy(base_cfg)
        cfg["stage1"]["epochs"] = args.epochs
        cfg["stage1"].pop("lr_schedule", None)
        cfg["seed"] = change.get("_seed", cfg["seed"])
        cfg["stage1"]["weights"] = {**cfg["stage1"]["weights"], **{k: v for k, v in change.items() if k != "_seed"}}
        cfg["stage2"]["epochs"] = 0
        run_dir = out / slug(name)
        share_cache(cache, run_dir)
        t0 = time.time()
        print(f"training stage 1: {name}", flush=True)
        train(cfg, run_dir, device="cpu", resume=True, progress=False)
        record("loss", name, Translator.load(run_dir, device="cpu", stage="1"), "1", (time.time() - t0) / 60)

    # ---- stage 2: backbones on the bundled stage-1 generator
    s1_run = Path(args.bundled_run)
    if not (s1_run / "checkpoints" / "stage1_best.pt").exists():
        s1_run = out / slug("all terms (bundled recipe)")
    for name, backbone in BACKBONES.items():
        if (only and slug(name) not in only) or name in results.get("stage2", {}):
            continue
        run_dir = out / ("stage2_" + slug(name))
        share_cache(cache, run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        for f in ("stage1.ckpt", "stage1_best.pt"):  # resume past stage 1: only stage 2 trains
            shutil.copy(s1_run / "checkpoints" / f, run_dir / "checkpoints" / f)
        s1_metrics = json.loads((s1_run / "metrics.json").read_text())
        done = torch.load(run_dir / "checkpoints" / "stage1.ckpt", map_location="cpu", weights_only=False)["epoch"]
        (run_dir / "metrics.json").write_text(json.dumps(
            {"history": [], "params": s1_metrics.get("params", {}), "stage1_best": s1_metrics["stage1_best"]}))
        cfg = copy.deepcopy(base_cfg)
        cfg["stage1"]["epochs"] = done + 1
        if backbone is None:
            cfg["stage2"]["epochs"] = 0
        else:
            cfg["stage2"].update(name=backbone[0], kwargs=backbone[1], epochs=args.stage2_epochs)
        t0 = time.time()
        print(f"training stage 2: {name}", flush=True)
        train(cfg, run_dir, device="cpu", resume=True, progress=False)
        stage = "1" if backbone is None else "both"
        record("stage2", name, Translator.load(run_dir, device="cpu", stage=stage), stage, (time.time() - t0) / 60)

    # ---- table
    set_names = list(results["raw"])
    head = "| part | variant | train min | " + " | ".join(f"{s}: PSNR dB / SSIM / NCC" for s in set_names) + " |"
    lines = [f"Translation ablation: loss terms at an equal short budget ({args.epochs} stage-1 epochs x 100 steps "
             f"from scratch, stage 1 only); stage-2 backbones ({args.stage2_epochs} epochs) on the bundled stage 1. "
             f"Held-out simulated frames, {args.n} per set, 256 px, CPU.", "", head, "|" + "---|" * (3 + len(set_names))]

    def cells(m):
        return " | ".join(f"{m[s]['psnr']:.1f} / {m[s]['ssim']:.3f} / {m[s]['ncc']:.3f}" for s in set_names)

    lines.append(f"| input | raw frame | - | {cells(results['raw'])} |")
    for part, order in (("loss", LOSS_VARIANTS), ("stage2", BACKBONES)):
        for name in [v for v in order if v in results.get(part, {})]:
            r = results[part][name]
            label = name
            models_json = out / ("stage2_" + slug(name)) / "models.json"
            if part == "stage2" and models_json.exists() and "stage2" in json.loads(models_json.read_text())["models"]:
                label += f" ({json.loads(models_json.read_text())['models']['stage2']['parameters'] / 1e6:.2f} M parameters)"
            lines.append(f"| {'loss terms' if part == 'loss' else 'stage 2'} | {label} | {r['train_minutes']} | "
                         f"{cells(r['metrics'])} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "ablation.md").write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())

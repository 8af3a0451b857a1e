"""CLI sub-commands ``fluoro2drr train`` and ``fluoro2drr translate`` (registered by ``cli.py``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _default_config() -> Path:
    from .inference import model_dir_candidates
    for d in model_dir_candidates():
        if (d / "translation_config.json").is_file():
            return d / "translation_config.json"
    return model_dir_candidates()[0] / "translation_config.json"


def add_train_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train the fluoroscopy-to-DRR translation model",
        description="Train stage 1 (U-Net GAN) and stage 2 (slim DRUNet) on simulated pairs; optionally "
                    "fine-tune on real frames paired with DRRs rendered at known poses.")
    p.add_argument("--config", default=None, help="training config JSON (default: the bundled "
                                                  "Resources/Models/translation_config.json)")
    p.add_argument("--out", default="translation_model", help="output folder (weights, models.json, "
                                                              "checkpoints, validation grids, metrics)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--paired-frames", default=None, help="real frames (folder or glob) for fine-tuning")
    p.add_argument("--calibration", default=None, help="calibration of the paired frames")
    p.add_argument("--femur", default=None, help="femur mesh (STL/OBJ/VTK) of the paired subject")
    p.add_argument("--tibia", default=None, help="tibia mesh of the paired subject")
    p.add_argument("--poses", default=None, help="poses CSV (fluoro2drr format, world_from_bone, both bones) "
                                                 "of the paired frames")
    p.add_argument("--init-from", default=None, metavar="bundled|MODEL_DIR",
                   help="fine-tune this trained model on the paired frames (only the fine-tuning epochs: "
                        "minutes) instead of training from scratch on simulated pairs first")
    p.add_argument("--continue-simulated", action="store_true",
                   help="with --init-from: run the config's simulated epochs from that model's weights (more "
                        "training, or a new data recipe such as data.drr.shape_variety, without starting over)")
    p.set_defaults(func=run_train)
    return p


def _paired_dataset(args, size: int):
    from ..errors import InputError

    need = {"--calibration": args.calibration, "--femur": args.femur, "--tibia": args.tibia,
            "--poses": args.poses}
    missing = [k for k, v in need.items() if not v]
    if missing:
        raise InputError("--paired-frames", "fine-tuning on real frames needs " + ", ".join(missing))
    try:
        from .. import render  # noqa: F401
    except ImportError as exc:
        raise InputError("--paired-frames", f"fine-tuning needs the DRR renderer ({exc})") from exc
    from .. import bones as bones_mod
    from ..calibration_io import load_calibration
    from ..frames_io import load_frames
    from ..pose_io import read_poses_csv
    from .data import PairedDRRDataset

    stack = load_frames(args.paired_frames)
    geometry = load_calibration(args.calibration, image_size=stack.size)
    femur = bones_mod.bone_from_mesh_file(args.femur, "femur")
    tibia = bones_mod.bone_from_mesh_file(args.tibia, "tibia")
    poses = read_poses_csv(args.poses)
    for name in ("femur", "tibia"):
        if name not in poses:
            raise InputError(args.poses, f"has no {name} poses")
    return PairedDRRDataset(stack.frames, geometry, [femur, tibia], poses, size)


def run_train(args) -> int:
    from .train import merge_config, train

    cfg = merge_config(args.config or _default_config())
    paired = _paired_dataset(args, cfg["image_size"]) if args.paired_frames else None
    metrics = train(cfg, args.out, device=args.device, resume=args.resume, paired=paired, init_from=args.init_from,
                    continue_simulated=args.continue_simulated)
    print(json.dumps(metrics.get("final_val", {}), indent=2))
    print(f"model written to {Path(args.out).resolve()} (stage1.pt, stage2.pt, models.json)")
    return 0


def add_translate_parser(subparsers):
    p = subparsers.add_parser(
        "translate", help="translate fluoroscopy frames into DRR-like images",
        description="Write one 16-bit TIFF per input frame (same names) with the DRR-like translation "
                    "(background white, bone dark: exp(-summed bone line integral / 30)).")
    p.add_argument("--frames", required=True, help="folder, glob or file of frames")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None,
                   help="frames per network pass (default: 8 on the CPU, 32 on CUDA)")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    p.add_argument("--model-dir", default=None, help="model folder (default: bundled Resources/Models)")
    p.set_defaults(func=run_translate)
    return p


def _out_names(paths: list[str], n: int) -> list[str]:
    names = [Path(p).stem for p in paths] if len(paths) == n else [f"frame_{i:04d}" for i in range(n)]
    seen: dict[str, int] = {}
    out = []
    for name in names:  # a multi-frame file repeats its path: number the pages
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if names.count(name) == 1 else f"{name}_{k:04d}")
    return [f"{n_}.tif" for n_ in out]


def run_translate(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from ..errors import InputError
    from ..frames_io import load_frames
    from .inference import Translator

    if args.batch is not None and args.batch < 1:
        raise InputError("--batch", "must be at least 1")
    stack = load_frames(args.frames)
    tr = Translator.load(args.model_dir, device=args.device, stage=args.stage)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(stack), desc="translate", unit="frame")

    def progress(done, total):
        bar.n = done
        bar.refresh()

    res = tr.translate(stack.frames, batch=args.batch, progress=progress)
    bar.close()
    names = _out_names(list(stack.paths), len(res))
    for img, name in zip(res, names):
        Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(out / name)
    print(f"{len(res)} translated frames written to {out}")
    return 0

"""Picture grid of the bundled translation on the six real knee frames of the shared data set.

Rows: real frames; columns: input | stage 1 | stage 1 + 2. Written (downscaled, < 1 MB) to
``Resources/Screenshots/real_frames_translation.png``. Skips when ``../shared`` is absent.

    .venv/bin/python Testing/benchmarks/translation_real_frames.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Fluoro2DRR"))
DATA = ROOT.parent / "shared" / "data" / "real_fluoro_knee"
OUT = ROOT / "Resources" / "Screenshots" / "real_frames_translation.png"


def main(cell: int = 256) -> int:
    frames_paths = sorted(DATA.glob("*.tif")) if DATA.is_dir() else []
    if not frames_paths:
        print(f"skipped: no real frames in {DATA}")
        return 0
    import torch
    from PIL import Image

    from Fluoro2DRRLib.translation.inference import Translator

    torch.set_num_threads(2)
    frames = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) for p in frames_paths])
    tr = Translator.load(device="cpu")
    s1 = tr.translate(frames, batch=2, stage="1")
    s12 = tr.translate(frames, batch=2)
    rows = []
    for f, a, b in zip(frames, s1, s12):
        cells = []
        for img in (f / 255.0, a, b):
            im = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
            cells.append(np.asarray(im.resize((cell, cell), Image.LANCZOS)))
        rows.append(np.concatenate(cells, 1))
    grid = np.concatenate(rows, 0)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(OUT, optimize=True)
    print(f"{OUT} ({OUT.stat().st_size / 1024:.0f} KiB): rows = {[p.name for p in frames_paths]}, "
          "columns = input | stage 1 | stage 1+2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed of the bundled translation model.

Prints seconds per 512x512 frame on the CPU with 2 threads for stage 1, stage 2 and both; the peak
resident memory (RSS) while translating one 1024x1024 frame; frames/s on CUDA when available.

    .venv/bin/python Testing/benchmarks/bench_translation.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Fluoro2DRR"))
from Fluoro2DRRLib.translation.inference import Translator  # noqa: E402


def seconds_per_frame(tr, frame, stage, repeats):
    tr.translate(frame, stage=stage)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        tr.translate(frame, stage=stage)
    return (time.perf_counter() - t) / repeats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="thread counts to time (2 = the target; on a loaded 2-core machine 1 is faster)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    frame = rng.uniform(0, 255, (1, 512, 512)).astype(np.float32)
    both = Translator.load(device="cpu", stage="both")
    s2only = Translator.load(device="cpu", stage="2")
    for th in args.threads:
        torch.set_num_threads(th)
        print(f"CPU, {torch.get_num_threads()} thread(s), 512x512 frame (networks at {both.image_size}px):")
        print(f"  stage 1   : {seconds_per_frame(both, frame, '1', args.repeats):.3f} s/frame")
        print(f"  stage 2   : {seconds_per_frame(s2only, frame, '2', args.repeats):.3f} s/frame")
        print(f"  both      : {seconds_per_frame(both, frame, 'both', args.repeats):.3f} s/frame")
    torch.set_num_threads(args.threads[0])
    big = rng.uniform(0, 255, (1, 1024, 1024)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    both.translate(big)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS translating one 1024x1024 frame: {peak:.0f} MiB (before: {before:.0f} MiB)")
    if torch.cuda.is_available():
        gpu = Translator.load(device="cuda")
        frames = rng.uniform(0, 255, (64, 512, 512)).astype(np.float32)
        gpu.translate(frames[:8])
        torch.cuda.synchronize()
        t = time.perf_counter()
        gpu.translate(frames)
        torch.cuda.synchronize()
        print(f"CUDA ({torch.cuda.get_device_name()}): {len(frames) / (time.perf_counter() - t):.1f} frames/s "
              f"(512x512, default batch {gpu.default_batch()}, float16 autocast; Testing/benchmarks/bench_gpu.py "
              "measures more: batch sizes, the networks alone, agreement with the CPU)")
    else:
        print("CUDA: not available")


if __name__ == "__main__":
    main()

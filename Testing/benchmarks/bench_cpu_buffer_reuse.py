"""What keeping freed CPU buffers for reuse (RegistrationSettings.reuse_cpu_buffers, cpu_memory) buys one frame.

    .venv/bin/python Testing/benchmarks/bench_cpu_buffer_reuse.py [--rounds 4] [--threads 1] [--out DIR]

Registers the same clean 256 x 256 frame of the procedural phantom (the test suite's scene, seed 5) from the same
perturbed start (4 mm in-plane and in depth, 2 deg) with ``Registrar.register_frame``, buffer reuse off and on,
alternating which goes first each round, in one process, so the machine's own speed drifts equally over both.
Prints seconds, minor page faults and iterations per run, the median ratio, and whether the poses are
bit-identical; writes the table to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Fluoro2DRR"))

from Fluoro2DRRLib import pose_io  # noqa: E402
from Fluoro2DRRLib.bones import bone_from_mesh_file  # noqa: E402
from Fluoro2DRRLib.frames_io import load_frames  # noqa: E402
from Fluoro2DRRLib.geometry import CArmGeometry  # noqa: E402
from Fluoro2DRRLib.registration import Registrar, RegistrationSettings, prepare_frame  # noqa: E402
from Fluoro2DRRLib.simulate import simulate_sequence  # noqa: E402

from bench_capture_range import perturbed  # noqa: E402  (run as a script: this folder is on sys.path)


def scene(out: Path):
    if not (out / "calibration.json").exists():
        simulate_sequence(out, n_frames=3, seed=5, realism="none", image_size=256, progress=False,
                          phantom_voxel_mm=0.8, max_flexion_deg=30.0)
    geometry = CArmGeometry.from_dict(json.loads((out / "calibration.json").read_text()))
    bones = {n: bone_from_mesh_file(out / "models" / f"{n}.stl", n, voxel_mm=1.0) for n in ("femur", "tibia")}
    return geometry, bones, pose_io.read_poses_csv(out / "truth" / "poses.csv"), load_frames(out / "frames").frames


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "cpu_buffer_reuse")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    geometry, bones, truth, frames = scene(args.out / "sim")
    image, fov, _ = prepare_frame(frames[1])
    rng = np.random.default_rng(1)
    # each bone 4 mm in-plane, 4 mm along the beam and 2 deg off its true pose, as the capture-range benchmark does
    start = {n: perturbed(truth[n][1], bones[n].centroid_mm, 4.0, geometry, rng) for n in truth}
    registrars = {reuse: Registrar(geometry, bones, RegistrationSettings(reuse_cpu_buffers=reuse))
                  for reuse in (False, True)}
    seconds: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, dict] = {}
    identical = True
    rows = []
    for k in range(args.rounds):
        for reuse in ((False, True) if k % 2 == 0 else (True, False)):
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            poses, sim, iterations, _ = registrars[reuse].register_frame(image, fov, start, auto=False,
                                                                         tracking=False)
            dt = time.perf_counter() - t0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            seconds[reuse].append(dt)
            first.setdefault(reuse, poses)
            identical &= all(np.array_equal(first[reuse][n], poses[n]) for n in poses)
            rows.append(f"| {k} | {'yes' if reuse else 'no'} | {dt:.1f} | {faults} | {iterations} | {sim:.5f} |")
            print(rows[-1], flush=True)
    identical &= all(np.array_equal(first[False][n], first[True][n]) for n in first[True])
    ratio = float(np.median(seconds[True]) / np.median(seconds[False]))
    summary = (f"median {np.median(seconds[False]):.1f} s without, {np.median(seconds[True]):.1f} s with buffer "
               f"reuse: {ratio:.2f}x; poses bit-identical across runs and settings: {identical}")
    print(summary)
    text = "\n".join([f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{args.threads} thread(s). One 256 px frame, Registrar.register_frame from a perturbed start.",
                      "", "| round | buffers reused | seconds | minor page faults | evaluations | similarity |",
                      "|---|---|---|---|---|---|", *rows, "", summary, ""])
    (args.out / "cpu_buffer_reuse.md").write_text(text)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

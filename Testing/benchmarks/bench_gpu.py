"""GPU check: translation (float16, batched) and registration on CUDA, with the CPU measured in the same run.

Two steps, because a GPU machine may lack the simulator's own dependencies (vtk, SimpleITK, slicer-core):

    # 1. here, on the CPU: simulate the case (held-out translation pairs + a fluoroscopy sequence)
    .venv/bin/python Testing/benchmarks/bench_gpu.py make-case --case bench_out/gpu/case.pkl.gz
    # 2. on the GPU machine (needs torch, numpy, scipy, einops, fastcore, tqdm and diffdrr's
    #    renderers/detector/pose modules): every section runs even when an earlier one fails
    python Testing/benchmarks/bench_gpu.py run --case bench_out/gpu/case.pkl.gz --out DIR

What ``run`` measures (and prints as a table at the end, JSON in DIR/gpu_bench.json):
1. Agreement: the bundled translator on CUDA (float16 autocast, what ``translate`` does there) against the
   same translator on the CPU (float32) on held-out simulated 512 x 512 frames: largest and mean absolute
   difference, and PSNR / NCC of each against the clean DRR target.
2. Translation speed at 512 x 512, both stages: CPU seconds per frame (2 threads, the issue's target, and all
   cores), CUDA frames/s end to end (``Translator.translate`` on numpy frames, as users call it) for several
   batch sizes, and the networks alone on frames already on the GPU (the ceiling), with a breakdown of where
   the end-to-end time goes.
3. Registration on CUDA (``pipeline.run_registration``, the product's path, bundled translation): seconds
   per frame and accuracy against the truth, on the same simulated sequence as the CPU tables.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Fluoro2DRR"))


# ---- step 1: the case, made on the CPU ----------------------------------------------------------
def make_case(path: Path, n_pairs: int, n_frames: int, seed: int, effects_per: str) -> None:
    import tempfile

    from Fluoro2DRRLib import pose_io
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.simulate import simulate_sequence
    from Fluoro2DRRLib.translation.data import DRRSource, make_pair

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_registration import LABELMAP, far_default  # LABELMAP: the README tables' subject, when present

    # held-out pairs: phantom seeds 5000+ (training used 1000-1015), rendered at 512 px, strength 0.6-1.2
    source = DRRSource(n_phantoms=2, image_size=512, first_phantom_seed=5000)
    pairs = [make_pair(source, np.random.default_rng([888888, k]), 512)[:2] for k in range(n_pairs)]
    frames, targets = [p[0] for p in pairs], [p[1] for p in pairs]

    subject = {"labelmap": str(LABELMAP)} if LABELMAP.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        sim = Path(tmp) / "sim"
        simulate_sequence(sim, n_frames=n_frames, seed=seed, realism="fluoro", image_size=256, overwrite=True,
                          progress=False, fluoro_effects_per=effects_per, **subject)
        geometry = load_calibration(sim / "calibration.json")
        bones = {n: bone_from_mesh_file(sim / "models" / f"{n}.stl", n) for n in ("femur", "tibia")}
        truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
        seq = load_frames(sim / "frames").frames
    default = far_default(truth, bones, geometry, np.random.default_rng(11))  # bench_registration's start
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:  # bone volumes are mostly empty: ~5x smaller, it travels to the GPU machine
        pickle.dump({"pairs": (np.stack(frames).astype(np.float32), np.stack(targets).astype(np.float32)),
                     "sequence": seq, "geometry": geometry, "bones": bones, "truth": truth, "default": default,
                     "about": {"seed": seed, "effects_per": effects_per, "n_frames": n_frames,
                               "subject": "knee MRI label map (../shared)" if subject else "procedural knee phantom"}}, f)
    print(f"case -> {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")


# ---- step 2: on the GPU machine ---------------------------------------------------------------
DEVICE = "cuda"  # run --device cpu: a dry run of the script itself on a machine without a GPU


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_gpu_gb():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else float("nan")


def agreement(case, res):
    from Fluoro2DRRLib.translation.inference import Translator
    from Fluoro2DRRLib.translation.train import ncc, psnr

    def per_frame(metric, images):  # the training's own metrics, one value per frame, averaged
        return float(metric(torch.from_numpy(images)[:, None], torch.from_numpy(targets)[:, None]).mean())

    frames, targets = case["pairs"]
    cpu = Translator.load(device="cpu").translate(frames)
    gpu = Translator.load(device=DEVICE).translate(frames)
    diff = np.abs(gpu - cpu)
    res["agreement"] = {
        "frames": int(len(frames)), "size": list(frames.shape[1:]),
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "p999_abs_diff": float(np.quantile(diff, 0.999)),
        "psnr_cpu": per_frame(psnr, cpu), "psnr_cuda": per_frame(psnr, gpu),
        "ncc_cpu": per_frame(ncc, cpu), "ncc_cuda": per_frame(ncc, gpu),
        "psnr_raw": per_frame(psnr, np.stack([(f - f.min()) / max(np.ptp(f), 1e-6) for f in frames])),
    }
    # a ragged case: 37 non-square frames in batches of 16 (the last batch short)
    rng = np.random.default_rng(1)
    ragged = np.stack([frames[k % len(frames)][100:400, 40:460] for k in range(37)])
    ragged = (ragged + rng.normal(0, 0.01, ragged.shape)).astype(np.float32)
    cpu_r = Translator.load(device="cpu").translate(ragged, batch=16)
    gpu_r = Translator.load(device=DEVICE).translate(ragged, batch=16)
    res["agreement"]["ragged_37_frames_300x420_batch_16_max_abs_diff"] = float(np.abs(gpu_r - cpu_r).max())
    print("agreement:", json.dumps(res["agreement"]), flush=True)


def translation_speed(case, res, n_frames: int, batches):
    from Fluoro2DRRLib.translation.inference import Translator
    from Fluoro2DRRLib.translation.networks import pad_to_multiple

    rng = np.random.default_rng(0)
    pairs = case["pairs"][0]
    one = pairs[:1]
    out = res.setdefault("translation_speed", {})
    # CPU baseline in the same run: 2 threads (the 2-core target) and every core
    cpu = Translator.load(device="cpu")
    for threads in (2, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        cpu.translate(one)
        t = time.perf_counter()
        for _ in range(3):
            cpu.translate(one)
        out[f"cpu_{threads}_threads_s_per_frame"] = (time.perf_counter() - t) / 3
        print(f"CPU {threads} threads: {out[f'cpu_{threads}_threads_s_per_frame']:.3f} s/frame", flush=True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))

    gpu = Translator.load(device=DEVICE)
    # real-looking frames (tiled held-out pairs with fresh noise), not zeros
    frames = np.concatenate([pairs] * (n_frames // len(pairs) + 1))[:n_frames]
    frames = (frames + rng.normal(0, 0.01, frames.shape)).astype(np.float32)
    for batch in batches:
        gpu.translate(frames[:batch * 2], batch=batch)  # warm-up (cuDNN picks, allocator)
        _sync()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            gpu.translate(frames, batch=batch)
            _sync()
            times.append(time.perf_counter() - t)
        fps = n_frames / float(np.median(times))
        out[f"cuda_end_to_end_batch_{batch}_fps"] = fps
        print(f"CUDA end to end, batch {batch}: {fps:.0f} frames/s", flush=True)

    # the networks alone, input already normalised and resized on the GPU (the ceiling of the above)
    s = gpu.image_size
    mult = max(2 ** gpu.stage1.depth, getattr(gpu.stage2, "multiple", 1))
    for batch in batches:
        x = torch.rand(batch, 1, s, s, device=DEVICE)
        xp, _ = pad_to_multiple(x, mult)
        xp = xp.contiguous(memory_format=torch.channels_last if DEVICE == "cuda" else torch.contiguous_format)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for _ in range(3):
                gpu.stage2(gpu.stage1(xp)[0])
            _sync()
            reps = max(3, 2048 // batch) if DEVICE == "cuda" else 1
            t = time.perf_counter()
            for _ in range(reps):
                gpu.stage2(gpu.stage1(xp)[0])
            _sync()
        fps = reps * batch / (time.perf_counter() - t)
        out[f"cuda_networks_only_batch_{batch}_fps"] = fps
        print(f"CUDA networks only, batch {batch}: {fps:.0f} frames/s", flush=True)

    # the same networks in the plain (contiguous) layout, what translate used before channels-last
    if DEVICE == "cuda":
        import copy

        s1, s2 = (copy.deepcopy(m).to(memory_format=torch.contiguous_format) for m in (gpu.stage1, gpu.stage2))
        batch = max(batches)
        xp, _ = pad_to_multiple(torch.rand(batch, 1, s, s, device=DEVICE), mult)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for _ in range(3):
                s2(s1(xp)[0])
            _sync()
            reps = max(3, 2048 // batch)
            t = time.perf_counter()
            for _ in range(reps):
                s2(s1(xp)[0])
            _sync()
        out[f"cuda_networks_only_contiguous_batch_{batch}_fps"] = reps * batch / (time.perf_counter() - t)
        print(f"CUDA networks only, contiguous layout, batch {batch}: "
              f"{out[f'cuda_networks_only_contiguous_batch_{batch}_fps']:.0f} frames/s", flush=True)

    # where the end-to-end time goes, one batch of 64 frames
    import torch.nn.functional as F

    b = frames[:64]
    parts = {}
    _sync()
    t = time.perf_counter(); arr = gpu._prepare(b); parts["checks_on_cpu"] = time.perf_counter() - t
    t = time.perf_counter(); x = torch.from_numpy(arr).to(DEVICE)[:, None]; _sync(); parts["to_gpu"] = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter(); x = gpu._normalize(x); _sync(); parts["normalise"] = time.perf_counter() - t
        t = time.perf_counter()
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False); _sync()
        parts["resize_down"] = time.perf_counter() - t
        xp, _ = pad_to_multiple(x, mult)
        xp = xp.contiguous(memory_format=torch.channels_last if DEVICE == "cuda" else torch.contiguous_format)
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            y = gpu.stage2(gpu.stage1(xp)[0])
        _sync(); parts["networks"] = time.perf_counter() - t
        t = time.perf_counter()
        y = F.interpolate(y.float(), size=b.shape[1:], mode="bilinear", antialias=True, align_corners=False); _sync()
        parts["resize_up"] = time.perf_counter() - t
        dest = np.empty(tuple(y[:, 0].shape), np.float32)
        staging = torch.empty(dest.shape, dtype=torch.float32, pin_memory=DEVICE == "cuda")
        t = time.perf_counter(); staging.copy_(y[:, 0]); parts["to_cpu_page_locked"] = time.perf_counter() - t
        t = time.perf_counter(); dest[:] = staging.numpy(); parts["into_result_array"] = time.perf_counter() - t
        t = time.perf_counter(); y.cpu().numpy(); parts["to_cpu_plain_before"] = time.perf_counter() - t
    out["breakdown_64_frames_ms"] = {k: 1000 * v for k, v in parts.items()}
    print("breakdown (ms, 64 frames):", json.dumps(out["breakdown_64_frames_ms"]), flush=True)
    out["peak_gpu_memory_gb"] = _peak_gpu_gb()


def registration(case, res, n_frames: int, translation: str = "bundled"):
    import tempfile

    from Fluoro2DRRLib.evaluate import pose_errors, summarise
    from Fluoro2DRRLib.pipeline import run_registration

    seq = case["sequence"][:n_frames]
    truth = {k: v[:n_frames] for k, v in case["truth"].items()}
    geometry, bones = case["geometry"], case["bones"]
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = run_registration(seq, geometry, bones, Path(tempfile.mkdtemp()) / "registration", None, translation, device=DEVICE,
                              progress=True, default_poses=case["default"])
    total = time.time() - t0
    secs = [q["seconds"] for q in result.quality]
    summ = {n: summarise(pose_errors(result.poses[n], truth[n], bones[n].centroid_mm, geometry)) for n in truth}
    res["registration_cuda"] = {"frames": len(seq), "total_seconds": total, "seconds_per_frame": secs,
                                "median_tracking_s": float(np.median(secs[1:])) if len(secs) > 1 else None,
                                "first_frame_s": secs[0], "summary": summ,
                                "peak_gpu_memory_gb": _peak_gpu_gb()}
    print("registration on CUDA:", json.dumps({k: v for k, v in res["registration_cuda"].items()
                                                if k != "seconds_per_frame"}, default=float), flush=True)


def profile_tracking(case, res, n_frames: int = 5):
    """Where a tracked frame's time goes on this device: cProfile over ``register_sequence`` started from the
    truth of frame 0 (no automatic start), bundled translation; the top functions by own time."""
    import cProfile
    import io
    import pstats

    from Fluoro2DRRLib.registration import register_sequence

    seq = case["sequence"][:n_frames]
    init = {k: v[:1] for k, v in case["truth"].items()}
    register_sequence(seq[:1], case["geometry"], case["bones"], init, "bundled", device=DEVICE)  # warm-up
    prof = cProfile.Profile()
    t = time.time()
    prof.enable()
    register_sequence(seq, case["geometry"], case["bones"], init, "bundled", device=DEVICE)
    prof.disable()
    total = time.time() - t
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    res["profile_tracking"] = {"frames": n_frames, "seconds": total, "top_by_own_time": text.getvalue()[-9000:]}
    print(f"profile: {n_frames} frames in {total:.1f} s\n{text.getvalue()[-9000:]}", flush=True)


def profile_kernels(case, res, n_frames: int = 2):
    """The device's own time by operator (torch.profiler, CPU and CUDA activities) over ``register_sequence``
    on frames 0..n-1 from the truth of frame 0: what the backward pass spends its time on. Slow: on the H200,
    2 frames had not finished after 150 s under the profiler (results/gpu_2026-12-04.md); use 1 frame."""
    from torch.profiler import ProfilerActivity, profile

    from Fluoro2DRRLib.registration import register_sequence

    seq = case["sequence"][:n_frames]
    init = {k: v[:1] for k, v in case["truth"].items()}
    register_sequence(seq[:1], case["geometry"], case["bones"], init, "bundled", device=DEVICE)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        register_sequence(seq, case["geometry"], case["bones"], init, "bundled", device=DEVICE)
    key = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    res["profile_kernels"] = {"frames": n_frames, "table": table[-12000:]}
    print(f"kernels ({key}), {n_frames} frames:\n{table}", flush=True)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "cuda": torch.cuda.is_available(), "cpus": os.cpu_count()}}
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("CUDA: not available; nothing to measure here (--device cpu runs the script as a dry run)")
        return 1
    res["machine"]["gpu"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "none (dry run on the CPU)"
    torch.backends.cudnn.benchmark = True
    with gzip.open(args.case, "rb") as f:
        case = pickle.load(f)
    sections = {"agreement": lambda: agreement(case, res),
                "translation": lambda: translation_speed(case, res, args.speed_frames, args.batches),
                "registration": lambda: registration(case, res, args.registration_frames, args.translation),
                "profile": lambda: profile_tracking(case, res, args.profile_frames),
                "kernels": lambda: profile_kernels(case, res, 1)}
    print(f"case: {case['about']}", flush=True)
    for name in args.sections.split(","):
        t = time.time()
        try:
            sections[name]()
        except Exception:  # noqa: BLE001  -- report and go on: one device call must bring back every section
            res.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"section {name} FAILED:\n{res['errors'][name]}", flush=True)
        res.setdefault("section_seconds", {})[name] = time.time() - t
        (out / "gpu_bench.json").write_text(json.dumps(res, indent=2, default=float))
    print("\n== summary ==")
    print(json.dumps({k: v for k, v in res.items() if k != "errors"}, indent=1, default=float)[:6000])
    print("errors in:", list(res.get("errors", {})) or "none")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-case")
    mk.add_argument("--case", default=str(ROOT / "bench_out" / "gpu" / "case.pkl.gz"))
    mk.add_argument("--pairs", type=int, default=8)
    mk.add_argument("--frames", type=int, default=20)
    mk.add_argument("--seed", type=int, default=21)
    mk.add_argument("--effects-per", choices=["frame", "sequence"], default="frame")
    rn = sub.add_parser("run")
    rn.add_argument("--case", required=True)
    rn.add_argument("--out", default=str(ROOT / "bench_out" / "gpu"))
    rn.add_argument("--sections", default="agreement,translation,registration")
    rn.add_argument("--speed-frames", type=int, default=1024)
    rn.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    rn.add_argument("--registration-frames", type=int, default=20)
    rn.add_argument("--translation", default="bundled", help="the registration section's model: bundled or a folder")
    rn.add_argument("--profile-frames", type=int, default=5)
    rn.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run of this script (small sizes) where there is no GPU")
    args = ap.parse_args(argv)
    if args.cmd == "make-case":
        torch.set_num_threads(2)
        return make_case(Path(args.case), args.pairs, args.frames, args.seed, args.effects_per)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

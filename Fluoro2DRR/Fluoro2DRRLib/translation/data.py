"""Training data for the translation networks: (simulated fluoroscopy, clean DRR target, bone mask).

Line integrals come from a pluggable :class:`LineIntegralSource`:

* :class:`Procedural2DKneeSource` -- analytic 2D projections of femur / tibia-like shapes (condyles,
  metaphyses and tibial plateau as shelled ellipsoids, shafts as shelled tapered cylinders), random
  flexion, orientation, position and scale. Needs nothing else; the default.
* :class:`DRRSource` -- real DiffDRR renders of the knee phantom (``Fluoro2DRRLib.phantom``,
  ``Fluoro2DRRLib.render``, ``Fluoro2DRRLib.simulate``) when those modules are importable.

Pairs are pre-generated into an ``.npz`` cache (uint8 frames, uint16 targets, uint8 masks) so that
epochs are fast; the dataset adds flips / 90-degree rotations and random crops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from ..fluoro_sim import (FluoroEffects, bone_mask_from_line_integrals, clean_drr_target,
                          simulate_fluoroscopy)


class LineIntegralSource(Protocol):
    """Anything that gives per-bone line integrals ``(C, H, W)`` float32 (bone bright)."""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# procedural 2D knee
def _shelled_ellipsoid(a, b, ca, cb, A, B, depth, rho_in, rho_shell, t):
    """Line integral through an ellipsoid (in-plane semi-axes A, B, half-depth ``depth``) with a
    cortical shell of thickness ``t`` (mm) and density ``rho_shell`` around ``rho_in``."""
    u, v = (a - ca) / A, (b - cb) / B
    outer = 2 * depth * np.sqrt(np.clip(1 - u * u - v * v, 0, None))
    Ai, Bi, Di = max(A - t, 1.0), max(B - t, 1.0), max(depth - t, 1.0)
    ui, vi = (a - ca) / Ai, (b - cb) / Bi
    inner = 2 * Di * np.sqrt(np.clip(1 - ui * ui - vi * vi, 0, None))
    return rho_shell * outer - (rho_shell - rho_in) * inner


def _shelled_shaft(a, b, a0, a1, r0, r1, rho_in, rho_shell, t):
    """Tapered cylinder along ``a`` from ``a0`` (radius r0) to ``a1`` (radius r1)."""
    s = np.clip((a - a0) / (a1 - a0), 0, 1)
    r = r0 + (r1 - r0) * s
    inside = (a >= a0) & (a <= a1)
    outer = 2 * np.sqrt(np.clip(r * r - b * b, 0, None))
    ri = np.maximum(r - t, 1.0)
    inner = 2 * np.sqrt(np.clip(ri * ri - b * b, 0, None))
    return np.where(inside, rho_shell * outer - (rho_shell - rho_in) * inner, 0.0)


class Procedural2DKneeSource:
    """Analytic lateral-ish projections of a femur and a tibia: ``(2, H, W)`` (femur, tibia)."""

    def __init__(self, mm_per_px_at_256=(0.55, 1.0), flexion_deg=(0.0, 110.0)):
        self.mm_per_px_at_256 = mm_per_px_at_256
        self.flexion_deg = flexion_deg

    def sample(self, rng: np.random.Generator, size: int = 256) -> np.ndarray:
        mmpp = rng.uniform(*self.mm_per_px_at_256) * 256.0 / size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        # world (mm) coordinates of the pixels, joint centre near the image centre
        jc = (size / 2 + rng.normal(0, 0.12 * size, 2)) * mmpp
        X, Y = xx * mmpp - jc[0], yy * mmpp - jc[1]
        s = rng.uniform(0.85, 1.15)  # subject size
        side = rng.choice([-1.0, 1.0])  # which way is anterior
        phi = rng.uniform(0, 2 * np.pi)  # femur direction (towards the hip)
        flex = np.deg2rad(rng.uniform(*self.flexion_deg))
        rho_c = rng.uniform(1.3, 1.9)
        rho_s = rng.uniform(0.25, 0.6)
        t_c = rng.uniform(2.5, 5.0)

        def local(origin, ang):
            a = (X - origin[0]) * np.cos(ang) + (Y - origin[1]) * np.sin(ang)
            b = side * (-(X - origin[0]) * np.sin(ang) + (Y - origin[1]) * np.cos(ang))
            return a, b

        # femur: a along the shaft towards the hip, b anterior; condyle centre ~ origin + 22 a
        rc = 22.0 * s * rng.uniform(0.9, 1.1)
        cond_c = np.array([0.0, 0.0])
        fo = cond_c - rc * np.array([np.cos(phi), np.sin(phi)])
        a, b = local(fo, phi)
        fem = np.maximum.reduce([
            _shelled_shaft(a, b - 2 * s, 40 * s, 420 * s, 16 * s, 13 * s, rho_s * 0.5, rho_c, t_c + 1.5),
            _shelled_ellipsoid(a, b, 45 * s, 0, 40 * s, 27 * s, 36 * s, rho_s, rho_c * 0.7, t_c * 0.5),
            _shelled_ellipsoid(a, b, rc, -4 * s, rc, rc * 1.05, 15 * s, rho_s, rho_c * 0.8, t_c * 0.6),
            _shelled_ellipsoid(a, b, rc + rng.uniform(-3, 3), -4 * s + rng.uniform(-4, 4),
                               rc * rng.uniform(0.9, 1.05), rc, 14 * s, rho_s, rho_c * 0.8, t_c * 0.6),
            _shelled_ellipsoid(a, b, rc + 18 * s, 14 * s, 22 * s, 12 * s, 30 * s, rho_s, rho_c * 0.6, t_c * 0.5),
        ])
        # tibia: rolls round the condyle with flexion; a along the shaft towards the ankle
        tang = phi + np.pi - side * flex
        tdir = np.array([np.cos(tang), np.sin(tang)])
        gap = rng.uniform(2.0, 6.0)
        to = cond_c + (rc + gap) * tdir
        a, b = local(to, tang)
        b = b * -1.0  # keep the tibial tuberosity anterior
        tib = np.maximum.reduce([
            _shelled_shaft(a, b - 3 * s, 30 * s, 420 * s, 17 * s, 11 * s, rho_s * 0.5, rho_c, t_c + 1.0),
            _shelled_ellipsoid(a, b, 14 * s, -2 * s, 15 * s, 34 * s, 38 * s, rho_s, rho_c * 0.7, t_c * 0.5),
            _shelled_ellipsoid(a, b, 38 * s, 14 * s, 14 * s, 9 * s, 15 * s, rho_s, rho_c * 0.7, t_c * 0.5),
            _shelled_ellipsoid(a, b, 35 * s, 0, 32 * s, 26 * s, 30 * s, rho_s, rho_c * 0.6, t_c * 0.5),
        ])
        tib = np.where(np.abs(b) < 80 * s, tib, 0)
        return np.stack([fem, tib]).astype(np.float32)


class DRRSource:
    """Line integrals rendered with DiffDRR (``Fluoro2DRRLib.render``) from procedural knee phantoms
    (``Fluoro2DRRLib.phantom``) in random squat-like poses of a lateral view (``phantom.knee_motion``,
    the simulator's own motion model), at a random knee depth so the magnification varies.

    Phantom seeds start at ``first_phantom_seed`` (1000 by default) so that the demo and test phantoms
    (seeds 0-99) stay unseen. ``shape_variety`` > 0 moves and resizes every part of every phantom at random
    (``phantom.make_knee_phantom``; config ``data.drr.shape_variety``). Raises ImportError if the renderer / phantom modules are not available.
    About 0.3-1 s per 256 x 256 sample on a 2-core CPU (the procedural 2D source is ~100x faster).
    """

    def __init__(self, n_phantoms: int = 3, image_size: int = 256, max_flexion_deg: float = 110.0,
                 first_phantom_seed: int = 1000, knee_depth_fraction=(0.72, 0.92), device: str = "cpu",
                 shape_variety: float = 0.0):
        from .. import phantom, render  # noqa: F401  (ImportError when absent)
        from ..geometry import knee_default_geometry

        self._render, self._phantom = render, phantom
        self.geometry = knee_default_geometry().resized(image_size, image_size)
        self.phantom_seeds = [first_phantom_seed + k for k in range(n_phantoms)]
        self.max_flexion_deg = max_flexion_deg
        self.knee_depth_fraction = knee_depth_fraction
        self.shape_variety = float(shape_variety)  # phantom.make_knee_phantom's; 0: the template's shapes
        # "auto": render on CUDA when there is one (a GPU renders a batch of pairs in milliseconds, the
        # 2-core CPU takes 0.3-3 s per pair); the line integrals agree to float32 rounding
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self._cache = {}

    def prepare(self, workers: int = 0) -> None:
        """Build every phantom now, ``workers`` processes at a time (each takes seconds of one core)."""
        todo = [k for k in range(len(self.phantom_seeds)) if k not in self._cache]
        if workers > 1 and len(todo) > 1:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
                built = list(pool.map(_phantom_bones, [self.phantom_seeds[k] for k in todo],
                                      [self.shape_variety] * len(todo)))
            for k, bones in zip(todo, built):
                self._cache[k] = self._render.TwoBoneRenderer(self.geometry, list(bones), device=self.device)
        for k in todo:
            self._renderer(k)

    def _renderer(self, k):
        if k not in self._cache:
            bones = _phantom_bones(self.phantom_seeds[k], self.shape_variety)
            self._cache[k] = self._render.TwoBoneRenderer(self.geometry, list(bones), device=self.device)
        return self._cache[k]

    def draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """The random part of :meth:`sample`: which phantom, and its (1, 2, 4, 4) femur / tibia poses."""
        k = int(rng.integers(len(self.phantom_seeds)))
        g = self.geometry
        depth = float(rng.uniform(*self.knee_depth_fraction)) * g.source_to_detector_mm
        n = 16
        poses = self._phantom.knee_flexion_sequence(n, g.world_from_source, depth, seed=int(rng.integers(1 << 30)),
                                                    max_flexion_deg=float(rng.uniform(20, self.max_flexion_deg)))
        j = int(rng.integers(n))
        return k, np.stack([poses["femur"][j], poses["tibia"][j]])[None]

    def render(self, k: int, stacked_poses: np.ndarray, size: int = 256) -> np.ndarray:
        """Line integrals ``(B, 2, size, size)`` float32 of phantom ``k`` at poses ``(B, 2, 4, 4)``."""
        with torch.inference_mode():
            li = self._renderer(k)(torch.as_tensor(stacked_poses, dtype=torch.float32, device=self.device))
            if li.shape[-1] != size or li.shape[-2] != size:
                li = torch.nn.functional.interpolate(li, size=(size, size), mode="bilinear", antialias=True)
        return li.float().cpu().numpy()

    def sample(self, rng: np.random.Generator, size: int = 256) -> np.ndarray:
        k, stacked = self.draw(rng)
        return self.render(k, stacked, size)[0]


def _phantom_bones(seed: int, shape_variety: float = 0.0):
    """(femur, tibia) BoneModels of phantom ``seed``, volumes only (a process pool's job)."""
    from .. import phantom

    ph = phantom.make_knee_phantom(seed, mesh=False, shape_variety=shape_variety)
    return ph["femur"], ph["tibia"]


def default_source(kind: str = "auto", **drr_kwargs):
    """``"procedural"``, ``"drr"`` or ``"auto"`` (DRR when the renderer imports, else procedural)."""
    if kind in ("drr", "auto"):
        try:
            return DRRSource(**drr_kwargs)
        except Exception:
            if kind == "drr":
                raise
    return Procedural2DKneeSource()


# ---------------------------------------------------------------------------------------------
# The training pairs draw the focal-spot blur from 0.3-1.2 px, the simulator's range until the twenty-sixth
# session: wider than a focal spot gives (``FluoroEffects.focal_sigma_px``), kept as augmentation, and what the
# bundled weights were trained on, so that their committed config still reproduces them. A training config
# replaces these overrides with its own list (``data.fluoro_effects``; ``[]``: the simulator's defaults).
TRAINING_FLUORO_EFFECTS = ("focal_sigma_px=0.3,1.2",)


def training_effects(overrides=None) -> FluoroEffects:
    """The effects training pairs are simulated with: the simulator's defaults with ``overrides``
    (``KEY=VALUE`` strings, :meth:`FluoroEffects.with_overrides`), :data:`TRAINING_FLUORO_EFFECTS` when None."""
    if overrides is not None and (isinstance(overrides, str) or not isinstance(overrides, (list, tuple))):
        raise InputError("training config", f"data.fluoro_effects must be a list of KEY=VALUE strings "
                                            f"(e.g. [\"focal_sigma_px=0.05,0.3\"]), not {overrides!r}")
    return FluoroEffects().with_overrides(TRAINING_FLUORO_EFFECTS if overrides is None else overrides)


def make_pair(source: LineIntegralSource, rng: np.random.Generator, size: int = 256,
              effects: FluoroEffects | None = None, strength=(0.6, 1.2), mask_threshold: float = 2.0):
    li = source.sample(rng, size)
    return pair_from_line_integrals(li, rng, effects, strength, mask_threshold)


def pair_from_line_integrals(li: np.ndarray, rng: np.random.Generator, effects: FluoroEffects | None = None,
                             strength=(0.6, 1.2), mask_threshold: float = 2.0):
    """(simulated frame, clean target, bone mask) of line integrals ``(2, H, W)``; ``rng`` draws the frame,
    with ``effects`` (None: :func:`training_effects`)."""
    effects = training_effects() if effects is None else effects
    frame = simulate_fluoroscopy(li, rng, effects, float(rng.uniform(*strength)))
    return frame, clean_drr_target(li), bone_mask_from_line_integrals(li, mask_threshold)


def _quantized_pairs(job):
    """Pool job: [(i, line integrals, rng)] -> [(i, uint8 frame, uint16 target, uint8 mask)]."""
    items, effects = job
    out = []
    for i, li, rng in items:
        f, t, m = pair_from_line_integrals(li, rng, effects)
        out.append((i, np.round(f * 255).astype(np.uint8), np.round(t * 65535).astype(np.uint16),
                    m.astype(np.uint8)))
    return out


def default_workers() -> int:
    """Processes for building training data: all cores but one (at least 1)."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n - 1)


def build_cache(path, n: int, size: int = 256, seed: int = 0, source: LineIntegralSource | None = None,
                effects: FluoroEffects | None = None, progress: bool = True, workers: int = 0,
                compress: bool = True) -> Path:
    """Pre-generate ``n`` pairs into ``path`` (.npz). Each pair i uses seed ``(seed, i)``.

    ``workers`` > 1 (a :class:`DRRSource`): the phantoms are built and the frames simulated in that many
    processes while this one renders the line integrals in batches (on the source's device): the same
    random draws per pair as the serial loop. ``compress=False`` writes a plain .npz (thousands of pairs
    compress for minutes)."""
    source = source or Procedural2DKneeSource()
    frames = np.zeros((n, size, size), np.uint8)
    targets = np.zeros((n, size, size), np.uint16)
    masks = np.zeros((n, size, size), np.uint8)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"simulating {n} pairs", leave=False)
    if workers > 1 and isinstance(source, DRRSource):
        _build_pairs_in_parallel(source, n, size, seed, effects, workers, frames, targets, masks, bar)
    else:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            f, t, m = make_pair(source, rng, size, effects)
            frames[i] = np.round(f * 255)
            targets[i] = np.round(t * 65535)
            masks[i] = m
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compress else np.savez
    save(path, frames=frames, targets=targets, masks=masks, source=type(source).__name__, seed=seed)
    return path


def _build_pairs_in_parallel(source: DRRSource, n, size, seed, effects, workers, frames, targets, masks, bar,
                             render_batch: int = 32, job_size: int = 16):
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    source.prepare(workers)
    rngs, draws = [], {}
    for i in range(n):  # the poses first (cheap), so each phantom's pairs render together
        rng = np.random.default_rng([seed, i])
        k, stacked = source.draw(rng)
        rngs.append(rng)
        draws.setdefault(k, []).append((i, stacked))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = []
        for k, items in sorted(draws.items()):
            for b in range(0, len(items), render_batch):
                chunk = items[b:b + render_batch]
                li = source.render(k, np.concatenate([st for _, st in chunk]), size)
                for j in range(0, len(chunk), job_size):
                    job = [(i, li[j + q], rngs[i]) for q, (i, _) in enumerate(chunk[j:j + job_size])]
                    futures.append(pool.submit(_quantized_pairs, (job, effects)))
        for fut in futures:
            for i, f, t, m in fut.result():
                frames[i], targets[i], masks[i] = f, t, m
                if bar is not None:
                    bar.update()


def robust_normalize(frame: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    """Map the ``percentiles`` of one frame (any range) to 0 and 1, clipped: float32."""
    f = np.asarray(frame, dtype=np.float32)
    lo, hi = np.percentile(f[:: max(1, f.shape[0] // 256), :: max(1, f.shape[1] // 256)], percentiles)
    return np.clip((f - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


class SimulatedPairDataset(Dataset):
    """(frame, target, mask) tensors ``(1, S, S)`` float32 in [0, 1] from a cache or generated.

    ``cache``: an .npz from :func:`build_cache` (built on the fly if missing and ``n`` given).
    ``augment``: random flips / 90-degree rotations; ``crop``: random square crop size (training).
    """

    def __init__(self, cache=None, n: int | None = None, size: int = 256, seed: int = 0,
                 source: LineIntegralSource | None = None, augment: bool = False,
                 crop: int | None = None, normalize=(0.5, 99.5)):
        if cache is not None and not Path(cache).exists():
            if n is None:
                raise FileNotFoundError(cache)
            build_cache(cache, n, size, seed, source)
        if cache is not None:
            z = np.load(cache)
            self.frames, self.targets, self.masks = z["frames"], z["targets"], z["masks"]
            self._scale = (255.0, 65535.0)
        else:
            rng_src = source or Procedural2DKneeSource()
            pairs = [make_pair(rng_src, np.random.default_rng([seed, i]), size) for i in range(n or 0)]
            self.frames = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, size, size))
            self.targets = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, size, size))
            self.masks = np.stack([p[2] for p in pairs]).astype(np.uint8) if pairs else np.zeros((0, size, size))
            self._scale = (1.0, 1.0)
        self.augment, self.crop, self.normalize = augment, crop, normalize
        self._rng = np.random.default_rng(seed + 12345)

    def __len__(self):
        return len(self.frames)

    def frames_tensor(self, i):
        """Frame ``i`` as (1, S, S), normalised, no augmentation."""
        f = self.frames[i].astype(np.float32) / self._scale[0]
        if self.normalize:
            f = robust_normalize(f, self.normalize)
        return torch.from_numpy(f)[None]

    def __getitem__(self, i):
        f = self.frames[i].astype(np.float32) / self._scale[0]
        if self.normalize:
            f = robust_normalize(f, self.normalize)
        t = self.targets[i].astype(np.float32) / self._scale[1]
        m = self.masks[i].astype(np.float32)
        x = np.stack([f, t, m])
        if self.augment:
            k = int(self._rng.integers(4))
            x = np.rot90(x, k, axes=(1, 2))
            if self._rng.random() < 0.5:
                x = x[:, :, ::-1]
        if self.crop and self.crop < x.shape[-1]:
            r, c = self._rng.integers(0, x.shape[-1] - self.crop + 1, 2)
            x = x[:, r:r + self.crop, c:c + self.crop]
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x[0:1], x[1:2], x[2:3]


class PairedDRRDataset(Dataset):
    """Real frames paired with bone-only DRR targets rendered at known poses (fine-tuning data).

    ``frames``: (N, H, W) array; ``geometry``: the frames' CArmGeometry; ``bones``: [femur, tibia]
    BoneModels; ``poses``: dict name -> (N, 4, 4) ``world_from_bone``. Frames whose pose is NaN are
    skipped. Targets are ``clean_drr_target`` of the summed DRR line integrals rendered on a
    ``size``-pixel-wide copy of the geometry. Yields (frame (H, W), target (h, w), mask (h, w)).
    """

    def __init__(self, frames, geometry, bones, poses: dict, size: int = 256, mask_threshold: float = 2.0):
        from ..render import TwoBoneRenderer

        frames = np.asarray(frames, dtype=np.float32)
        names = [b.name for b in bones]
        stacked = np.stack([np.asarray(poses[n], dtype=float) for n in names], 1)  # (N, 2, 4, 4)
        if len(stacked) != len(frames):
            from ..errors import InputError
            raise InputError("poses", f"{len(stacked)} poses for {len(frames)} frames")
        ok = np.isfinite(stacked).all(axis=(1, 2, 3))
        self.frames = frames[ok]
        g = geometry.resized(size)
        renderer = TwoBoneRenderer(g, list(bones))
        targets, masks = [], []
        with torch.inference_mode():
            for k in np.flatnonzero(ok):
                li = renderer(torch.as_tensor(stacked[k:k + 1], dtype=torch.float32))[0].numpy()
                targets.append(clean_drr_target(li))
                masks.append(bone_mask_from_line_integrals(li, mask_threshold).astype(np.float32))
        self.targets, self.masks = targets, masks

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        return self.frames[i], self.targets[i], self.masks[i]

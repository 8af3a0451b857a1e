"""Image-space fluoroscopy simulator: bone line integrals -> a realistic-looking fluoroscopy frame.

Used to make (simulated frame, clean DRR target, bone mask) training pairs for the
fluoroscopy-to-DRR translation networks (``Fluoro2DRRLib.translation``).

Inputs are per-bone DRR line integrals ``(C, H, W)`` (bone bright, units of mm x density, a typical
maximum of 20-60). Everything happens in image space (no 3D): soft tissue is procedural, built around
the bones so it follows the leg whatever the flexion.

The clean target (what the translation networks learn to output and what the registration engine
compares its own DRRs to) is a FIXED monotone map of the summed line integral ``S = sum_c li[c]``::

    clean_drr_target(li) = exp(-S / TARGET_LI_SCALE),   TARGET_LI_SCALE = 30.0

i.e. "rendered separately, summed, inverted to X-ray polarity": background (no bone) is 1.0 (white),
bone is darker, 20 mm.density gives 0.51, 60 gives 0.14. The map never clips (no per-image
normalisation), so a registration engine can apply exactly the same map to its DRRs:
``target = exp(-drr_line_integral_sum / 30)``.

With every effect switched off (``FluoroEffects.none()``) ``simulate_fluoroscopy`` returns exactly
``clean_drr_target(li)``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
from scipy import ndimage

from .errors import InputError

TARGET_LI_SCALE = 30.0
"""Line-integral scale (mm x density) of the clean target map ``exp(-S / TARGET_LI_SCALE)``."""


def clean_drr_target(bone_line_integrals: np.ndarray) -> np.ndarray:
    """Fixed monotone map of the summed bone line integrals to X-ray polarity in (0, 1].

    ``(C, H, W)`` or ``(H, W)`` -> ``(H, W)`` float32: ``exp(-sum_c li / TARGET_LI_SCALE)``.
    """
    li = np.asarray(bone_line_integrals, dtype=np.float32)
    total = li.sum(axis=0) if li.ndim == 3 else li
    return np.exp(-np.maximum(total, 0.0) / np.float32(TARGET_LI_SCALE)).astype(np.float32)


def line_integrals_from_target(target: np.ndarray) -> np.ndarray:
    """Inverse of :func:`clean_drr_target` (summed line integral from a target image)."""
    t = np.clip(np.asarray(target, dtype=np.float64), 1e-6, 1.0)
    return (-np.log(t) * TARGET_LI_SCALE).astype(np.float32)


def bone_mask_from_line_integrals(li: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """Bone mask ``(H, W)`` bool: summed line integral above ``threshold`` (mm x density)."""
    li = np.asarray(li, dtype=np.float32)
    total = li.sum(axis=0) if li.ndim == 3 else li
    return total > threshold


@dataclass
class FluoroEffects:
    """Every effect is switchable (``*_on``) and drawn from a (low, high) strength range.

    Amplitudes are further multiplied by the ``strength`` argument of :func:`simulate_fluoroscopy`.
    """

    # attenuation / exposure
    exposure_on: bool = True
    mu_scale: tuple = (0.7, 1.4)          # attenuation multiplier relative to 1/TARGET_LI_SCALE
    gain: tuple = (1.2, 3.0)              # detector gain: air saturates above 1
    gamma: tuple = (0.6, 1.2)             # log/gain display curve  I ** gamma
    soft_tissue_on: bool = True
    tissue_peak: tuple = (30.0, 80.0)     # mm x density at the thickest part of the leg
    tissue_margin_px: tuple = (0.14, 0.32)  # leg radius beyond the bone, fraction of image size
    fat_fraction: tuple = (0.1, 0.3)
    other_leg_prob: float = 0.4
    extra_bones_on: bool = True           # patella / fibula-like blobs NOT in the target
    extra_bones_prob: float = 0.6
    # noise and blur
    quantum_noise_on: bool = True
    photons: tuple = (150.0, 3000.0)      # photons per pixel at unit intensity (low dose -> noisy)
    electronic_noise_on: bool = True
    electronic_sigma: tuple = (0.002, 0.015)
    focal_blur_on: bool = True
    # A focal spot of f mm blurs an edge by its penumbra f (M - 1) at the detector (M = SID / SOD): 0.05-0.22 mm
    # for a 0.3-1.2 mm spot at the benchmark's M = 1.18, and the real frames' EMG wires show a few tenths of a
    # millimetre of blur from every source together. 0.05-0.3 px (0.05-0.33 mm at 1.09 mm pixels) covers that
    # with margin. Until the twenty-sixth session this was 0.3-1.2 px (0.33-1.31 mm), 4-60x what a focal spot
    # gives; the translation's training pairs keep that range as augmentation (translation.data).
    focal_sigma_px: tuple = (0.05, 0.3)
    detector_blur_on: bool = True
    detector_sigma_px: tuple = (0.3, 0.9)
    # image intensifier
    glare_on: bool = True
    glare: tuple = (0.03, 0.15)
    glare_sigma_frac: tuple = (0.05, 0.15)
    honeycomb_on: bool = True
    honeycomb_amp: tuple = (0.01, 0.05)
    honeycomb_period_px: tuple = (2.5, 5.0)
    blockiness: tuple = (0.0, 0.6)        # mix of a 2x2 block-averaged image
    distortion_on: bool = True
    pincushion_k: tuple = (0.0, 0.01)     # mild: the real frames are already undistorted
    field_on: bool = True
    field_radius_frac: tuple = (0.46, 0.62)
    vignetting: tuple = (0.1, 0.45)
    # foreign objects
    markers_on: bool = True
    n_markers: tuple = (0, 5)
    beads_on: bool = True
    n_beads: tuple = (0, 4)
    wires_on: bool = True
    n_wires: tuple = (0, 7)
    sensors_on: bool = True
    n_sensors: tuple = (0, 3)
    # output
    saturation_on: bool = True
    saturation_level: tuple = (0.8, 1.0)  # camera / II output saturates at this level (then rescaled)
    quantize_on: bool = True

    @classmethod
    def none(cls) -> "FluoroEffects":
        """All effects off: the output is exactly :func:`clean_drr_target`."""
        return cls(**{f.name: False for f in fields(cls) if f.name.endswith("_on")})

    def only(self, *names: str) -> "FluoroEffects":
        """Copy with only the named switches (without ``_on``) left on."""
        on = {f"{n}_on" for n in names}
        return replace(self, **{f.name: (f.name in on and getattr(self, f.name))
                                for f in fields(self) if f.name.endswith("_on")})

    def as_json(self) -> dict:
        """Every field, ranges as lists: what ``simulation.json`` records of a simulation's effects."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def with_overrides(self, pairs=()) -> "FluoroEffects":
        """Copy with ``KEY=VALUE`` strings applied (the command line's ``--fluoro-effect``): a range as
        ``LOW,HIGH`` (``focal_sigma_px=0.1,0.4``), a probability as one number, a switch as on/off. A range
        changed this way keeps every random draw of the scene: only the drawn value moves within the new range."""
        known = {f.name for f in fields(self)}
        changes = {}
        for pair in pairs:
            key, sep, value = str(pair).partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in known:
                raise InputError("--fluoro-effect", f"{pair!r}: expected KEY=VALUE with KEY one of "
                                                    f"{', '.join(sorted(known))}")
            current = getattr(self, key)
            try:
                if isinstance(current, bool):
                    if value.lower() not in ("on", "off", "true", "false", "1", "0"):
                        raise ValueError(value)
                    changes[key] = value.lower() in ("on", "true", "1")
                elif isinstance(current, tuple):
                    low, high = (float(v) for v in value.split(","))
                    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low <= high):
                        raise ValueError(value)
                    changes[key] = (type(current[0])(low), type(current[0])(high))
                else:
                    number = float(value)
                    if not (np.isfinite(number) and number >= 0):
                        raise ValueError(value)
                    changes[key] = type(current)(number)
            except ValueError:
                kind = ("on or off" if isinstance(current, bool) else "LOW,HIGH with 0 <= LOW <= HIGH"
                        if isinstance(current, tuple) else "a number >= 0")
                raise InputError("--fluoro-effect", f"{pair!r}: {key} takes {kind}") from None
        return replace(self, **changes)


def _u(rng, rng_range):
    lo, hi = rng_range
    return float(rng.uniform(lo, hi))


def _ellipse_chord(dist, radius):
    """Chord length through a cylinder of ``radius`` at perpendicular distance ``dist``."""
    return 2.0 * np.sqrt(np.clip(radius * radius - dist * dist, 0.0, None))


def _soft_tissue(bones_total, rng, eff, strength, yy, xx):
    h, w = bones_total.shape
    size = float(max(h, w))
    mask = bones_total > 1.0
    if not mask.any():  # no bone visible: a random band through the image
        ang = rng.uniform(0, np.pi)
        d = np.abs((xx - w / 2) * np.sin(ang) - (yy - h / 2) * np.cos(ang))
    else:
        d = ndimage.distance_transform_edt(~mask)
    margin = _u(rng, eff.tissue_margin_px) * size
    # leg radius: the bone half-width plus the margin; chord normalised to 1 at the bone
    radius = margin + 0.06 * size
    prof = _ellipse_chord(d + 0.06 * size, radius) / (2 * radius)
    fat = _u(rng, eff.fat_fraction)
    muscle = _ellipse_chord(d + 0.06 * size, radius * (1 - fat)) / (2 * radius)
    peak = _u(rng, eff.tissue_peak) * strength
    tissue = peak * (0.55 * prof + 0.45 * muscle) / 0.9
    # smooth, low-frequency thickness modulation
    mod = ndimage.gaussian_filter(rng.standard_normal((h // 8 + 1, w // 8 + 1)), 2.0)
    mod = ndimage.zoom(mod, (h / mod.shape[0], w / mod.shape[1]), order=1)[:h, :w]
    tissue *= 1.0 + 0.15 * mod / (np.abs(mod).max() + 1e-6)
    if rng.random() < eff.other_leg_prob:
        ang = rng.uniform(0, np.pi)
        off = rng.uniform(0.35, 0.7) * size * rng.choice([-1, 1])
        cx, cy = w / 2 + off * np.cos(ang + np.pi / 2), h / 2 + off * np.sin(ang + np.pi / 2)
        dd = np.abs((xx - cx) * np.sin(ang) - (yy - cy) * np.cos(ang))
        r2 = rng.uniform(0.15, 0.3) * size
        tissue += peak * rng.uniform(0.6, 1.1) * _ellipse_chord(dd, r2) / (2 * r2)
    return ndimage.gaussian_filter(tissue, 0.01 * size).astype(np.float32), d


def _extra_bones(bones_total, rng, strength, yy, xx):
    """Patella / fibula-like blobs near the bones: in the frame, not in the target."""
    h, w = bones_total.shape
    size = float(max(h, w))
    out = np.zeros_like(bones_total)
    ys, xs = np.nonzero(bones_total > 0.3 * max(bones_total.max(), 1e-6))
    if len(ys) == 0:
        return out
    for _ in range(rng.integers(1, 3)):
        i = rng.integers(len(ys))
        cx = xs[i] + rng.normal(0, 0.05 * size)
        cy = ys[i] + rng.normal(0, 0.05 * size)
        a, b = rng.uniform(0.03, 0.08) * size, rng.uniform(0.02, 0.05) * size
        th = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / a
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / b
        out += rng.uniform(8, 25) * strength * np.sqrt(np.clip(1 - u * u - v * v, 0, None))
    return out


def _splat_curve(img, pts, weight):
    h, w = img.shape
    r = np.round(pts[:, 1]).astype(int)
    c = np.round(pts[:, 0]).astype(int)
    ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    np.add.at(img, (r[ok], c[ok]), weight)


def _foreign_objects(shape, tissue_dist, rng, eff, strength, yy, xx):
    """Attenuation (mm x density) of markers, beads, wires and sensors."""
    h, w = shape
    size = float(max(h, w))
    att = np.zeros(shape, np.float32)
    # candidate skin positions: where the distance to bone ~ the leg surface
    if eff.markers_on:
        for _ in range(rng.integers(eff.n_markers[0], eff.n_markers[1] + 1)):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(0.008, 0.02) * size
            d = np.hypot(xx - cx, yy - cy)
            disc = np.clip(r + 0.5 - d, 0, 1)
            ring = np.clip(1 - np.abs(d - r) / 1.2, 0, 1)
            att += strength * (rng.uniform(3, 10) * disc + rng.uniform(5, 25) * ring)
            if rng.random() < 0.6:  # metal centre of the marker
                att += strength * rng.uniform(30, 80) * np.clip(0.35 * r + 0.5 - d, 0, 1)
    if eff.beads_on:
        for _ in range(rng.integers(eff.n_beads[0], eff.n_beads[1] + 1)):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(0.003, 0.01) * size
            att += strength * rng.uniform(60, 150) * np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)
    if eff.wires_on:
        wires = np.zeros(shape, np.float32)
        for _ in range(rng.integers(eff.n_wires[0], eff.n_wires[1] + 1)):
            n_seg = rng.integers(1, 4)
            p = rng.uniform(-0.1, 1.1, size=2) * (w, h)
            for _s in range(n_seg):
                ctrl = [p] + [p + rng.normal(0, 0.35, 2) * size for _ in range(3)]
                t = np.linspace(0, 1, int(3 * size))[:, None]
                pts = ((1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1]
                       + 3 * (1 - t) * t ** 2 * ctrl[2] + t ** 3 * ctrl[3])
                _splat_curve(wires, pts, rng.uniform(0.25, 0.6))
                p = ctrl[3]
        wires = np.minimum(wires, 1.0)
        att += strength * rng.uniform(25, 60) * ndimage.gaussian_filter(wires, rng.uniform(0.5, 0.9)) * 2.5
    if eff.sensors_on:
        for _ in range(rng.integers(eff.n_sensors[0], eff.n_sensors[1] + 1)):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            a, b = rng.uniform(0.02, 0.06) * size, rng.uniform(0.006, 0.02) * size
            th = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            box = np.clip(a + 0.5 - np.abs(u), 0, 1) * np.clip(b + 0.5 - np.abs(v), 0, 1)
            inner = 0.5 + 0.5 * (np.cos(u * rng.uniform(0.5, 1.5)) > 0)  # electrode structure
            att += strength * rng.uniform(30, 90) * box * inner
    return ndimage.gaussian_filter(att, 0.4)


def _honeycomb(shape, rng, eff, strength, yy, xx):
    period = _u(rng, eff.honeycomb_period_px)
    amp = _u(rng, eff.honeycomb_amp) * strength
    th = rng.uniform(0, np.pi / 3)
    k = 2 * np.pi / period
    pat = sum(np.cos(k * ((xx * np.cos(th + j * np.pi / 3)) + yy * np.sin(th + j * np.pi / 3)))
              for j in range(3)) / 3.0
    return (1.0 + amp * pat).astype(np.float32)


def _pincushion(img, k, fill):
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    s = max(h, w) / 2
    dy, dx = (yy - cy) / s, (xx - cx) / s
    f = 1.0 / (1.0 + k * (dx * dx + dy * dy))  # sample inward -> image stretched outward
    return ndimage.map_coordinates(img, [cy + dy * f * s, cx + dx * f * s], order=1, cval=fill)


def simulate_fluoroscopy(bone_line_integrals: np.ndarray, rng: np.random.Generator,
                         effects: FluoroEffects | None = None, strength: float = 1.0,
                         noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """Simulate one fluoroscopy frame ``(H, W)`` float32 in [0, 1], bone dark on bright.

    ``bone_line_integrals``: ``(C, H, W)`` (or ``(H, W)``) per-bone line integrals, bone bright.
    ``strength`` scales the amplitude of every random effect (0 -> clean).
    ``rng`` draws the scene (exposure, soft tissue, objects, intensifier field, ...) and, without
    ``noise_rng``, the pixel noise too. With ``noise_rng`` the quantum and electronic noise come from it:
    a generator seeded alike for every frame of a sequence then gives one scene (one C-arm setting, the
    same wires and field) with fresh noise per frame.
    """
    noise = rng if noise_rng is None else noise_rng
    eff = FluoroEffects() if effects is None else effects
    li = np.asarray(bone_line_integrals, dtype=np.float32)
    bones = li.sum(axis=0) if li.ndim == 3 else li
    bones = np.maximum(bones, 0.0)
    h, w = bones.shape
    size = float(max(h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    total = bones.copy()
    tissue_dist = None
    if eff.soft_tissue_on:
        tissue, tissue_dist = _soft_tissue(bones, rng, eff, strength, yy, xx)
        total = total + tissue
    if eff.extra_bones_on and rng.random() < eff.extra_bones_prob:
        total = total + _extra_bones(bones, rng, strength, yy, xx)
    if eff.markers_on or eff.beads_on or eff.wires_on or eff.sensors_on:
        total = total + _foreign_objects((h, w), tissue_dist, rng, eff, strength, yy, xx)
    if eff.focal_blur_on:
        total = ndimage.gaussian_filter(total, _u(rng, eff.focal_sigma_px) * max(strength, 0) + 1e-3)

    mu, gain, gamma = 1.0 / TARGET_LI_SCALE, 1.0, 1.0
    if eff.exposure_on:
        mu *= 1.0 + (_u(rng, eff.mu_scale) - 1.0) * strength
        gain = 1.0 + (_u(rng, eff.gain) - 1.0) * strength
        gamma = 1.0 + (_u(rng, eff.gamma) - 1.0) * strength
    img = gain * np.exp(-mu * total) if eff.exposure_on else clean_drr_target(total)

    if eff.glare_on:
        sig = _u(rng, eff.glare_sigma_frac) * size
        img = img + _u(rng, eff.glare) * strength * ndimage.gaussian_filter(img, sig, mode="nearest")
    if eff.quantum_noise_on and strength > 0:
        n0 = _u(rng, eff.photons) / max(strength, 1e-3)
        img = noise.poisson(np.clip(img, 0, None) * n0).astype(np.float32) / n0
    if eff.honeycomb_on:
        img = img * _honeycomb((h, w), rng, eff, strength, yy, xx)
        bl = _u(rng, eff.blockiness) * strength
        if bl > 0 and h % 2 == 0 and w % 2 == 0:
            blocks = img.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            img = (1 - bl) * img + bl * np.repeat(np.repeat(blocks, 2, 0), 2, 1)
    if eff.detector_blur_on:
        img = ndimage.gaussian_filter(img, _u(rng, eff.detector_sigma_px) * max(strength, 0) + 1e-3)
    if eff.electronic_noise_on:
        sigma = _u(rng, eff.electronic_sigma) * strength
        img = img + noise.normal(0, sigma, img.shape)
    if eff.saturation_on:
        lvl = 1.0 - (1.0 - _u(rng, eff.saturation_level)) * min(max(strength, 0.0), 1.0)
        img = np.clip(img, 0, lvl) / lvl
    img = np.clip(img, 0, None) ** gamma if gamma != 1.0 else img
    if eff.distortion_on:
        img = _pincushion(img.astype(np.float32), _u(rng, eff.pincushion_k) * strength, float(img.mean()))
    if eff.field_on:
        r0 = _u(rng, eff.field_radius_frac) * size
        cx = w / 2 + rng.normal(0, 0.02 * size)
        cy = h / 2 + rng.normal(0, 0.02 * size)
        r = np.hypot(xx - cx, yy - cy)
        vig = 1.0 - _u(rng, eff.vignetting) * strength * (r / r0) ** 2
        edge = np.clip((r0 - r) / 1.5 + 0.5, 0, 1)
        dark = rng.uniform(0.0, 0.03)
        img = (img * vig) * edge + dark * (1 - edge)
    img = np.clip(img, 0, 1)
    if eff.quantize_on:
        img = np.round(img * 255.0) / 255.0
    return img.astype(np.float32)

"""Bring a frame to line-integral polarity: bone bright, background about 0 (what our DRRs are).

Two kinds of input:

* ``"xray"`` -- a raw fluoroscopy frame: transmitted intensity, bone dark on a bright background.
  Beer-Lambert says ``I = I0 exp(-integral mu dl)``, so ``-log(I / I0)`` is the line integral of
  attenuation (up to a scale). ``I0`` (the unattenuated intensity) is taken as a high percentile of
  the in-field values (air beside the leg is the brightest large area), after subtracting the
  frame's dark level when ``value_range`` gives it; ``I / I0`` is clipped to ``[1e-3, 1]``.
* ``"drr"`` -- already bone bright (a clean DRR, a translated frame): a low percentile of the
  in-field values is subtracted as the baseline (clipped at 0).

Either way the result is divided by its in-field 99.5th percentile (``normalise=True``) so that
bone is about 1; similarity metrics are scale invariant, the scale is kept in ``info``. Optionally
(``remove_background_sigma_px``) a Gaussian low-pass of that sigma (in-field, normalised
convolution) is subtracted to reduce slowly varying soft tissue; it also lowers the bone's broad
plateau, so it is off by default. Pixels outside ``fov_mask`` (the image-intensifier circle,
detected with :func:`~Fluoro2DRRLib.metrics.field_of_view_mask` when not given) are set to 0.

``polarity="auto"`` scores three cues on the in-field values (``info`` reports each):

1. the field's periphery (main cue, weight 1): its outer ring is mostly background -- air or thin
   soft tissue beside the leg, bright in an X-ray, ~0 in a DRR. Its median's position in the
   in-field 1-99 % range is above ~0.25 in X-ray polarity (0.4-1 on simulated frames) and below
   ~0.17 for DRRs, even noisy or with added soft tissue; vote ``tanh(6 (position - 0.25))``;
2. skewness (weight 0.25): a bright dominant background with a dark bony tail gives skew < 0,
   a dark dominant background with a bright bony tail skew > 0; unreliable when the soft tissue,
   not air, is the dominant area (then an X-ray is positively skewed too);
3. flat extremes (weight 0.25): the background extreme is large and flat, the bone extreme is
   textured -- compare the mean smoothed gradient in the lowest and in the highest 5 % of values.

X-ray when the score is >= 0 (raw frames are the common input). Limitation: a raw frame whose
periphery is darker than the leg (strong vignetting, a collimated field, a thick leg filling the field)
can be mistaken for a DRR; a sequence therefore decides once for all its frames
(:func:`detect_sequence_polarity`), and the GUI shows the decision and lets the user override it
(``polarity="xray"``).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError

I_OVER_I0_MIN = 1e-3


def _as_frame(frame) -> np.ndarray:
    try:
        import torch

        if isinstance(frame, torch.Tensor):
            frame = frame.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(frame, dtype=np.float64)
    if a.ndim != 2:
        raise InputError("frame", f"expected a single (H, W) frame, got shape {a.shape}")
    if not np.isfinite(a).all():
        finite = np.isfinite(a)
        if not finite.any():
            raise InputError("frame", "the frame has no finite pixel value")
        a = np.where(finite, a, np.median(a[finite]))
    return a


def _fov(frame: np.ndarray, fov_mask) -> np.ndarray:
    if fov_mask is None:
        from .metrics import field_of_view_mask

        fov_mask = field_of_view_mask(frame)
    m = np.asarray(fov_mask.detach().cpu().numpy() if hasattr(fov_mask, "detach") else fov_mask) > 0.5
    if m.shape != frame.shape:
        raise InputError("field-of-view mask", f"shape {m.shape} differs from the frame's {frame.shape}")
    if m.sum() < 16:
        raise InputError("field-of-view mask", "fewer than 16 pixels inside the field of view")
    return m


def detect_polarity(frame, fov_mask=None) -> tuple[str, dict]:
    """``("xray" | "drr", info)`` for a frame (see the module docstring for the three cues)."""
    img = _as_frame(frame)
    inside = _fov(img, fov_mask)
    v = img[inside]
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi - lo <= 0:
        return "xray", {"polarity": "xray", "reason": "flat frame: nothing to decide, assumed raw X-ray",
                        "votes": {}}
    x = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    mean, std = x.mean(), x.std()
    skew = float(np.mean(((x - mean) / max(std, 1e-12)) ** 3))
    # outer ring of the field: inside, but within ~8 % of the image size of its edge
    depth = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    ring = inside & (depth <= max(2.0, 0.08 * min(img.shape)))
    p1, p99 = np.percentile(v, [1.0, 99.0])
    ring_position = float(np.clip((np.median(img[ring]) - p1) / max(p99 - p1, 1e-12), 0.0, 1.0))
    # flat extremes: mean gradient (after a 2 px blur) of the lowest vs the highest 5 % of values
    core = ndimage.binary_erosion(np.pad(inside, 1), iterations=4)[1:-1, 1:-1]
    if core.sum() < 100:
        core = inside
    smooth = ndimage.gaussian_filter(img, 2.0, mode="nearest")
    grad = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))[core]
    sv = smooth[core]
    q_lo, q_hi = np.percentile(sv, [5.0, 95.0])
    g_lo, g_hi = grad[sv <= q_lo].mean(), grad[sv >= q_hi].mean()
    tiny = 1e-12 * (float(grad.max()) + 1e-30)
    flat_ratio = float(np.log((g_lo + tiny) / (g_hi + tiny)))
    votes = {
        "periphery": float(np.tanh(6.0 * (ring_position - 0.25))),  # bright periphery -> X-ray
        "skewness": 0.25 * float(np.tanh(-skew)),  # negative skew -> X-ray
        "flat_extremes": 0.25 * float(np.tanh(flat_ratio)),  # flat bright extreme -> X-ray
    }
    score = sum(votes.values())
    polarity = "xray" if score >= 0 else "drr"
    reason = (f"{'X-ray (bone dark on bright)' if polarity == 'xray' else 'DRR (bone bright on dark)'}: "
              f"field periphery at {100 * ring_position:.0f} % of the range, skewness {skew:+.2f}, "
              f"dark/bright extreme texture ratio {np.exp(flat_ratio):.2g} (score {score:+.2f})")
    return polarity, {"polarity": polarity, "reason": reason, "votes": votes, "score": float(score),
                      "skewness": skew, "periphery_position": ring_position,
                      "texture_log_ratio": flat_ratio}


def detect_sequence_polarity(frames, max_frames: int = 24) -> tuple[str, dict]:
    """One polarity for a sequence ``(N, H, W)``: the scores of :func:`detect_polarity` on up to
    ``max_frames`` evenly spaced frames, summed.

    Frames from one imaging chain share their polarity, but a single frame can fool the cues: on a simulated
    20-frame sequence three frames whose leg filled the field (dark periphery) were called DRRs one by one,
    and the raw-frame refinement then compared them upside down (similarity at the true pose -0.1 to -0.4).
    ``info`` gives the decision, the frames sampled and those that, alone, would have been called otherwise.
    """
    stack = np.asarray(frames)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or len(stack) == 0:
        raise InputError("frames", f"expected a stack of 2-D frames, got shape {stack.shape}")
    finite = np.flatnonzero([np.all(np.isfinite(f)) for f in stack])  # a broken frame is the caller's error
    if len(finite) == 0:
        return "xray", {"polarity": "xray", "reason": "no finite frame: nothing to decide, assumed raw X-ray",
                        "score": 0.0, "frames_sampled": [], "frames_called_otherwise_alone": []}
    spread = np.linspace(0, len(finite) - 1, min(len(finite), max(1, max_frames))).round().astype(int)
    picks = finite[np.unique(spread)]
    step = max(1, int(np.ceil(max(stack.shape[1:]) / 512)))  # the cues are global: 512 px are plenty, and fast
    per_frame = {int(i): detect_polarity(stack[i, ::step, ::step]) for i in picks}
    score = float(sum(info.get("score", 0.0) for _, info in per_frame.values()))
    polarity = "xray" if score >= 0 else "drr"
    n_xray = sum(p == "xray" for p, _ in per_frame.values())
    others = [i for i, (p, _) in per_frame.items() if p != polarity]
    reason = (f"{'X-ray (bone dark on bright)' if polarity == 'xray' else 'DRR (bone bright on dark)'} for the "
              f"whole sequence: {n_xray} of {len(picks)} sampled frames look like X-ray (summed score {score:+.2f})")
    return polarity, {"polarity": polarity, "reason": reason, "score": score,
                      "frames_sampled": [int(i) for i in picks], "frames_called_otherwise_alone": others}


def to_line_integral(frame, polarity: str = "auto", value_range=None, fov_mask=None,
                     remove_background_sigma_px: float | None = None, i0_percentile: float = 99.5,
                     baseline_percentile: float = 1.0, normalise: bool = True) -> tuple[np.ndarray, dict]:
    """A frame ``(H, W)`` -> ``(H, W) float32`` in line-integral polarity (bone bright, background ~0).

    ``value_range=(dark, white)``: the frame's nominal black level and unattenuated (white) level,
    when known (e.g. ``(0, 255)`` is *not* that: pass it only when ``white`` is really the air level);
    otherwise the dark level is 0 and ``I0`` the ``i0_percentile`` of the in-field values.
    Returns ``(image, info)`` with ``info["polarity"]``, ``info["reason"]``, ``info["i0"]`` /
    ``info["baseline"]`` and ``info["scale"]`` (the divisor applied by ``normalise``).
    """
    img = _as_frame(frame)
    inside = _fov(img, fov_mask)
    if polarity not in ("auto", "xray", "drr"):
        raise InputError("polarity", f"must be 'auto', 'xray' or 'drr', not {polarity!r}")
    if polarity == "auto":
        polarity, info = detect_polarity(img, inside)
    else:
        info = {"polarity": polarity, "reason": f"{polarity} polarity given by the caller"}
    v = img[inside]
    if polarity == "xray":
        dark = float(value_range[0]) if value_range is not None else 0.0
        intensity = img - dark
        if value_range is not None:
            i0 = float(value_range[1]) - dark
        else:
            i0 = float(np.percentile(intensity[inside], i0_percentile))
        if not i0 > 0:
            raise InputError("frame", f"no positive unattenuated intensity (I0 = {i0:.3g}): is this a raw X-ray? "
                                      "(try polarity='drr' or give value_range)")
        out = -np.log(np.clip(intensity / i0, I_OVER_I0_MIN, 1.0))
        info["i0"] = i0
        info["dark_level"] = dark
    else:
        base = float(value_range[0]) if value_range is not None else float(np.percentile(v, baseline_percentile))
        out = np.maximum(img - base, 0.0)
        info["baseline"] = base
    if remove_background_sigma_px:
        w = inside.astype(np.float64)
        num = ndimage.gaussian_filter(out * w, remove_background_sigma_px, mode="nearest")
        den = ndimage.gaussian_filter(w, remove_background_sigma_px, mode="nearest")
        out = out - num / np.maximum(den, 1e-6)
        info["background_sigma_px"] = float(remove_background_sigma_px)
    out = np.where(inside, out, 0.0)
    scale = 1.0
    if normalise:
        s = float(np.percentile(out[inside], 99.5))
        scale = s if s > 0 else 1.0
        out = out / scale
    info["scale"] = scale
    return out.astype(np.float32), info

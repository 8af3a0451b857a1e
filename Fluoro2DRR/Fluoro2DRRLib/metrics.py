"""Image similarity metrics for 2D/3D registration (torch, batch-first, differentiable, masked).

Every metric takes ``fixed (B, C, H, W)`` (the frame, usually ``B = 1``) and ``moving (B, C, H, W)``
(the DRRs; ``B`` broadcasts against ``fixed``), an optional ``mask (1|B, 1, H, W)`` with weights in
[0, 1] (the field of view, valid pixels), and returns a ``(B,)`` similarity: higher is better,
1 for a perfect match (up to a positive affine intensity change), -1 for an inverted image.

* :func:`ncc` -- global zero-normalised cross-correlation (weighted by the mask).
* :func:`patch_ncc` -- local NCC in square box windows (stride 1), averaged over the pixels.
  Windows where the *fixed* image is flat (local variance tiny against its global variance) carry
  little weight: a correlation is undefined there and would otherwise pull the score towards 0.
* :func:`multiscale_ncc` -- a weighted sum of global (``None``) and patch NCCs.
* :func:`gradient_ncc` -- NCC of the Sobel x and y gradients (after an optional Gaussian blur of
  ``sigma`` px, replicate-padded so that ``a * x + b`` gives exactly ``a`` times the gradient),
  averaged over the two directions; global by default, in ``patch`` px windows if given.
* :func:`xvr_similarity` -- xvr's loss, as a similarity: ``0.5 * multiscale_ncc(global + 9 px) +
  0.5 * gradient_ncc(11 px patches)``.
* :func:`field_of_view_mask` -- the circular image-intensifier field of a raw frame (numpy/scipy).
* :func:`thin_line_mask` -- thin bright curves of a prepared raw frame (EMG wires, leads): pixels to fill.

Masks are exact: a pixel with weight 0 never influences a global or patch NCC; for the gradient
metric the mask is first eroded by the reach of the blur + Sobel stencil, so a pixel outside the
mask cannot leak into an in-mask gradient either.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FLAT_PATCH_FRACTION = 1e-3  # a fixed patch whose variance is below this x its global variance is "flat"


# ---- helpers ------------------------------------------------------------------------------------
def _prepare(fixed: torch.Tensor, moving: torch.Tensor, mask):
    if fixed.dim() != 4 or moving.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) tensors, got {tuple(fixed.shape)} and {tuple(moving.shape)}")
    if fixed.shape[1:] != moving.shape[1:]:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} differ in C, H or W")
    moving = moving.to(fixed.dtype) if not moving.is_floating_point() else moving
    fixed = fixed.to(moving.dtype)
    batch = max(fixed.shape[0], moving.shape[0])
    if mask is None:
        w = torch.ones((1, 1) + tuple(fixed.shape[2:]), dtype=fixed.dtype, device=fixed.device)
    else:
        w = torch.as_tensor(mask, device=fixed.device).to(fixed.dtype)
        if w.dim() == 2:
            w = w[None, None]
        elif w.dim() == 3:
            w = w[:, None]
        if w.shape[-2:] != fixed.shape[-2:]:
            raise ValueError(f"mask {tuple(w.shape)} does not match the images {tuple(fixed.shape)}")
    return fixed, moving, w, batch


def _flat(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[1:]).reshape(batch, -1)


# ---- global NCC ---------------------------------------------------------------------------------
def ncc(fixed: torch.Tensor, moving: torch.Tensor, mask=None, eps: float = 1e-6) -> torch.Tensor:
    """Weighted zero-normalised cross-correlation per batch item over (C, H, W) -> (B,).

    A flat image (zero variance) gives 0. ``eps`` is relative, so ``a * x + b`` changes nothing.
    """
    fixed, moving, w, batch = _prepare(fixed, moving, mask)
    w = w.expand(-1, fixed.shape[1], -1, -1)
    f, m, w = _flat(fixed, batch), _flat(moving, batch), _flat(w, batch)
    sw = w.sum(-1).clamp_min(1e-12)
    mf = (w * f).sum(-1, keepdim=True) / sw[:, None]
    mm = (w * m).sum(-1, keepdim=True) / sw[:, None]
    df, dm = f - mf, m - mm
    cov = (w * df * dm).sum(-1) / sw
    vf = (w * df * df).sum(-1) / sw
    vm = (w * dm * dm).sum(-1) / sw
    # eps relative to the variances (scale invariant); the floor keeps 0 / 0 (a flat image) at 0
    floor = ((eps ** 2) * (vf * vm).detach()).clamp_min(1e-30)
    return cov / torch.sqrt(vf * vm + floor)


# ---- local NCC ----------------------------------------------------------------------------------
def _box(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Box mean over patch x patch windows (zero padding, stride 1), per channel."""
    return F.avg_pool2d(x, patch, stride=1, padding=patch // 2, count_include_pad=True)


def patch_ncc(fixed: torch.Tensor, moving: torch.Tensor, patch: int = 9, mask=None,
              eps: float = 1e-6) -> torch.Tensor:
    """Local NCC in ``patch`` x ``patch`` windows (odd; stride 1), averaged over valid pixels -> (B,).

    Window statistics are mask-weighted; each window's NCC is weighted by the mask at its centre and
    by ``v^2 / (v^2 + (FLAT_PATCH_FRACTION * global var_f)^2)`` with ``v`` the window's fixed variance (windows where the fixed image is
    flat hardly count). ``eps`` is relative to the global variances, so the metric is invariant to
    ``a * x + b`` of either image.
    """
    patch = int(patch)
    if patch < 3 or patch % 2 == 0:
        raise ValueError(f"patch must be an odd size >= 3, not {patch}")
    fixed, moving, w, batch = _prepare(fixed, moving, mask)
    c = fixed.shape[1]
    w = w.expand(-1, c, -1, -1)
    # centre on the global weighted means first (numerically kinder; does not change local NCC)
    sw = w.sum((1, 2, 3), keepdim=True).clamp_min(1e-12)
    f = fixed - (w * fixed).sum((1, 2, 3), keepdim=True) / sw
    m = moving - (w * moving).sum((1, 2, 3), keepdim=True) / sw
    gvf = ((w * f * f).sum((1, 2, 3)) / sw.view(-1)).detach()
    gvm = ((w * m * m).sum((1, 2, 3)) / sw.view(-1)).detach()
    sw_local = _box(w, patch)
    inv = 1.0 / sw_local.clamp_min(1e-6)
    mf = _box(w * f, patch) * inv
    mm = _box(w * m, patch) * inv
    vf = (_box(w * f * f, patch) * inv - mf * mf).clamp_min(0.0)
    vm = (_box(w * m * m, patch) * inv - mm * mm).clamp_min(0.0)
    cov = _box(w * f * m, patch) * inv - mf * mm
    scale = (gvf.expand(batch) * gvm.expand(batch)).clamp_min(1e-30).view(-1, 1, 1, 1)
    local = cov / torch.sqrt(vf * vm + (eps ** 2) * scale)
    gvf_b = gvf.clamp_min(1e-30).view(-1, 1, 1, 1)
    flat = (FLAT_PATCH_FRACTION * gvf_b) ** 2
    weight = (w * (sw_local > 1e-6) * (vf * vf / (vf * vf + flat))).detach()
    weight = weight.expand(batch, -1, -1, -1)
    local = local.expand(batch, -1, -1, -1)
    return (weight * local).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(1e-12)


def multiscale_ncc(fixed: torch.Tensor, moving: torch.Tensor, patch_sizes=(None, 9), weights=(0.5, 0.5),
                   mask=None) -> torch.Tensor:
    """``sum_k weights[k] * NCC_k``: ``None`` is the global NCC, an int a patch NCC of that size."""
    if len(patch_sizes) != len(weights):
        raise ValueError("patch_sizes and weights must have the same length")
    total = 0.0
    for p, wk in zip(patch_sizes, weights):
        term = ncc(fixed, moving, mask) if p is None else patch_ncc(fixed, moving, int(p), mask)
        total = total + wk * term
    return total


# ---- gradients ----------------------------------------------------------------------------------
def _gaussian_kernel(sigma: float, dtype, device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def image_gradients(x: torch.Tensor, sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel (gx, gy) of ``(B, C, H, W)``, optionally Gaussian-blurred first; replicate padding."""
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    if sigma and sigma > 0:
        k = _gaussian_kernel(float(sigma), x.dtype, x.device)
        r = (k.numel() - 1) // 2
        y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype,
                           device=x.device) / 8.0
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]
    g = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernels)
    g = g.view(b, c, 2, h, w)
    return g[:, :, 0], g[:, :, 1]


def _erode(w: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return w
    return -F.max_pool2d(-w, 2 * radius + 1, stride=1, padding=radius)


def gradient_ncc(fixed: torch.Tensor, moving: torch.Tensor, mask=None, sigma: float = 1.0,
                 patch: int | None = None) -> torch.Tensor:
    """Mean of the NCCs of the x and of the y gradients (global, or ``patch`` px windows) -> (B,).

    The mask is eroded by the stencil's reach (Gaussian radius ``ceil(3 sigma)`` + 1 for Sobel) and
    its weights are not blurred, so pixels outside it never influence the result.
    """
    fixed, moving, w, batch = _prepare(fixed, moving, mask)
    if mask is not None:
        reach = 1 + (max(1, int(math.ceil(3.0 * sigma))) if sigma and sigma > 0 else 0)
        w = _erode(w, reach)
    fx, fy = image_gradients(fixed, sigma)
    mx, my = image_gradients(moving, sigma)
    metric = ncc if patch is None else (lambda a, b, m: patch_ncc(a, b, int(patch), m))
    wm = w if mask is not None else None
    return 0.5 * (metric(fx, mx, wm) + metric(fy, my, wm))


def xvr_similarity(fixed: torch.Tensor, moving: torch.Tensor, mask=None) -> torch.Tensor:
    """xvr's image loss as a similarity in [-1, 1]: 0.5 multiscale NCC (global + 9 px patches)
    + 0.5 gradient NCC in 11 px patches (Sobel after a 1 px Gaussian)."""
    return 0.5 * multiscale_ncc(fixed, moving, (None, 9), (0.5, 0.5), mask) + \
        0.5 * gradient_ncc(fixed, moving, mask, sigma=1.0, patch=11)


# ---- field of view ------------------------------------------------------------------------------
def field_of_view_mask(frame, margin_px: float = 2.0, corner_fraction: float = 0.06,
                       min_area_fraction: float = 0.2, min_iou: float = 0.9):
    """The circular image-intensifier field of a raw frame: 1 inside, 0 outside, ``(H, W)`` float.

    The dark surround is found from the image corners (near-constant and darker than the field);
    the in-field region (pixels clearly different from that level, holes filled, largest
    component) is fitted with a circle (algebraic least squares on its boundary, ignoring the
    image border where the field is cut off). If the corners are not a dark flat surround, or the
    region is not circular (IoU with the fitted disc below ``min_iou``) or is too small, no circular
    field is assumed and the mask is all ones. The disc is shrunk by ``margin_px`` to drop the
    blurred rim. Returns numpy float32 for numpy input, a torch tensor (same device) for torch input.
    """
    from scipy import ndimage

    is_torch = isinstance(frame, torch.Tensor)
    img = frame.detach().cpu().numpy() if is_torch else np.asarray(frame)
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"expected an (H, W) frame, got shape {img.shape}")
    h, w = img.shape
    ones = np.ones((h, w), np.float32)

    def out(m):
        m = m.astype(np.float32)
        return torch.as_tensor(m, device=frame.device) if is_torch else m

    finite = np.isfinite(img)
    if not finite.all():
        img = np.where(finite, img, np.nanmedian(img[finite]) if finite.any() else 0.0)
    lo, hi = np.percentile(img, [0.5, 99.5])
    span = hi - lo
    if min(h, w) < 16 or span <= 0:
        return out(ones)
    n = max(2, int(round(corner_fraction * min(h, w))))
    corners = [img[:n, :n], img[:n, -n:], img[-n:, :n], img[-n:, -n:]]
    levels = np.array([np.median(c) for c in corners])
    spreads = np.array([np.percentile(c, 90) - np.percentile(c, 10) for c in corners])
    level = float(np.median(levels))
    field_median = float(np.median(img[n:-n, n:-n]))
    # the surround must be dark and flat: all corners alike, well below the field's median
    if (np.ptp(levels) > 0.1 * span or np.max(spreads) > 0.1 * span or field_median - level < 0.2 * span):
        return out(ones)
    smooth = ndimage.uniform_filter(img, 3)
    thr = max(0.1 * span, 4.0 * float(np.max(spreads)))
    inside = smooth > level + thr
    inside = ndimage.binary_opening(inside, iterations=2)
    labels, count = ndimage.label(inside)
    if count == 0:
        return out(ones)
    sizes = ndimage.sum(inside, labels, index=np.arange(1, count + 1))
    region = ndimage.binary_fill_holes(labels == (1 + int(np.argmax(sizes))))
    if region.sum() < min_area_fraction * h * w:
        return out(ones)
    edge = region & ~ndimage.binary_erosion(region)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = False
    rows, cols = np.nonzero(edge)
    if rows.size < 20:
        return out(ones)
    # Kasa fit: x^2 + y^2 = a x + b y + c
    a_mat = np.stack([cols, rows, np.ones_like(cols)], 1).astype(float)
    rhs = cols.astype(float) ** 2 + rows.astype(float) ** 2
    (a, b, c), *_ = np.linalg.lstsq(a_mat, rhs, rcond=None)
    cx, cy = a / 2.0, b / 2.0
    r2 = c + cx ** 2 + cy ** 2
    if r2 <= 0:
        return out(ones)
    radius = math.sqrt(r2)
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(xx - cx, yy - cy)
    disc = dist <= radius
    iou = (disc & region).sum() / max(1, (disc | region).sum())
    if iou < min_iou:
        return out(ones)
    return out(dist <= radius - margin_px)


def thin_line_mask(image: np.ndarray, fov: np.ndarray, max_width_px: float, min_area_px: float,
                   noise_multiple: float = 8.0, min_contrast_fraction: float = 0.03) -> np.ndarray:
    """Pixels of thin bright curves in a prepared raw frame (line-integral polarity: attenuation is bright):
    EMG wires, leads, cables. ``(H, W)`` bool, True on such a curve (dilated by one pixel).

    A curve narrower than ``max_width_px`` stands out of the image's grey opening by a disc of that
    diameter (the white top-hat); a bone, tens of pixels wide, does not, nor does a bone's edge, a step that
    the opening keeps. Kept: top-hat responses above ``noise_multiple`` times the frame's noise (robust
    spread of the lightly smoothed image's residual from a wider blur) and above ``min_contrast_fraction`` of
    the field's intensity range (so a noise-free frame does not flag the cortex's rims), in connected pieces
    of at least ``min_area_px`` (noise specks in bright, noisy regions are smaller). Only inside ``fov``
    (eroded by the disc: the field's rim is not a curve).
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    inside = np.asarray(fov) > 0.5
    radius = max(1, int(round(max_width_px / 2.0)))
    inner = ndimage.binary_erosion(inside, iterations=radius + 2)
    if img.ndim != 2 or inner.sum() < 16:
        return np.zeros(img.shape[-2:], bool)
    smooth = ndimage.gaussian_filter(img, 1.0)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = (xx ** 2 + yy ** 2) <= radius ** 2
    top_hat = smooth - ndimage.grey_opening(smooth, footprint=disc)
    residual = (smooth - ndimage.gaussian_filter(img, 2.0))[inner]
    noise = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    lo, hi = np.percentile(img[inner], [1, 99])
    threshold = max(noise_multiple * noise, min_contrast_fraction * float(hi - lo))
    curve = (top_hat > threshold) & inner
    labels, count = ndimage.label(curve, structure=np.ones((3, 3)))
    if count == 0:
        return curve
    sizes = ndimage.sum(curve, labels, index=np.arange(1, count + 1))
    curve = np.isin(labels, 1 + np.flatnonzero(sizes >= min_area_px))
    return ndimage.binary_dilation(curve)

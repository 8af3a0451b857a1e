"""Losses for the translation networks (all our own implementations).

* L1, SSIM (Gaussian 11x11 window, sigma 1.5, on [0, 1] images), gradient / edge L1.
* ``StructurePerceptualLoss`` -- the perceptual term that needs no download. LPIPS compares deep
  features of an ImageNet-pretrained backbone; those weights cannot be fetched here, so we use a
  fixed (seeded, never trained) bank of random 3x3/5x5 convolutions + ReLU applied at three scales of
  an image pyramid together with multi-scale gradients. Random conv features are a known
  texture / structure descriptor; combined with the multi-scale gradients they penalise blur and
  missing or extra edges at several scales, which is what LPIPS is used for in the method.
  Being seeded, the bank is identical on every machine (no weights to ship).
* ``LPIPSLoss`` -- only when the user supplies a TorchScript file computing ``d(x, y)`` for
  (B, 3, H, W) images in [-1, 1]; otherwise a clear error.
* Segmentation: BCE-with-logits on the predicted bone mask and bone-weighted L1.
* Adversarial: LSGAN (default) or BCE.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError


def l1_loss(pred, target):
    return (pred - target).abs().mean()


def _gauss_window(size=11, sigma=1.5, device=None, dtype=None):
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return g.to(dtype or torch.float32)


def ssim(x, y, window: int = 11, sigma: float = 1.5, data_range: float = 1.0, reduce=True):
    """Structural similarity of (B, C, H, W) images (Gaussian window, separable, 'valid' borders)."""
    c = x.shape[1]
    g = _gauss_window(window, sigma, x.device, x.dtype)
    gh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    gv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(z):
        return F.conv2d(F.conv2d(z, gh, groups=c), gv, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean() if reduce else s.mean(dim=(1, 2, 3))


def ssim_loss(pred, target):
    return 1.0 - ssim(pred, target)


def _grads(x):
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def gradient_loss(pred, target):
    """L1 between horizontal and vertical finite differences (edge loss)."""
    px, py = _grads(pred)
    tx, ty = _grads(target)
    return (px - tx).abs().mean() + (py - ty).abs().mean()


class StructurePerceptualLoss(nn.Module):
    """Download-free perceptual term: fixed random conv features + gradients on a 3-level pyramid."""

    def __init__(self, n_features: int = 16, scales: int = 3, seed: int = 1234):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w1 = torch.randn(n_features, 1, 5, 5, generator=gen)
        w1 = w1 - w1.mean(dim=(2, 3), keepdim=True)  # zero-mean: responds to structure, not level
        w1 = w1 / w1.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        w2 = torch.randn(n_features, n_features, 3, 3, generator=gen) / (3 * n_features ** 0.5)
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)
        self.scales = scales

    def features(self, x):
        h = F.relu(F.conv2d(x, self.w1, padding=2))
        return [h, F.relu(F.conv2d(h, self.w2, padding=1))]

    def forward(self, pred, target):
        loss = pred.new_zeros(())
        for s in range(self.scales):
            if s:
                pred, target = F.avg_pool2d(pred, 2), F.avg_pool2d(target, 2)
            for fp, ft in zip(self.features(pred), self.features(target)):
                loss = loss + (fp - ft).abs().mean()
            loss = loss + gradient_loss(pred, target)
        return loss / self.scales


class LPIPSLoss(nn.Module):
    """LPIPS from a user-supplied TorchScript file (``d(x, y)`` on (B,3,H,W) in [-1, 1]).

    We cannot download ImageNet-pretrained weights, so LPIPS is only used when the user provides
    such a file (config key ``lpips_weights``).
    """

    def __init__(self, weights_path=None):
        super().__init__()
        if not weights_path:
            raise InputError("lpips", "LPIPS needs ImageNet-pretrained weights that are not bundled and "
                                      "cannot be downloaded; set 'lpips_weights' to a TorchScript file "
                                      "computing d(x, y), or set the 'lpips' weight to 0 and use "
                                      "'perceptual' (download-free) instead")
        p = Path(weights_path)
        if not p.is_file():
            raise InputError(p, "LPIPS weights file not found")
        try:
            self.net = torch.jit.load(str(p), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001
            raise InputError(p, f"not a TorchScript LPIPS module ({exc})") from exc
        for q in self.net.parameters():
            q.requires_grad_(False)

    def forward(self, pred, target):
        return self.net(pred.repeat(1, 3, 1, 1) * 2 - 1, target.repeat(1, 3, 1, 1) * 2 - 1).mean()


def segmentation_loss(mask_logit, mask, pred=None, target=None, bone_weight: float = 4.0):
    """BCE on the bone-mask logit, plus (when images are given) bone-weighted L1."""
    loss = F.binary_cross_entropy_with_logits(mask_logit, mask)
    if pred is not None and target is not None:
        w = 1.0 + bone_weight * mask
        loss = loss + ((pred - target).abs() * w).sum() / w.sum()
    return loss


def adversarial_loss(logits, real: bool, kind: str = "lsgan"):
    if kind == "lsgan":
        return ((logits - (1.0 if real else 0.0)) ** 2).mean()
    tgt = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, tgt)


DEFAULT_WEIGHTS = {"l1": 0.5, "ssim": 0.3, "perceptual": 0.2, "lpips": 0.0, "gradient": 0.0,
                   "seg": 0.2, "adv": 1e-3}


class GeneratorLoss(nn.Module):
    """Weighted sum of the terms; weights from the config (missing keys -> DEFAULT_WEIGHTS)."""

    def __init__(self, weights: dict | None = None, lpips_weights=None, adv_kind: str = "lsgan"):
        super().__init__()
        self.w = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.perceptual = StructurePerceptualLoss()
        self.lpips = LPIPSLoss(lpips_weights) if self.w.get("lpips", 0) > 0 else None
        self.adv_kind = adv_kind

    def forward(self, pred, target, mask_logit=None, mask=None, d_fake=None):
        terms = {}
        w = self.w
        if w["l1"]:
            terms["l1"] = l1_loss(pred, target)
        if w["ssim"]:
            terms["ssim"] = ssim_loss(pred, target)
        if w["perceptual"]:
            terms["perceptual"] = self.perceptual(pred, target)
        if w["gradient"]:
            terms["gradient"] = gradient_loss(pred, target)
        if self.lpips is not None:
            terms["lpips"] = self.lpips(pred, target)
        if w["seg"] and mask is not None:
            terms["seg"] = segmentation_loss(mask_logit, mask, pred, target) if mask_logit is not None \
                else segmentation_loss(torch.zeros_like(mask), mask, pred, target) - \
                F.binary_cross_entropy_with_logits(torch.zeros_like(mask), mask)
        if w["adv"] and d_fake is not None:
            terms["adv"] = adversarial_loss(d_fake, True, self.adv_kind)
        total = sum(w[k] * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}

"""Translation networks (our own small implementations, sized for CPU inference).

Stage 1: :class:`UNetGenerator` (pix2pix-style U-Net with skip concatenation; outputs the DRR-like
image and a bone-mask logit) trained against :class:`PatchDiscriminator` (conditional PatchGAN seeing
(input, output) pairs; with 3 stride-2 layers + 2 stride-1 4x4 layers its receptive field is 70 px).

Stage 2 (restoration / "demosaicking" of the stage-1 output): :class:`SlimDRUNet` (DRUNet layout:
4 levels, residual blocks conv3-ReLU-conv3 + identity, stride-2 2x2 conv down, stride-2 transposed
conv up, additive skips, no normalisation, no bias, constant noise-level map as an extra input
channel, global residual), or :class:`SRResNetLite` / :class:`NAFNetLite`, chosen by
:func:`build_stage2`. Stage-2 networks keep the resolution (the working grid is resized back to the
frame grid by the caller).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- stage 1
class _DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout, affine=True),
            nn.LeakyReLU(0.2, inplace=True))


class UNetGenerator(nn.Module):
    """U-Net: ``depth`` stride-2 downsamplings, channels ``base * 2**level`` (capped at ``max_ch``).

    ``forward(x (B,1,H,W) in [0,1]) -> (image (B,1,H,W) in [0,1], mask_logit (B,1,H,W))``; the image
    head is linear with a straight-through clamp to [0, 1].
    H and W must be multiples of ``2**depth`` (the caller pads).
    """

    def __init__(self, in_ch: int = 1, base: int = 16, depth: int = 4, max_ch: int = 128):
        super().__init__()
        self.depth = depth
        ch = [min(base * 2 ** i, max_ch) for i in range(depth + 1)]
        self.inc = _DoubleConv(in_ch, ch[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch[i], ch[i], 4, stride=2, padding=1, bias=False),
                          nn.LeakyReLU(0.2, inplace=True), _DoubleConv(ch[i], ch[i + 1]))
            for i in range(depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in reversed(range(depth)))
        self.decs = nn.ModuleList(_DoubleConv(2 * ch[i], ch[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(ch[0], 2, 1)
        with torch.no_grad():  # start from "all background" (white, no bone): most target pixels
            self.head.bias.copy_(torch.tensor([1.0, -2.0]))

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up, dec in zip(self.ups, self.decs):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
        out = self.head(h)
        img = out[:, :1]
        # straight-through clamp: values in [0, 1], gradients as if linear (a sigmoid saturates
        # exactly where most target pixels are: the white background at 1.0)
        img = img + (img.clamp(0, 1) - img).detach()
        return img, out[:, 1:2]


class PatchDiscriminator(nn.Module):
    """Conditional PatchGAN on ``cat(input, output)``: a grid of real/fake logits (70x70 fields)."""

    def __init__(self, in_ch: int = 2, base: int = 32, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, base, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = base
        for i in range(1, n_layers):
            nxt = min(base * 2 ** i, 256)
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), nn.InstanceNorm2d(nxt, affine=True),
                       nn.LeakyReLU(0.2, True)]
            ch = nxt
        nxt = min(ch * 2, 256)
        layers += [nn.Conv2d(ch, nxt, 4, 1, 1, bias=False), nn.InstanceNorm2d(nxt, affine=True),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(nxt, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, inp, out):
        return self.net(torch.cat([inp, out], dim=1))


# ------------------------------------------------------------------------------------- stage 2
class _ResBlock(nn.Module):
    """conv3-ReLU-conv3 + identity, no bias, no normalisation."""

    def __init__(self, ch):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.c2(F.relu(self.c1(x)))


class SlimDRUNet(nn.Module):
    """DRUNet layout with slim widths. Input: image + constant noise-level map (2 channels)."""

    multiple = 8

    def __init__(self, channels=(16, 32, 64, 128), n_blocks: int = 2, noise_level: float = 0.02):
        super().__init__()
        c = list(channels)
        self.noise_level = noise_level
        self.head = nn.Conv2d(2, c[0], 3, padding=1, bias=False)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        for i in range(3):
            self.enc.append(nn.Sequential(*[_ResBlock(c[i]) for _ in range(n_blocks)]))
            self.down.append(nn.Conv2d(c[i], c[i + 1], 2, stride=2, bias=False))
        self.body = nn.Sequential(*[_ResBlock(c[3]) for _ in range(n_blocks)])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(3)):
            self.up.append(nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2, bias=False))
            self.dec.append(nn.Sequential(*[_ResBlock(c[i]) for _ in range(n_blocks)]))
        self.tail = nn.Conv2d(c[0], 1, 3, padding=1, bias=False)

    def forward(self, x, noise_level: float | None = None):
        sigma = self.noise_level if noise_level is None else noise_level
        h = self.head(torch.cat([x, torch.full_like(x, sigma)], dim=1))
        skips = []
        for enc, down in zip(self.enc, self.down):
            h = enc(h)
            skips.append(h)
            h = down(h)
        h = self.body(h)
        for up, dec in zip(self.up, self.dec):
            h = dec(up(h) + skips.pop())
        return x + self.tail(h)


class SRResNetLite(nn.Module):
    """Single-scale residual network (SRResNet-like, no upsampling), global residual."""

    multiple = 1

    def __init__(self, width: int = 32, n_blocks: int = 6, noise_level: float = 0.02):
        super().__init__()
        self.noise_level = noise_level
        self.head = nn.Conv2d(2, width, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(width) for _ in range(n_blocks)],
                                  nn.Conv2d(width, width, 3, padding=1))
        self.tail = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x, noise_level: float | None = None):
        sigma = self.noise_level if noise_level is None else noise_level
        h = self.head(torch.cat([x, torch.full_like(x, sigma)], dim=1))
        return x + self.tail(h + self.body(h))


class _LayerNorm2d(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + 1e-6)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class _NAFBlock(nn.Module):
    """NAFNet block: LN, 1x1 expand, depthwise 3x3, simple gate, simplified channel attention, FFN."""

    def __init__(self, ch):
        super().__init__()
        self.n1, self.n2 = _LayerNorm2d(ch), _LayerNorm2d(ch)
        self.pw1 = nn.Conv2d(ch, 2 * ch, 1)
        self.dw = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1, groups=2 * ch)
        self.sca = nn.Conv2d(ch, ch, 1)
        self.pw2 = nn.Conv2d(ch, ch, 1)
        self.ff1 = nn.Conv2d(ch, 2 * ch, 1)
        self.ff2 = nn.Conv2d(ch, ch, 1)
        self.beta = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, ch, 1, 1))

    def forward(self, x):
        a, b = self.dw(self.pw1(self.n1(x))).chunk(2, dim=1)
        h = a * b
        h = h * self.sca(h.mean(dim=(2, 3), keepdim=True))
        x = x + self.beta * self.pw2(h)
        a, b = self.ff1(self.n2(x)).chunk(2, dim=1)
        return x + self.gamma * self.ff2(a * b)


class NAFNetLite(nn.Module):
    """Two-level NAFNet-style U-Net, global residual."""

    multiple = 4

    def __init__(self, width: int = 24, n_blocks: int = 2, noise_level: float = 0.02):
        super().__init__()
        self.noise_level = noise_level
        w = width
        self.head = nn.Conv2d(2, w, 3, padding=1)
        self.e1 = nn.Sequential(*[_NAFBlock(w) for _ in range(n_blocks)])
        self.d1 = nn.Conv2d(w, 2 * w, 2, stride=2)
        self.e2 = nn.Sequential(*[_NAFBlock(2 * w) for _ in range(n_blocks)])
        self.d2 = nn.Conv2d(2 * w, 4 * w, 2, stride=2)
        self.mid = nn.Sequential(*[_NAFBlock(4 * w) for _ in range(n_blocks)])
        self.u2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.r2 = nn.Sequential(*[_NAFBlock(2 * w) for _ in range(n_blocks)])
        self.u1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.r1 = nn.Sequential(*[_NAFBlock(w) for _ in range(n_blocks)])
        self.tail = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, x, noise_level: float | None = None):
        sigma = self.noise_level if noise_level is None else noise_level
        h1 = self.e1(self.head(torch.cat([x, torch.full_like(x, sigma)], dim=1)))
        h2 = self.e2(self.d1(h1))
        h = self.mid(self.d2(h2))
        h = self.r2(self.u2(h) + h2)
        h = self.r1(self.u1(h) + h1)
        return x + self.tail(h)


STAGE2 = {"drunet": SlimDRUNet, "srresnet": SRResNetLite, "nafnet": NAFNetLite}


def build_stage2(name: str = "drunet", **kw) -> nn.Module:
    """Stage-2 network by name: ``drunet`` (default), ``srresnet`` or ``nafnet``."""
    key = name.lower().replace("-", "").replace("_", "")
    key = {"slimdrunet": "drunet", "srresnetlite": "srresnet", "nafnetlite": "nafnet"}.get(key, key)
    if key not in STAGE2:
        raise ValueError(f"unknown stage-2 network {name!r}; choose one of {sorted(STAGE2)}")
    return STAGE2[key](**kw)


def build_stage1(**kw) -> UNetGenerator:
    return UNetGenerator(**kw)


def pad_to_multiple(x: torch.Tensor, m: int):
    """Reflect-pad (B,C,H,W) so H, W are multiples of ``m``; returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, (h, w)

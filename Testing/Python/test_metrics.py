"""Similarity metrics: perfect match, inversion, affine intensity invariance, shift monotonicity,
gradients, masking, broadcasting; field-of-view detection."""
import numpy as np
import pytest
import torch

from Fluoro2DRRLib import metrics as M

H = W = 64


def blob_image(shift_px=0.0, seed=0):
    """Smooth, textured image: a few anisotropic Gaussian blobs, shifted along x by shift_px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W].astype(float)
    img = np.zeros((H, W))
    for _ in range(6):
        cx, cy = rng.uniform(16, 48, 2)
        sx, sy = rng.uniform(4, 9, 2)
        img += rng.uniform(0.5, 1.5) * np.exp(-0.5 * (((xx - cx - shift_px) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    return torch.tensor(img, dtype=torch.float64)[None, None]


METRICS = {
    "ncc": M.ncc,
    "patch_ncc": lambda f, m, mask=None: M.patch_ncc(f, m, 9, mask),
    "multiscale_ncc": M.multiscale_ncc,
    "gradient_ncc": M.gradient_ncc,
    "gradient_ncc_patch": lambda f, m, mask=None: M.gradient_ncc(f, m, mask, patch=11),
    "xvr_similarity": M.xvr_similarity,
}


@pytest.fixture(params=sorted(METRICS))
def metric(request):
    return METRICS[request.param]


def test_identical_is_one(metric):
    x = blob_image()
    assert metric(x, x.clone()).item() == pytest.approx(1.0, abs=1e-5)


def test_inverted_is_minus_one(metric):
    x = blob_image()
    assert metric(x, -x).item() == pytest.approx(-1.0, abs=1e-5)


def test_affine_intensity_invariance(metric):
    x, y = blob_image(), blob_image(2.0)
    ref = metric(x, y).item()
    assert metric(x, 3.7 * y + 11.0).item() == pytest.approx(ref, abs=1e-6)
    assert metric(0.2 * x - 5.0, y).item() == pytest.approx(ref, abs=1e-6)


def test_shift_decreases_monotonically(metric):
    x = blob_image()
    values = [metric(x, blob_image(k)).item() for k in range(6)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_gradients_flow(metric):
    x = blob_image().float()
    y = blob_image(2.0).float().requires_grad_(True)
    metric(x, y).sum().backward()
    assert torch.isfinite(y.grad).all()
    assert y.grad.abs().max() > 0


def test_gradients_flow_at_identity_with_flat_regions():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 10:20, 12:22] = 1.0
    y = x.clone().requires_grad_(True)
    M.xvr_similarity(x, y).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_mask_excludes_corrupted_region(metric):
    x, y = blob_image(), blob_image(1.0)
    mask = torch.ones(1, 1, H, W, dtype=x.dtype)
    mask[..., :, 44:] = 0.0
    mask[..., :6, :] = 0.0
    ref = metric(x, y, mask=mask).item()
    corrupted = y.clone()
    corrupted[..., :, 44:] = torch.randn(H, W - 44, dtype=x.dtype) * 5
    corrupted[..., :6, :] += 100.0
    assert metric(x, corrupted, mask=mask).item() == pytest.approx(ref, abs=1e-9)
    # without the mask the corruption matters
    assert abs(metric(x, corrupted).item() - ref) > 1e-3


def test_broadcasting_one_fixed_three_moving(metric):
    x = blob_image()
    moving = torch.cat([blob_image(k) for k in (0, 2, 4)], 0)
    out = metric(x, moving)
    assert out.shape == (3,)
    for i in range(3):
        assert out[i].item() == pytest.approx(metric(x, moving[i:i + 1]).item(), abs=1e-9)
    mask = torch.ones(3, 1, H, W, dtype=x.dtype)
    assert metric(x, moving, mask=mask).shape == (3,)


def test_multichannel_and_shape_errors():
    x = torch.cat([blob_image(), blob_image(seed=1)], 1)
    assert M.ncc(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert M.patch_ncc(x, x).item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        M.ncc(x, x[:, :1])
    with pytest.raises(ValueError):
        M.patch_ncc(x, x, patch=4)


def test_gradient_operator_signs():
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    gx, gy = M.image_gradients(ramp, sigma=0)
    assert torch.allclose(gx[..., 2:-2, 2:-2], torch.ones(1)) and torch.allclose(gy, torch.zeros(1))
    gx, gy = M.image_gradients(ramp.transpose(-1, -2), sigma=1.0)
    assert torch.allclose(gy[..., 4:-4, 4:-4], torch.ones(1), atol=1e-5)


# ---- field of view ------------------------------------------------------------------------------
def intensifier_frame(h=120, w=140, cx=72.0, cy=58.0, r=52.0, seed=0, surround=3.0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(float)
    inside = np.hypot(xx - cx, yy - cy) <= r
    img = 180 - 60 * np.exp(-0.5 * (((xx - cx) / 12) ** 2 + ((yy - cy) / 30) ** 2))  # a dark bone
    img = img + rng.normal(0, 4, img.shape)
    return np.where(inside, img, surround + rng.normal(0, 1, img.shape)), inside


def test_fov_mask_detects_circle():
    frame, inside = intensifier_frame()
    m = M.field_of_view_mask(frame)
    assert m.shape == frame.shape and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert (m.astype(bool) & ~inside).sum() == 0  # never outside the field
    assert m.sum() > 0.9 * inside.sum()


def test_fov_mask_circle_cut_by_image_border_and_torch_input():
    frame, inside = intensifier_frame(cx=70, cy=60, r=66)  # wider than the image: cut top/bottom
    m = M.field_of_view_mask(torch.tensor(frame))
    assert isinstance(m, torch.Tensor)
    m = m.numpy().astype(bool)
    assert (m & ~inside).sum() == 0 and m.sum() > 0.9 * inside.sum()


def test_fov_mask_all_ones_without_circle():
    rng = np.random.default_rng(1)
    assert M.field_of_view_mask(rng.normal(100, 10, (80, 90))).min() == 1.0
    frame, _ = intensifier_frame()
    drr_like = np.zeros((100, 100))
    drr_like[30:70, 20:50] = 5.0  # a bright rectangle on a dark background: not a field
    assert M.field_of_view_mask(drr_like).min() == 1.0
    assert M.field_of_view_mask(np.full((50, 50), 7.0)).min() == 1.0


def wire_scene(noise: float = 0.01, seed: int = 3):
    """A prepared raw frame (line-integral polarity, 256 px): a soft-tissue ramp, a bone (a wide bright
    rounded block), a 3 px wire curving across both, noise; with the wire's centre line, its pixels and the bone."""
    rng = np.random.default_rng(seed)
    n = 256
    yy, xx = np.mgrid[:n, :n].astype(float)
    image = 0.3 + 0.2 * xx / n  # soft tissue
    bone = ((xx - 128) / 45) ** 4 + ((yy - 120) / 70) ** 4 < 1.0
    image += 0.5 * bone
    wire_y = 60 + 150 * (xx / n) + 25 * np.sin(xx / 20)  # crosses the bone and its edges
    wire = 0.25 * np.exp(-0.5 * ((yy - wire_y) / 1.2) ** 2) * ((xx > 20) & (xx < 236))
    image += wire
    centre = (np.abs(yy - wire_y) < 0.6) & (xx > 30) & (xx < 226)
    image += rng.normal(0.0, noise, image.shape)
    return image.astype(np.float32), np.ones((n, n), np.float32), centre, wire > 0.01, bone


def test_thin_line_mask_takes_the_wire_not_the_bone_or_the_noise():
    from scipy import ndimage

    image, fov, centre, wire, bone = wire_scene()
    mask = M.thin_line_mask(image, fov, max_width_px=7.0, min_area_px=40.0)
    assert mask.dtype == bool and mask.shape == image.shape
    assert mask[centre].mean() > 0.9, mask[centre].mean()  # the wire is taken, along its whole length
    away = ~ndimage.binary_dilation(wire, iterations=2)
    assert mask[away & bone].mean() < 0.005, mask[away & bone].mean()  # the bone and its edges are not
    assert mask[away].mean() < 0.005, mask[away].mean()  # nor the noise
    # a noise-free frame without wires (soft tissue's broad swell, the bone): nothing is taken (with no noise to
    # measure against, the contrast floor keeps the swell's faint top-hat out)
    yy, xx = np.mgrid[:256, :256]
    swell = 0.3 * np.exp(-((xx - 90.0) ** 2 + (yy - 150.0) ** 2) / (2 * 40.0 ** 2))
    clean_bone = (0.3 + swell + 0.5 * bone).astype(np.float32)
    assert M.thin_line_mask(clean_bone, fov, 7.0, 40.0).sum() == 0
    # outside the field nothing is taken, and the field's rim is not a curve
    circle = ((np.mgrid[:256, :256] - 128.0) ** 2).sum(0) < 100.0 ** 2
    inside_only = M.thin_line_mask(image * circle, circle.astype(np.float32), 7.0, 40.0)
    assert not inside_only[~circle].any() and inside_only[centre & circle].mean() > 0.85

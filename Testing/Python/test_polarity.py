"""Polarity: raw X-ray frames (bone dark) and DRRs (bone bright) detected and mapped to line integrals."""
import numpy as np
import pytest
import torch

from Fluoro2DRRLib import metrics
from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.geometry import knee_default_geometry
from Fluoro2DRRLib.phantom import knee_flexion_sequence, make_knee_phantom
from Fluoro2DRRLib.polarity import detect_polarity, detect_sequence_polarity, to_line_integral
from Fluoro2DRRLib.render import render_numpy

MU = 0.05  # 1 / mm-density
I0 = 1000.0  # counts per pixel without attenuation


@pytest.fixture(scope="module")
def line_integrals():
    """(3 frames, 2 bones, 128, 128) line integrals of the procedural knee (coarse voxels: fast)."""
    bones = make_knee_phantom(0, voxel_mm=1.2, mesh=False)
    g = knee_default_geometry().resized(128)
    poses = knee_flexion_sequence(3, g.world_from_source, 830.0)
    return render_numpy(g, [bones["femur"], bones["tibia"]], np.stack([poses["femur"], poses["tibia"]], 1))


def soft_tissue(drr, rng, peak=10.0):
    """A leg-like cylinder of soft tissue around the bones (smooth, along the image's vertical)."""
    h, w = drr.shape
    cols = np.arange(w)
    centre = (drr.sum(0) * cols).sum() / drr.sum() + rng.uniform(-3, 3)
    radius = rng.uniform(0.35, 0.45) * w
    profile = peak * np.sqrt(np.clip(1.0 - ((cols - centre) / radius) ** 2, 0.0, None))
    return np.broadcast_to(profile, (h, w)).copy()


def simulate_xray(li, rng, noise=True, circle=True):
    """Raw frame: I0 exp(-MU (bones + soft tissue)), Poisson-like noise, a dark surround outside a circle."""
    drr = li.sum(0)
    frame = I0 * np.exp(-MU * (drr + soft_tissue(drr, rng)))
    if noise:
        frame = frame + rng.normal(0.0, 1.0, frame.shape) * np.sqrt(frame)
    fov = np.ones_like(drr, bool)
    if circle:
        h, w = drr.shape
        yy, xx = np.mgrid[:h, :w]
        fov = np.hypot(xx - w / 2 + rng.uniform(-2, 2), yy - h / 2 + rng.uniform(-2, 2)) <= 0.47 * w
        frame = np.where(fov, frame, 8.0 + rng.normal(0, 1, frame.shape))
    return frame.astype(np.float32), fov


def masked_ncc(a, b, mask=None):
    t = lambda x: torch.as_tensor(np.asarray(x, np.float64))[None, None]  # noqa: E731
    return metrics.ncc(t(a), t(b), None if mask is None else t(mask.astype(float))).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_detects_both_polarities(line_integrals, seed):
    rng = np.random.default_rng(seed)
    for li in line_integrals:
        for noise in (False, True):
            frame, _ = simulate_xray(li, rng, noise=noise, circle=bool(seed % 2))
            pol, info = detect_polarity(frame)
            assert pol == "xray", info["reason"]
        drr = li.sum(0) + rng.normal(0, 0.2, li.shape[1:])
        pol, info = detect_polarity(drr)
        assert pol == "drr", info["reason"]
        # a translated frame in bone-bright polarity with some soft tissue is still a DRR
        pol, info = detect_polarity(drr + 0.3 * soft_tissue(drr, rng))
        assert pol == "drr", info["reason"]


@pytest.mark.parametrize("noise,threshold", [(False, 0.9), (True, 0.8)])
def test_xray_to_line_integral_matches_drr(line_integrals, noise, threshold):
    rng = np.random.default_rng(3)
    for li in line_integrals:
        drr = li.sum(0)
        frame, fov = simulate_xray(li, rng, noise=noise)
        out, info = to_line_integral(frame)
        assert info["polarity"] == "xray" and out.dtype == np.float32 and out.shape == frame.shape
        inner = fov & (metrics.field_of_view_mask(frame) > 0)
        assert inner.sum() > 0.6 * fov.sum()
        assert np.all(out[~fov] == 0)  # outside the intensifier circle
        assert masked_ncc(out, drr, inner) > threshold
        assert masked_ncc(frame, drr, inner) < -0.5  # raw frame: anti-correlated
        assert np.percentile(out[inner], 99.5) == pytest.approx(1.0, rel=1e-3)  # normalised


def test_xray_is_beer_lambert_without_noise(line_integrals):
    """Noise-free, no soft tissue, known I0: exactly MU x line integral (before normalising)."""
    drr = line_integrals[0].sum(0)
    frame = I0 * np.exp(-MU * drr)
    out, info = to_line_integral(frame, polarity="xray", value_range=(0.0, I0), normalise=False,
                                 fov_mask=np.ones_like(drr))
    np.testing.assert_allclose(out, MU * np.minimum(drr, -np.log(1e-3) / MU), atol=1e-5)


def test_drr_passthrough_and_background_option(line_integrals):
    drr = line_integrals[1].sum(0)
    out, info = to_line_integral(drr + 5.0, polarity="auto")
    assert info["polarity"] == "drr" and info["baseline"] == pytest.approx(5.0, abs=1e-3)
    assert masked_ncc(out, drr) > 0.999
    frame, fov = simulate_xray(line_integrals[1], np.random.default_rng(4), noise=False)
    out_bg, info = to_line_integral(frame, remove_background_sigma_px=20.0)
    assert info["background_sigma_px"] == 20.0 and np.isfinite(out_bg).all()
    assert masked_ncc(out_bg, drr, fov) > 0.5


def test_fluoro_sim_frames_are_detected(line_integrals):
    fluoro_sim = pytest.importorskip("Fluoro2DRRLib.fluoro_sim")
    for seed in range(3):
        rng = np.random.default_rng(seed)
        frame = fluoro_sim.simulate_fluoroscopy(line_integrals[seed], rng)
        out, info = to_line_integral(frame)
        assert info["polarity"] == "xray", info["reason"]
        assert masked_ncc(out, line_integrals[seed].sum(0)) > masked_ncc(frame, line_integrals[seed].sum(0))


def test_errors():
    with pytest.raises(InputError):
        to_line_integral(np.zeros((4, 4, 3)))
    with pytest.raises(InputError):
        to_line_integral(np.ones((32, 32)), polarity="negative")
    with pytest.raises(InputError):
        to_line_integral(np.ones((32, 32)), fov_mask=np.zeros((32, 32)))
    with pytest.raises(InputError):
        to_line_integral(-np.ones((32, 32)), polarity="xray", fov_mask=np.ones((32, 32)))


def vignetted(frame, amount=0.9, field_radius_fraction=0.47):
    """Strong image-intensifier vignetting: the field's periphery nearly as dark as the bones."""
    h, w = frame.shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(xx - w / 2, yy - h / 2) / (field_radius_fraction * w)
    return (frame * np.clip(1.0 - amount * r ** 2, 0.02, 1.0)).astype(np.float32)


def test_a_sequence_is_given_one_polarity(line_integrals):
    """One frame alone can fool the cues (a dark periphery); the sequence's summed vote decides for all."""
    rng = np.random.default_rng(4)
    xray = [simulate_xray(li, rng)[0] for li in line_integrals]
    fooled = vignetted(xray[1])
    assert detect_polarity(fooled)[0] == "drr"  # the premise: alone it is called a DRR
    stack = np.stack([xray[0], fooled, xray[2], xray[1]])
    polarity, info = detect_sequence_polarity(stack)
    assert polarity == "xray" and info["frames_called_otherwise_alone"] == [1], info
    assert info["frames_sampled"] == [0, 1, 2, 3] and "3 of 4" in info["reason"]
    drrs = np.stack([li.sum(0) for li in line_integrals])
    assert detect_sequence_polarity(drrs)[0] == "drr"
    assert detect_sequence_polarity(drrs, max_frames=2)[1]["frames_sampled"] == [0, 2]
    broken = drrs.copy()
    broken[0, 3, 3] = np.nan  # left for the registration's own clear error, not sampled
    assert detect_sequence_polarity(broken)[1]["frames_sampled"] == [1, 2]

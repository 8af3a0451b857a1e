"""Bone models: voxelisation volume, mesh file formats and coordinate systems, errors, label volumes."""
import numpy as np
import pytest

from Fluoro2DRRLib import bones as B
from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.geometry import RAS_FROM_LPS, apply_transform


def vtk_sphere(radius=20.0, res=96, centre=(0.0, 0.0, 0.0)):
    import vtk

    s = vtk.vtkSphereSource()
    s.SetRadius(radius)
    s.SetCenter(*centre)
    s.SetThetaResolution(res)
    s.SetPhiResolution(res)
    s.Update()
    return s.GetOutput()


def vtk_rotated_cube():
    import vtk

    c = vtk.vtkCubeSource()
    c.SetXLength(30.0)
    c.SetYLength(22.0)
    c.SetZLength(16.0)
    t = vtk.vtkTransform()
    t.Translate(5.0, -3.0, 7.0)
    t.RotateWXYZ(33.0, 1.0, 2.0, 0.5)
    f = vtk.vtkTransformPolyDataFilter()
    f.SetInputConnection(c.GetOutputPort())
    f.SetTransform(t)
    tri = vtk.vtkTriangleFilter()
    tri.SetInputConnection(f.GetOutputPort())
    tri.Update()
    return tri.GetOutput()


@pytest.fixture(scope="module")
def femur():
    from Fluoro2DRRLib.phantom import make_knee_phantom

    return make_knee_phantom(0, voxel_mm=1.2)["femur"]


def test_voxelised_volume_matches_mesh_volume(femur):
    polys = {"sphere": vtk_sphere(), "cube": vtk_rotated_cube(),
             "femur": B.polydata_from_arrays(femur.surface_points_mm, femur.surface_triangles)}
    for name, poly in polys.items():
        mask, ijk_to_mm = B.voxelise_polydata(poly, voxel_mm=0.5)
        voxelised = mask.sum() * 0.5 ** 3
        assert voxelised == pytest.approx(B.mesh_volume_mm3(poly), rel=0.02), name
    # the sphere's centre lands where it should
    mask, ijk_to_mm = B.voxelise_polydata(vtk_sphere(centre=(3.0, -7.0, 11.0)), voxel_mm=0.5)
    centre = apply_transform(ijk_to_mm, np.argwhere(mask).mean(0)[None])[0]
    np.testing.assert_allclose(centre, [3.0, -7.0, 11.0], atol=0.1)


@pytest.mark.parametrize("suffix", [".stl", ".vtk", ".vtp", ".ply", ".obj"])
def test_mesh_file_round_trip(tmp_path, suffix):
    points, triangles = B.polydata_arrays(vtk_sphere(10.0, 32, centre=(4.0, -6.0, 9.0)))
    path = tmp_path / f"bone{suffix}"
    B.write_mesh(path, points, triangles)
    bone = B.bone_from_mesh_file(path, "femur", coordinate_system="RAS", voxel_mm=1.0)
    np.testing.assert_allclose(bone.surface_points_mm.mean(0), points.mean(0), atol=1e-3)
    np.testing.assert_allclose(bone.centroid_mm, [4.0, -6.0, 9.0], atol=0.3)
    np.testing.assert_allclose(bone.file_from_bone, np.eye(4))
    assert bone.source_path == str(path)


def test_lps_header_is_honoured(tmp_path):
    points, triangles = B.polydata_arrays(vtk_sphere(10.0, 32, centre=(4.0, -6.0, 9.0)))
    lps_path, ras_path = tmp_path / "lps.stl", tmp_path / "ras.stl"
    B.write_mesh(lps_path, points, triangles, coordinate_system="LPS")
    B.write_mesh(ras_path, points, triangles, coordinate_system="RAS")
    assert b"SPACE=LPS" in lps_path.read_bytes()[:80]
    from_lps = B.bone_from_mesh_file(lps_path, "femur", coordinate_system="auto", voxel_mm=1.0)
    from_ras = B.bone_from_mesh_file(ras_path, "femur", coordinate_system="auto", voxel_mm=1.0)
    np.testing.assert_allclose(from_lps.surface_points_mm.mean(0), points.mean(0), atol=1e-3)
    np.testing.assert_allclose(from_lps.centroid_mm, from_ras.centroid_mm, atol=1e-6)
    np.testing.assert_allclose(from_lps.file_from_bone, np.diag([-1.0, -1.0, 1.0, 1.0]))
    np.testing.assert_allclose(from_ras.file_from_bone, np.eye(4))
    # file_from_bone maps our RAS points back to what is stored in the file
    stored = apply_transform(RAS_FROM_LPS, points)
    np.testing.assert_allclose(apply_transform(from_lps.file_from_bone, points), stored)
    # explicit RAS on an LPS file: the points are taken as they are (mirrored in x and y)
    as_is = B.bone_from_mesh_file(lps_path, "femur", coordinate_system="RAS", voxel_mm=1.0)
    np.testing.assert_allclose(as_is.surface_points_mm.mean(0), stored.mean(0), atol=1e-3)


def test_units_metres(tmp_path):
    points, triangles = B.polydata_arrays(vtk_sphere(15.0, 32, centre=(4.0, -6.0, 9.0)))
    path = tmp_path / "metres.vtp"
    B.write_mesh(path, points / 1000.0, triangles)
    with pytest.raises(InputError, match="looks like metres") as err:
        B.bone_from_mesh_file(path, "femur")
    assert str(path) in str(err.value)
    bone = B.bone_from_mesh_file(path, "femur", units="m", voxel_mm=1.0)
    np.testing.assert_allclose(bone.surface_points_mm.mean(0), points.mean(0), atol=1e-3)
    np.testing.assert_allclose(bone.file_from_bone, np.eye(4))


def test_mesh_errors_name_the_file(tmp_path):
    import vtk

    missing = tmp_path / "nope.stl"
    with pytest.raises(InputError, match="file not found") as err:
        B.bone_from_mesh_file(missing, "femur")
    assert str(missing) in str(err.value)

    # open mesh: a sphere with a cap removed
    points, triangles = B.polydata_arrays(vtk_sphere(15.0, 24))
    keep = points[triangles].mean(1)[:, 2] < 12.0
    path = tmp_path / "open.stl"
    B.write_mesh(path, points, triangles[keep])
    with pytest.raises(InputError, match="open") as err:
        B.bone_from_mesh_file(path, "femur")
    assert str(path) in str(err.value)

    plane = vtk.vtkPlaneSource()
    plane.SetOrigin(0, 0, 0)
    plane.SetPoint1(40, 0, 0)
    plane.SetPoint2(0, 40, 0)
    plane.SetResolution(4, 4)
    plane.Update()
    p, t = B.polydata_arrays(plane.GetOutput())
    path = tmp_path / "plane.ply"
    B.write_mesh(path, p, t)
    with pytest.raises(InputError, match="open") as err:
        B.bone_from_mesh_file(path, "femur")
    assert str(path) in str(err.value)

    bad = tmp_path / "bone.xyz"
    bad.write_text("1 2 3\n")
    with pytest.raises(InputError, match="unsupported") as err:
        B.bone_from_mesh_file(bad, "femur")
    assert str(bad) in str(err.value)
    with pytest.raises(InputError, match="unsupported"):
        B.write_mesh(tmp_path / "bone.xyz", points, triangles)

    garbage = tmp_path / "garbage.vtp"
    garbage.write_text("not a mesh")
    with pytest.raises(InputError) as err:
        B.bone_from_mesh_file(garbage, "femur")
    assert str(garbage) in str(err.value)


def oblique_ijk_to_ras():
    a = np.radians(25.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    b = np.radians(-15.0)
    rot = rot @ np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([0.8, 0.7, 1.25])
    m[:3, 3] = [-40.0, 12.0, 300.0]
    return m


def test_bones_from_label_volume():
    labels = np.zeros((40, 36, 30), np.int16)
    labels[5:15, 6:20, 4:12] = 1  # femur box
    labels[22:35, 10:30, 15:27] = 2  # tibia box
    ijk_to_ras = oblique_ijk_to_ras()
    ct = np.full(labels.shape, -1000.0, np.float32)
    ct[labels == 1] = 700.0
    ct[labels == 2] = 1200.0
    bones = B.bones_from_label_volume(labels, ijk_to_ras, {"femur": 1, "tibia": 2}, ct, margin_vox=2, mesh=False)
    for name, lo, hi, hu in (("femur", (5, 6, 4), (15, 20, 12), 700.0), ("tibia", (22, 10, 15), (35, 30, 27), 1200.0)):
        bone = bones[name]
        assert bone.density.shape == tuple(np.array(hi) - lo + 4)  # the box plus 2 voxels each side
        centre_ijk = (np.array(lo) + np.array(hi) - 1) / 2.0
        expected = apply_transform(ijk_to_ras, centre_ijk[None])[0]
        np.testing.assert_allclose(bone.centroid_mm, expected, atol=1e-4)
        inside = bone.density[2:-2, 2:-2, 2:-2]
        np.testing.assert_allclose(inside, (hu + 1000.0) / 1000.0)
        assert bone.density.sum() == pytest.approx(inside.sum())  # nothing outside the label
        np.testing.assert_allclose(bone.voxel_mm, [0.8, 0.7, 1.25], atol=1e-9)
    # label map only: synthetic density, same centroid (symmetric boxes)
    synth = B.bones_from_label_volume(labels, ijk_to_ras, {"femur": 1}, margin_vox=2, mesh=True)["femur"]
    np.testing.assert_allclose(synth.centroid_mm, bones["femur"].centroid_mm, atol=1e-3)
    assert synth.surface_points_mm is not None and len(synth.surface_triangles) > 0


def test_label_volume_errors():
    labels = np.zeros((10, 10, 10), np.int16)
    labels[2:5, 2:5, 2:5] = 1
    with pytest.raises(InputError, match=r"knee_labels.nrrd: label 7 \(tibia\) is empty"):
        B.bones_from_label_volume(labels, np.eye(4), {"tibia": 7}, what="knee_labels.nrrd", mesh=False)
    with pytest.raises(InputError, match="knee_labels.nrrd"):
        B.bones_from_label_volume(labels, np.eye(4), {"femur": 1}, np.zeros((9, 10, 10)),
                                  what="knee_labels.nrrd", mesh=False)


def test_resampled_keeps_centroid_and_mass(femur):
    for bone in (femur, B.bone_from_polydata(vtk_rotated_cube(), "cube", voxel_mm=0.5)):
        mass = bone.density.sum() * np.prod(bone.voxel_mm)
        for voxel in (2.0 * bone.voxel_mm.min(), 3.0 * bone.voxel_mm.min()):
            coarse = bone.resampled(voxel)
            assert coarse.voxel_mm == pytest.approx(np.full(3, voxel), rel=1e-6)
            assert np.linalg.norm(coarse.centroid_mm - bone.centroid_mm) < 0.5
            assert coarse.density.sum() * np.prod(coarse.voxel_mm) == pytest.approx(mass, rel=0.02)
    assert femur.resampled(femur.voxel_mm.min()) is femur


def cut_shaft_mask(voxel_mm=0.5):
    """A 12 mm-radius shaft with a round end at the bottom, cut flat at z = 40 mm by the scan's edge."""
    z, y, x = np.meshgrid(np.arange(-60, 40.01, voxel_mm), np.arange(-16, 16.01, voxel_mm),
                          np.arange(-16, 16.01, voxel_mm), indexing="ij")
    shaft = (x ** 2 + y ** 2 <= 12.0 ** 2) & (z >= -40.0)
    end = x ** 2 + y ** 2 + (z + 40.0) ** 2 <= 12.0 ** 2
    mask = (shaft | end).transpose(2, 1, 0)  # [i, j, k] = x, y, z
    ijk_to_mm = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    ijk_to_mm[:3, 3] = (-16.0, -16.0, -60.0)
    return mask, ijk_to_mm


def test_cut_face_is_found_and_left_without_cortex(femur):
    mask, ijk_to_mm = cut_shaft_mask()
    points, triangles = B.surface_from_mask(mask, ijk_to_mm)
    faces = B.find_cut_faces(points, triangles)
    assert len(faces) == 1
    normal, offset = faces[0]
    np.testing.assert_allclose(normal, [0, 0, 1], atol=0.02)
    assert offset == pytest.approx(40.0, abs=0.6)
    # natural, curved bone ends are not cuts
    assert B.find_cut_faces(femur.surface_points_mm, femur.surface_triangles) == []
    sphere_points, sphere_triangles = B.polydata_arrays(vtk_sphere())
    assert B.find_cut_faces(sphere_points, sphere_triangles) == []

    bone = B.bone_from_polydata(B.polydata_from_arrays(points, triangles), "shaft", voxel_mm=0.5)
    centres = apply_transform(bone.bone_from_ijk, np.argwhere(np.ones(bone.density.shape, bool)).astype(float))
    density = bone.density.ravel()
    on_axis = np.hypot(centres[:, 0], centres[:, 1]) < 6.0
    near_cut = on_axis & (centres[:, 2] > 38.5) & (centres[:, 2] < 39.6)
    near_round_end = on_axis & (centres[:, 2] < -50.5) & (centres[:, 2] > -51.6)
    mid_shaft = on_axis & (np.abs(centres[:, 2]) < 10.0)
    # the cut section is cancellous like the shaft's core; the natural end keeps its cortex
    assert density[near_cut].mean() == pytest.approx(density[mid_shaft].mean(), abs=0.05)
    assert density[near_round_end].mean() > density[mid_shaft].mean() + 0.3


def test_the_knee_joint_is_where_the_bones_meet_as_scanned():
    """Two spheres 4 mm apart stand in for femur and tibia, the tibia in a bone frame of its own (centred on
    it; its file frame puts it below the femur): the centre lies midway in the gap, the same point of the file
    frame in both bone frames; bones that do not meet, or have no surface, carry no joint."""
    femur = B.bone_from_polydata(vtk_sphere(20.0, centre=(0.0, 0.0, 22.0)), "femur", voxel_mm=1.0)
    file_from_tibia = np.eye(4)
    file_from_tibia[:3, 3] = [0.0, 0.0, -22.0]
    tibia = B.bone_from_polydata(vtk_sphere(20.0), "tibia", voxel_mm=1.0, file_from_bone=file_from_tibia)
    joint = B.knee_joint(femur, tibia)
    assert joint is not None and abs(joint.scanned_gap_mm - 4.0) < 0.3, joint
    np.testing.assert_allclose(joint.centre_femur_mm, [0.0, 0.0, 0.0], atol=0.3)
    np.testing.assert_allclose(joint.centre_tibia_mm, joint.centre_femur_mm + [0.0, 0.0, 22.0], atol=1e-9)
    np.testing.assert_allclose(joint.tibia_in_femur, file_from_tibia, atol=1e-9)
    file_from_tibia[:3, 3] = [0.0, 0.0, -60.0]  # 42 mm apart: not one knee
    assert B.knee_joint(femur, B.replace(tibia, file_from_bone=file_from_tibia)) is None
    assert B.knee_joint(femur, B.replace(tibia, surface_points_mm=None)) is None

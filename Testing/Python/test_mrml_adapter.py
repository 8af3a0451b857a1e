"""MRML conversion with slicer-core (no Qt): frames, calibration, poses, tables, .mrb round trip."""
import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core MRML not available", allow_module_level=True)

import vtk  # noqa: E402

from Fluoro2DRRLib import mrml_adapter as ma  # noqa: E402
from Fluoro2DRRLib.geometry import CArmGeometry  # noqa: E402


from Fluoro2DRRLib.phantom import rotation_matrix as rot  # noqa: E402


@pytest.fixture
def geometry():
    world_from_source = rot("y", 20) @ rot("x", -90)
    world_from_source[:3, 3] = (30.0, -900.0, 15.0)
    return CArmGeometry(source_to_detector_mm=980.0, pixel_spacing_mm=(0.5, 0.6), image_size=(6, 5),
                        principal_offset_mm=(1.5, -2.0), world_from_source=world_from_source)


@pytest.fixture
def frames():
    rng = np.random.default_rng(1)
    return rng.random((4, 5, 6)).astype(np.float32)


def poses_for(n, seed):
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 4, 4))
    for i in range(n):
        out[i] = rot("z", rng.uniform(-30, 30)) @ rot("x", rng.uniform(-60, 0)) @ rot("y", rng.uniform(-5, 5))
        out[i, :3, 3] = rng.uniform(-50, 50, 3)
    return out


def proxy_matrix(proxy):
    m = vtk.vtkMatrix4x4()
    proxy.GetMatrixTransformToParent(m)
    return ma.numpy_matrix(m)


def build_scene(frames, geometry):
    scene = ma.new_scene()
    seq, browser, proxy = ma.frames_to_volume_sequence(scene, frames, geometry, "Frames")
    poses = {"femur": poses_for(len(frames), 2), "tibia": poses_for(len(frames), 3)}
    tseqs = ma.poses_to_transform_sequences(scene, poses, browser, failed_frames={2})
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    models = {b: ma.model_node_from_polydata(scene, sphere.GetOutput(), f"{b} model") for b in poses}
    ma.parent_models_to_transforms(models, tseqs)
    return scene, seq, browser, proxy, poses, tseqs, models


def test_frames_to_volume_sequence(frames, geometry):
    scene = ma.new_scene()
    seq, browser, proxy = ma.frames_to_volume_sequence(scene, frames, geometry, "Frames")
    assert seq.GetNumberOfDataNodes() == 4
    assert browser.GetNumberOfItems() == 4
    assert browser.GetMasterSequenceNode() is seq
    assert proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode")
    # Voxel round trip: volume array [k, j, i] = frame[r, c].
    item = seq.GetNthDataNode(3)
    np.testing.assert_array_equal(ma.array_from_volume(item)[0], frames[3])
    back, ijk_to_ras = ma.volume_sequence_to_frames(seq)
    np.testing.assert_array_equal(back, frames)
    # IJKToRAS puts pixel (c, r) at geometry.pixel_to_world((c, r)).
    pix = np.array([[0, 0], [5, 0], [2, 3], [5, 4]], dtype=float)
    ijk = np.c_[pix, np.zeros(len(pix)), np.ones(len(pix))]
    ras = (ijk_to_ras @ ijk.T).T[:, :3]
    np.testing.assert_allclose(ras, geometry.pixel_to_world(pix), atol=1e-9)
    np.testing.assert_allclose(ma.volume_ijk_to_ras(item), ijk_to_ras)
    # The proxy follows the browser.
    browser.SetSelectedItemNumber(2)
    np.testing.assert_array_equal(ma.array_from_volume(proxy)[0], frames[2])
    assert ma.geometry_from_sequence(seq).to_dict() == geometry.to_dict()


def test_poses_round_trip_and_browser_sync(frames, geometry):
    scene, seq, browser, proxy, poses, tseqs, models = build_scene(frames, geometry)
    assert set(tseqs) == {"femur", "tibia"}
    for bone, (tseq, tproxy) in tseqs.items():
        assert tseq.GetNumberOfDataNodes() == seq.GetNumberOfDataNodes()
        assert [tseq.GetNthIndexValue(i) for i in range(4)] == [seq.GetNthIndexValue(i) for i in range(4)]
        back = ma.transform_sequence_to_poses(tseq)
        good = [0, 1, 3]
        np.testing.assert_allclose(back[good], poses[bone][good], atol=1e-12)
        # Failed frame 2 keeps the last good pose (frame 1) and is marked.
        np.testing.assert_allclose(back[2], poses[bone][1], atol=1e-12)
        assert tseq.GetNthDataNode(2).GetAttribute(ma.FAILED) == "1"
        assert tseq.GetNthDataNode(1).GetAttribute(ma.FAILED) is None
        assert ma.failed_frames_of_sequence(tseq) == [2]
        assert models[bone].GetTransformNodeID() == tproxy.GetID()
        for i in (3, 0, 1):
            browser.SetSelectedItemNumber(i)
            np.testing.assert_allclose(proxy_matrix(tproxy), poses[bone][i], atol=1e-12)


def test_non_finite_and_leading_failures_are_filled(frames, geometry):
    scene = ma.new_scene()
    _, browser, _ = ma.frames_to_volume_sequence(scene, frames, geometry)
    p = poses_for(4, 5)
    p[0] = np.nan
    out = ma.poses_to_transform_sequences(scene, {"femur": p}, browser)
    back = ma.transform_sequence_to_poses(out["femur"][0])
    assert np.all(np.isfinite(back))
    np.testing.assert_allclose(back[0], p[1])
    assert ma.failed_frames_of_sequence(out["femur"][0]) == [0]
    with pytest.raises(ValueError):
        ma.poses_to_transform_sequences(scene, {"femur": p[:3]}, browser)


def test_calibration_nodes(geometry):
    scene = ma.new_scene()
    nodes = ma.calibration_to_nodes(scene, geometry)
    assert ma.geometry_from_node(nodes["text"]).to_dict() == geometry.to_dict()
    np.testing.assert_allclose(ma.markups_points(nodes["source"])[0], geometry.source_position_world)
    np.testing.assert_allclose(ma.markups_points(nodes["detector"]), geometry.detector_corners_world(), atol=1e-9)


def test_camera_and_frame_plane(geometry, frames):
    scene = ma.new_scene()
    cam = scene.AddNewNodeByClass("vtkMRMLCameraNode")
    ma.camera_at_source(cam, geometry)
    np.testing.assert_allclose(cam.GetPosition(), geometry.source_position_world)
    direction = np.subtract(cam.GetFocalPoint(), cam.GetPosition())
    np.testing.assert_allclose(direction / np.linalg.norm(direction), geometry.beam_direction_world, atol=1e-9)
    plane = ma.frame_plane_model(scene, geometry)
    pd = plane.GetPolyData()
    pts = np.array([pd.GetPoint(i) for i in range(pd.GetNumberOfPoints())])
    tc = pd.GetPointData().GetTCoords()
    # Texture coordinate (s, t) -> detector position of pixel corner (s W - 0.5, t H - 0.5).
    for i in range(len(pts)):
        s, t = tc.GetTuple2(i)
        expected = geometry.pixel_to_world(np.array([s * geometry.width - 0.5, t * geometry.height - 0.5]))
        np.testing.assert_allclose(pts[i], expected, atol=1e-9)
    _, _, proxy = ma.frames_to_volume_sequence(scene, frames, geometry)
    assert ma.attach_frame_texture(plane, proxy) in (True, False)  # never raises


def test_tables_and_plot():
    scene = ma.new_scene()
    quality = [dict(frame=0, similarity=0.9, iterations=30, converged=True, reinitialised=False, seconds=1.5),
               dict(frame=1, similarity=0.2, iterations=50, converged=False, reinitialised=True, seconds=2.0)]
    table = ma.quality_table_node(scene, quality, failed_frames={1})
    cols = ma.table_to_columns(table)
    assert cols["frame"] == [0, 1]
    assert cols["similarity"] == pytest.approx([0.9, 0.2])
    assert cols["converged"] == [1, 0]
    assert cols["failed"] == [0, 1]
    angles = {"flexion": np.array([0.0, 10, 20]), "adduction": np.array([1.0, 2, 3]),
              "internal_rotation": np.array([-1.0, 0, 1]), "anterior_mm": np.array([0.0, 1, 2])}
    ktable, chart = ma.kinematics_table_and_plot(scene, angles, frame_times=[0.0, 0.1, 0.2])
    kcols = ma.table_to_columns(ktable)
    assert kcols["flexion"] == [0, 10, 20]
    assert kcols["time_s"] == pytest.approx([0, 0.1, 0.2])
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    assert chart.GetNthPlotSeriesNode(0).GetYColumnName() == "flexion"


def test_bone_inputs_from_nodes():
    scene = ma.new_scene()
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(10)
    sphere.SetThetaResolution(16)
    sphere.SetPhiResolution(16)
    sphere.Update()
    model = ma.model_node_from_polydata(scene, sphere.GetOutput(), "femur")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "tibia", [1, 0, 0])
    out = ma.bone_inputs_from_nodes({"femur": model, "tibia": seg})
    assert out["femur"]["kind"] == "polydata"
    assert out["femur"]["polydata"].GetNumberOfPoints() == sphere.GetOutput().GetNumberOfPoints()
    assert out["tibia"]["kind"] == "polydata" and out["tibia"]["polydata"].GetNumberOfPoints() > 0
    # With a reference CT the segmentation comes as a labelmap on the CT grid, indexed [i, j, k].
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    img = vtk.vtkImageData()
    img.SetDimensions(12, 13, 14)
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    img.GetPointData().GetScalars().Fill(0)
    ct.SetAndObserveImageData(img)
    ct.SetSpacing(2, 2, 2)
    ct.SetOrigin(-12, -12, -14)
    out = ma.bone_inputs_from_nodes({"tibia": seg}, ct_node=ct)
    spec = out["tibia"]
    assert spec["kind"] == "labelmap" and spec["label_array"].shape == (12, 13, 14)
    assert spec["label_array"].max() == spec["label"] == 1
    assert spec["ct_array"].shape == (12, 13, 14)
    # Centre of the sphere (0, 0, 0) lies inside: voxel index = (0 - origin) / spacing.
    i, j, k = np.round(np.linalg.inv(spec["ijk_to_ras"]) @ [0, 0, 0, 1])[:3].astype(int)
    assert spec["label_array"][i, j, k] == 1


def test_mrb_round_trip(tmp_path, frames, geometry):
    scene, seq, browser, proxy, poses, tseqs, models = build_scene(frames, geometry)
    calib = ma.calibration_to_nodes(scene, geometry)
    ma.quality_table_node(scene, [dict(frame=i, similarity=0.5, converged=i != 2) for i in range(4)], {2})
    ma.kinematics_table_and_plot(scene, {"flexion": np.arange(4.0), "adduction": np.zeros(4),
                                         "internal_rotation": np.ones(4)})
    ma.frame_plane_model(scene, geometry)
    browser.SetSelectedItemNumber(1)
    path = ma.save_scene_mrb(scene, tmp_path / "session.mrb")
    assert path.is_file()

    scene2 = ma.load_scene_mrb(path, cache_dir=tmp_path / "cache")
    browsers = [scene2.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
                for i in range(scene2.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode"))]
    assert len(browsers) == 1
    b2 = browsers[0]
    assert b2.GetNumberOfItems() == 4
    assert b2.GetNumberOfSynchronizedSequenceNodes() == 2  # femur + tibia (master excluded)
    seq2 = b2.GetMasterSequenceNode()
    assert seq2.GetName() == seq.GetName() and seq2.GetNumberOfDataNodes() == 4
    back, ijk_to_ras = ma.volume_sequence_to_frames(seq2)
    np.testing.assert_array_equal(back, frames)
    np.testing.assert_allclose(ijk_to_ras, ma.ijk_to_ras_from_geometry(geometry), atol=1e-6)
    for bone, (tseq, _) in tseqs.items():
        tseq2 = scene2.GetFirstNodeByName(tseq.GetName())
        assert tseq2 is not None and tseq2.GetNumberOfDataNodes() == 4
        np.testing.assert_allclose(ma.transform_sequence_to_poses(tseq2), ma.transform_sequence_to_poses(tseq),
                                   atol=1e-9)
        assert tseq2.GetNthDataNode(2).GetAttribute(ma.FAILED) == "1"
        assert ma.failed_frames_of_sequence(tseq2) == [2]
        proxy2 = b2.GetProxyNode(tseq2)
        b2.SetSelectedItemNumber(3)
        np.testing.assert_allclose(proxy_matrix(proxy2), poses[bone][3], atol=1e-9)
        model2 = scene2.GetFirstNodeByName(models[bone].GetName())
        assert model2.GetTransformNodeID() == proxy2.GetID()
        assert model2.GetPolyData().GetNumberOfPoints() == models[bone].GetPolyData().GetNumberOfPoints()
    assert ma.geometry_from_node(ma.nodes_by_role(scene2, "calibration")[0]).to_dict() == geometry.to_dict()
    np.testing.assert_allclose(ma.markups_points(ma.nodes_by_role(scene2, "detector")[0]),
                               geometry.detector_corners_world(), atol=1e-6)
    assert ma.markups_points(ma.nodes_by_role(scene2, "source")[0]).shape == (1, 3)
    q = ma.table_to_columns(ma.nodes_by_role(scene2, "quality")[0])
    assert q["failed"] == [0, 0, 1, 0]
    k = ma.table_to_columns(ma.nodes_by_role(scene2, "kinematics")[0])
    assert k["flexion"] == [0, 1, 2, 3]
    assert scene2.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1
    assert scene2.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 3
    assert len(ma.nodes_by_role(scene2, "frame_plane")) == 1
    # Saving the reloaded scene again works.
    assert ma.save_scene_mrb(scene2, tmp_path / "again.mrb").is_file()
    # Nothing was written outside tmp_path's own folders.
    assert calib["text"].GetScene() is scene


class _FakeResult:
    def __init__(self, poses, quality):
        self.poses, self.quality = poses, quality


def test_sliced_registration_job_and_glue(tmp_path, frames, geometry):
    truth = {"femur": poses_for(4, 7), "tibia": poses_for(4, 8)}
    calls = []

    def fake_register(fr, geo, bones, init_poses=None, translation="none", device="auto", settings=None,
                      progress=None, should_stop=None):
        i = len(calls)
        calls.append(init_poses)
        assert fr.shape == (1, 5, 6)
        return _FakeResult({b: truth[b][i:i + 1] for b in bones},
                           [dict(frame=0, similarity=0.8, iterations=10, converged=i != 1, seconds=0.1)])

    job = ma.SequenceRegistrationJob(frames, geometry, {"femur": None, "tibia": None}, register_fn=fake_register)
    assert job.step() and job.step()
    np.testing.assert_allclose(calls[1]["femur"][0], truth["femur"][0])  # initialised from the previous frame
    job.cancel()
    assert not job.step() and job.done
    assert job.failed_frames() == {1, 2, 3}  # frame 1 did not converge, 2-3 never ran
    job2 = ma.SequenceRegistrationJob(frames, geometry, {"femur": None, "tibia": None}, register_fn=fake_register)
    calls.clear()
    seen = []
    job2.run(progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (4, 4) and len(job2.quality) == 4

    scene = ma.new_scene()
    _, browser, _ = ma.frames_to_volume_sequence(scene, frames, geometry)
    out = ma.store_registration_result(scene, job2.poses, job2.quality, browser)
    assert out["failed"] == {1}
    assert ma.table_to_columns(out["quality"])["failed"] == [0, 1, 0, 0]
    fseq, tseq = out["sequences"]["femur"][0], out["sequences"]["tibia"][0]
    np.testing.assert_allclose(ma.transform_sequence_to_poses(fseq)[[0, 2, 3]], truth["femur"][[0, 2, 3]])

    results, table, chart = ma.kinematics_from_sequences(scene, fseq, tseq)
    assert np.isnan(results["flexion"][1]) and np.all(np.isfinite(results["flexion"][[0, 2, 3]]))
    assert chart.GetNumberOfPlotSeriesNodes() == 3

    written = ma.export_pose_files(out["sequences"], tmp_path / "poses", geometry)
    assert sorted(p.name for p in written) == ["femur.jts", "femur.tra", "poses.csv", "tibia.jts", "tibia.tra"]
    from Fluoro2DRRLib import pose_io
    back = pose_io.read_poses_csv(tmp_path / "poses" / "poses.csv")
    np.testing.assert_allclose(back["tibia"][[0, 2, 3]], truth["tibia"][[0, 2, 3]], atol=1e-9)
    assert np.all(np.isnan(back["tibia"][1]))


def test_bones_from_nodes_uses_core_builders():
    bones_mod = pytest.importorskip("Fluoro2DRRLib.bones")
    if not hasattr(bones_mod, "bone_from_polydata"):
        pytest.skip("bones.bone_from_polydata not written yet")
    scene = ma.new_scene()
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(8)
    sphere.SetCenter(5, 0, -3)
    sphere.Update()
    model = ma.model_node_from_polydata(scene, sphere.GetOutput(), "femur")
    out = ma.bones_from_nodes({"femur": model}, voxel_mm=1.0)
    np.testing.assert_allclose(out["femur"].centroid_mm, [5, 0, -3], atol=0.5)


def test_browser_for_sequence(frames, geometry):
    scene = ma.new_scene()
    seq, browser, _ = ma.frames_to_volume_sequence(scene, frames, geometry)
    assert ma.browser_for_sequence(scene, seq) is browser
    other = scene.AddNewNodeByClass("vtkMRMLSequenceNode")
    assert ma.browser_for_sequence(scene, other, create=False) is None
    made = ma.browser_for_sequence(scene, other)
    assert made is not browser and made.GetMasterSequenceNode() is other

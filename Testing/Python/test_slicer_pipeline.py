"""The Slicer module's pipeline without the Slicer application: real MRML (slicer-core) + the real engine.

Simulated frames -> volume sequence + browser -> SequenceRegistrationJob (one Registrar, one frame per
step) -> transform sequences / quality table -> kinematics -> .mrb round trip -> pose files.
"""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core MRML not available", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("diffdrr")

import vtk  # noqa: E402

from Fluoro2DRRLib import mrml_adapter as ma  # noqa: E402
from Fluoro2DRRLib import pose_io  # noqa: E402

N_FRAMES = 3
BONES = ("femur", "tibia")


def small_settings():
    from Fluoro2DRRLib.registration import RegistrationSettings

    # So few finest-level evaluations never "settle" (the similarity still rises when the level stops):
    # converged_similarity_gain=1 makes "converged" mean similarity >= min_similarity, else every frame
    # would be reported failed and stored as the last good pose. (Same settings as the module's self-test.)
    return RegistrationSettings(detector_sizes=(32, 64, 128), voxel_mm=(3.0, 2.0, 1.2),
                                start_iterations=(30, 15, 6), track_iterations=(15, 10, 4),
                                converged_similarity_gain=1.0)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    from Fluoro2DRRLib.bones import bone_from_mesh_file
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.simulate import simulate_sequence

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pipeline") / "sim"
    simulate_sequence(out, n_frames=N_FRAMES, seed=3, image_size=128, progress=False, phantom_voxel_mm=1.0,
                      max_flexion_deg=15)
    bones = {b: bone_from_mesh_file(out / "models" / f"{b}.stl", b, voxel_mm=1.2) for b in BONES}
    return {"dir": out, "frames": load_frames(out / "frames").frames, "geometry": load_calibration(out / "calibration.json"),
            "bones": bones, "truth": pose_io.read_poses_csv(out / "truth" / "poses.csv")}


def proxy_matrix(proxy):
    m = vtk.vtkMatrix4x4()
    proxy.GetMatrixTransformToParent(m)
    return ma.numpy_matrix(m)


def test_job_on_the_engine_into_mrml_and_back(simulated, tmp_path, monkeypatch):
    from Fluoro2DRRLib import registration
    from Fluoro2DRRLib.evaluate import pose_errors

    torch.set_num_threads(1)
    geometry, bones, truth = simulated["geometry"], simulated["bones"], simulated["truth"]
    scene = ma.new_scene()
    seq, browser, _ = ma.frames_to_volume_sequence(scene, simulated["frames"], geometry, "Fluoroscopy")
    frames, _ = ma.frames_from_any(seq)  # what the module registers: the frames read back from MRML
    np.testing.assert_array_equal(frames, simulated["frames"].astype(np.float32))

    # Count the Registrars built and the frames handed to the engine: one Registrar for the whole job.
    built = []
    real_init = registration.Registrar.__init__

    def counting_init(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(registration.Registrar, "__init__", counting_init)
    job = ma.SequenceRegistrationJob(frames, geometry, bones, translation="none", device="cpu",
                                     settings=small_settings(), init_poses={b: truth[b][:1] for b in BONES})
    seen = []
    assert job.step()  # one frame per step
    assert job.next_frame == 1 and len(job.quality) == 1
    assert np.all(np.isnan(job.poses["femur"][1:]))
    job.run(progress=lambda d, n: seen.append((d, n)))
    assert job.done and not job.cancelled and seen[-1] == (N_FRAMES, N_FRAMES)
    assert len(built) == 1, "the job must build one Registrar and reuse it"
    assert [q["frame"] for q in job.quality] == list(range(N_FRAMES))
    assert len(job.frame_results) == N_FRAMES
    assert job.polarity == "drr"  # decided once for the sequence (clean simulated DRRs)

    # The real engine ran: in-plane errors against the simulation's truth (the tibia, partly hidden
    # behind the femur in this lateral view, gets a little more room).
    for b, limit in (("femur", 1.0), ("tibia", 1.5)):
        assert np.all(np.isfinite(job.poses[b]))
        err = pose_errors(job.poses[b], truth[b], bones[b].centroid_mm, geometry)["in_plane_mm"]
        assert np.all(err < limit), f"{b} in-plane errors {err} mm"

    # Stepping frame by frame gives what one engine call on the whole sequence gives (same tracking,
    # same lost-track recovery).
    monkeypatch.setattr(registration.Registrar, "__init__", real_init)
    whole = registration.register_sequence(frames, geometry, bones, init_poses={b: truth[b][:1] for b in BONES},
                                           device="cpu", settings=small_settings())
    # ... followed by the engine's second pass over weak frames, which the job runs in its last steps
    list(registration.iter_revisit_weak_frames(frames, whole.poses, whole.quality,
                                               registration.Registrar(geometry, bones, small_settings(), "cpu")))
    for b in BONES:
        np.testing.assert_allclose(job.poses[b], whole.poses[b], atol=1e-4)
    assert [q["reinitialised"] for q in job.quality] == [q["reinitialised"] for q in whole.quality]

    # Store as the module does (failed frames from the job): every frame converged, all stored as they are.
    assert all(q["converged"] for q in job.quality), job.quality
    assert job.failed_frames() == set()
    out = ma.store_registration_result(scene, job.poses, job.quality, browser, failed_frames=job.failed_frames())
    assert out["failed"] == set()
    seqs = out["sequences"]
    assert set(seqs) == set(BONES)
    assert browser.GetNumberOfSynchronizedSequenceNodes() == 2
    for b, (tseq, tproxy) in seqs.items():
        assert tseq.GetNumberOfDataNodes() == N_FRAMES
        assert browser.IsSynchronizedSequenceNode(tseq, True)
        np.testing.assert_allclose(ma.transform_sequence_to_poses(tseq), job.poses[b], atol=1e-5)
        for i in (2, 0, 1):
            browser.SetSelectedItemNumber(i)
            np.testing.assert_allclose(proxy_matrix(tproxy), job.poses[b][i], atol=1e-5)
    quality = ma.table_to_columns(out["quality"])
    assert out["quality"].GetNumberOfRows() == N_FRAMES and quality["frame"] == list(range(N_FRAMES))
    assert np.all(np.asarray(quality["similarity"]) > 0.9)

    anat_sources = {b: bones[b].surface_points_mm for b in BONES}
    results, ktable, chart = ma.kinematics_from_sequences(scene, seqs["femur"][0], seqs["tibia"][0],
                                                          anat_sources["femur"], anat_sources["tibia"])
    assert len(results["flexion"]) == N_FRAMES and np.all(np.isfinite(results["flexion"]))
    assert ktable.GetNumberOfRows() == N_FRAMES and chart.GetNumberOfPlotSeriesNodes() == 3

    # .mrb round trip: frames, the browser and both transform sequences with their items.
    path = ma.save_scene_mrb(scene, tmp_path / "session.mrb")
    scene2 = ma.load_scene_mrb(path, cache_dir=tmp_path / "cache")
    assert scene2.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode") == 1
    b2 = scene2.GetNthNodeByClass(0, "vtkMRMLSequenceBrowserNode")
    assert b2.GetNumberOfItems() == N_FRAMES
    assert b2.GetMasterSequenceNode().GetNumberOfDataNodes() == N_FRAMES
    pose_seqs = ma.nodes_by_role(scene2, "poses")
    assert sorted(s.GetAttribute(ma.BONE_NAME) for s in pose_seqs) == sorted(BONES)
    for s in pose_seqs:
        assert s.GetNumberOfDataNodes() == N_FRAMES and b2.IsSynchronizedSequenceNode(s, True)
        np.testing.assert_allclose(ma.transform_sequence_to_poses(s), job.poses[s.GetAttribute(ma.BONE_NAME)],
                                   atol=1e-5)

    # Pose files read back equal the poses.
    written = ma.export_pose_files(seqs, tmp_path / "poses", geometry)
    assert sorted(p.name for p in written) == ["femur.jts", "femur.tra", "poses.csv", "tibia.jts", "tibia.tra"]
    back = pose_io.read_poses_csv(tmp_path / "poses" / "poses.csv")
    for b in BONES:
        np.testing.assert_allclose(back[b], job.poses[b], atol=1e-5)
        jts = pose_io.world_pose_from_file_pose(pose_io.read_jts(tmp_path / "poses" / f"{b}.jts"), geometry)
        np.testing.assert_allclose(jts, job.poses[b], atol=1e-3)
        tra = pose_io.world_pose_from_file_pose(pose_io.read_tra(tmp_path / "poses" / f"{b}.tra"), None)
        np.testing.assert_allclose(tra, job.poses[b], atol=1e-3)


def test_smoothed_poses_are_stored_beside_the_measured_ones(simulated):
    """The module's "Smooth over frames": extra "Smoothed ..." transform sequences in the frames' browser; a
    failed frame gets its neighbours' fit instead of its own (wrong) pose."""
    from Fluoro2DRRLib.smoothing import smooth_poses

    geometry, bones, truth = simulated["geometry"], simulated["bones"], simulated["truth"]
    scene = ma.new_scene()
    _, browser, _ = ma.frames_to_volume_sequence(scene, simulated["frames"], geometry, "Fluoroscopy")
    measured = {b: truth[b].copy() for b in BONES}
    for b in BONES:
        measured[b][1, :3, 3] += [20.0, 0.0, 0.0]  # frame 1 lost, 20 mm off
    quality = [{"frame": k, "similarity": 0.9, "failed": k == 1} for k in range(N_FRAMES)]
    ma.store_registration_result(scene, measured, quality, browser)
    smoothed = ma.store_smoothed_poses(scene, measured, bones, browser, 3, failed_frames={1})
    assert browser.GetNumberOfSynchronizedSequenceNodes() == 4  # measured + smoothed, both bones
    expected = smooth_poses(measured, {b: bones[b].centroid_mm for b in BONES}, 3, failed_frames={1})
    for b, (tseq, tproxy) in smoothed.items():
        assert tseq.GetName() == f"Smoothed {b} poses" and tproxy.GetName() == f"Smoothed {b}"
        assert browser.IsSynchronizedSequenceNode(tseq, True)
        got = ma.transform_sequence_to_poses(tseq)
        np.testing.assert_allclose(got, expected[b], atol=1e-5)
        np.testing.assert_allclose(got[[0, 2]], measured[b][[0, 2]], atol=1e-5)  # good frames at the ends kept
        # the lost frame gets its neighbours' fit (with two neighbours, a line: the centroid half-way), not its
        # own pose 20 mm off
        c = bones[b].centroid_mm
        centre = [p[:3, :3] @ c + p[:3, 3] for p in (got[1], measured[b][0], measured[b][2], measured[b][1])]
        np.testing.assert_allclose(centre[0], 0.5 * (centre[1] + centre[2]), atol=1e-4)
        assert np.linalg.norm(centre[0] - centre[3]) > 10.0


def test_job_cancel_keeps_finished_frames(simulated):
    torch.set_num_threads(1)
    geometry, bones, truth = simulated["geometry"], simulated["bones"], simulated["truth"]
    job = ma.SequenceRegistrationJob(simulated["frames"], geometry, bones, translation="none", device="cpu",
                                     settings=small_settings(), init_poses={b: truth[b][:1] for b in BONES})
    assert job.step()
    job.cancel()
    assert not job.step() and job.done and job.next_frame == 1
    assert np.all(np.isfinite(job.poses["femur"][0])) and np.all(np.isnan(job.poses["femur"][1:]))
    assert {1, 2} <= job.failed_frames()


def test_pose_files_import_as_transform_sequences(simulated, tmp_path):
    """JointTrack .jts (source frame, LPS model file) and Autoscoper .tra files -> transform sequences."""
    from Fluoro2DRRLib.errors import InputError
    from Fluoro2DRRLib.geometry import RAS_FROM_LPS, rigid_inverse

    g, truth = simulated["geometry"], simulated["truth"]
    scene = ma.new_scene()
    _, browser, _ = ma.frames_to_volume_sequence(scene, simulated["frames"], g, "Frames")
    lps_from_ras = rigid_inverse(RAS_FROM_LPS)  # the femur's poses refer to an STL stored in LPS
    pose_io.write_jts(tmp_path / "femur.jts", pose_io.file_pose_from_world_pose(truth["femur"], g, lps_from_ras))
    pose_io.write_tra(tmp_path / "tibia.tra", pose_io.file_pose_from_world_pose(truth["tibia"], None, None))
    seqs = ma.pose_files_to_transform_sequences(
        scene, {"femur": tmp_path / "femur.jts", "tibia": tmp_path / "tibia.tra"}, browser, g,
        file_from_bone={"femur": lps_from_ras})
    for bone in BONES:
        seq, proxy = seqs[bone]
        assert seq.GetNumberOfDataNodes() == N_FRAMES
        np.testing.assert_allclose(ma.transform_sequence_to_poses(seq), truth[bone], atol=1e-6)
        browser.SetSelectedItemNumber(2)
        np.testing.assert_allclose(proxy_matrix(proxy), truth[bone][2], atol=1e-6)
    pose_io.write_tra(tmp_path / "short.tra", truth["tibia"][:2])
    with pytest.raises(InputError, match="2 poses but the sequence has 3 frames"):
        ma.pose_files_to_transform_sequences(scene, {"tibia": tmp_path / "short.tra"}, browser, g)


def test_bone_outlines_fall_on_the_frame_edges(simulated):
    """Outlines at the true poses sit on the frame's bone edges; 8 mm off they do not."""
    from scipy import ndimage

    from Fluoro2DRRLib.geometry import apply_transform

    g, truth, frames, bones = simulated["geometry"], simulated["truth"], simulated["frames"], simulated["bones"]
    scene = ma.new_scene()
    _, browser, _ = ma.frames_to_volume_sequence(scene, frames, g, "Frames")
    beam = g.beam_direction_world
    across = np.cross(beam, np.eye(3)[np.argmin(np.abs(beam))])
    move = np.eye(4)
    move[:3, 3] = 8.0 * across / np.linalg.norm(across)  # 8 mm (4 px) in the image plane
    shifted = {b: move @ truth[b] for b in BONES}
    seq, proxy = ma.bone_outline_sequence(scene, g, bones, truth, browser, failed_frames={1})
    seq_off, _ = ma.bone_outline_sequence(scene, g, bones, shifted, browser, name="shifted")
    assert seq.GetNumberOfDataNodes() == N_FRAMES
    assert ma.volume_ijk_to_ras(seq.GetNthDataNode(0)) == pytest.approx(ma.ijk_to_ras_from_geometry(g))
    for i in (0, 2):
        outline = ma.array_from_volume(seq.GetNthDataNode(i))[0]
        outline_off = ma.array_from_volume(seq_off.GetNthDataNode(i))[0]
        assert set(np.unique(outline)) == {0, 1, 2}
        edges = np.hypot(ndimage.sobel(frames[i].astype(float), 0), ndimage.sobel(frames[i].astype(float), 1))
        on, off = edges[outline > 0].mean(), edges[outline_off > 0].mean()
        assert on > 1.5 * off, (on, off)
        # the femur's outline surrounds the femur's projected centroid
        c = g.project(apply_transform(truth["femur"][i], bones["femur"].centroid_mm[None]))[0]
        rows, cols = np.nonzero(outline == 1)
        assert cols.min() < c[0] < cols.max() and rows.min() < c[1] < rows.max()
    assert not ma.array_from_volume(seq.GetNthDataNode(1)).any()  # a failed frame shows no outline
    browser.SetSelectedItemNumber(2)
    np.testing.assert_array_equal(ma.array_from_volume(proxy), ma.array_from_volume(seq.GetNthDataNode(2)))

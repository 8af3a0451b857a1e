"""The demo's outputs without a registration: the Slicer scene (.mrb) and the kinematics plot."""
import numpy as np
import pytest

from Fluoro2DRRLib import pipeline, pose_io

N_FRAMES = 3


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    pytest.importorskip("torch").set_num_threads(1)
    from Fluoro2DRRLib.calibration_io import load_calibration
    from Fluoro2DRRLib.frames_io import load_frames
    from Fluoro2DRRLib.kinematics import anatomical_frame_from_points
    from Fluoro2DRRLib.registration import SequenceResult
    from Fluoro2DRRLib.simulate import simulate_sequence

    sim = tmp_path_factory.mktemp("demo") / "simulation"
    simulate_sequence(sim, n_frames=N_FRAMES, seed=2, image_size=64, progress=False, phantom_voxel_mm=1.5,
                      max_flexion_deg=20)
    frames = load_frames(sim / "frames").frames
    geometry = load_calibration(sim / "calibration.json")
    bones = pipeline.load_bones(sim / "models" / "femur.stl", sim / "models" / "tibia.stl")
    truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
    quality = [{"frame": i, "similarity": 1.0, "iterations": 0, "converged": True, "reinitialised": False,
                "seconds": 0.0, "note": ""} for i in range(N_FRAMES)]
    result = SequenceResult(poses=truth, quality=quality)
    anat = {k: anatomical_frame_from_points(bones[k].surface_points_mm, k) for k in pipeline.BONE_NAMES}
    return {"frames": frames, "geometry": geometry, "bones": bones, "result": result, "anat": anat}


def test_demo_scene_loads_back(demo_inputs, tmp_path):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core MRML not available")
    from Fluoro2DRRLib import mrml_adapter as ma

    d = demo_inputs
    path = pipeline.write_demo_scene(tmp_path / "demo_scene.mrb", d["frames"], d["geometry"], d["bones"],
                                     d["result"], d["anat"])
    assert path.is_file() and path.suffix == ".mrb"
    scene = ma.load_scene_mrb(path, cache_dir=tmp_path / "cache")
    assert scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode") == 1
    browser = scene.GetNthNodeByClass(0, "vtkMRMLSequenceBrowserNode")
    assert browser.GetNumberOfItems() == N_FRAMES
    frames_seq = browser.GetMasterSequenceNode()
    assert frames_seq.GetAttribute(ma.ROLE) == "frames" and frames_seq.GetNumberOfDataNodes() == N_FRAMES
    back, _ = ma.volume_sequence_to_frames(frames_seq)
    np.testing.assert_array_equal(back, d["frames"])
    pose_seqs = ma.nodes_by_role(scene, "poses")
    assert sorted(s.GetAttribute(ma.BONE_NAME) for s in pose_seqs) == ["femur", "tibia"]
    for s in pose_seqs:
        assert s.GetNumberOfDataNodes() == N_FRAMES and browser.IsSynchronizedSequenceNode(s, True)
        assert ma.failed_frames_of_sequence(s) == []
        np.testing.assert_allclose(ma.transform_sequence_to_poses(s), d["result"].poses[s.GetAttribute(ma.BONE_NAME)],
                                   atol=1e-5)
        # the bone model follows the proxy transform
        proxy = browser.GetProxyNode(s)
        models = [scene.GetNthNodeByClass(i, "vtkMRMLModelNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode"))]
        assert any(m.GetTransformNodeID() == proxy.GetID() for m in models)
    assert ma.table_to_columns(ma.nodes_by_role(scene, "quality")[0])["failed"] == [0] * N_FRAMES
    kin = ma.table_to_columns(ma.nodes_by_role(scene, "kinematics")[0])
    assert len(kin["flexion"]) == N_FRAMES and np.all(np.isfinite(kin["flexion"]))
    assert len(ma.nodes_by_role(scene, "calibration")) == 1
    assert len(ma.nodes_by_role(scene, "frame_plane")) == 1


def test_plot_kinematics_writes_png(demo_inputs, tmp_path):
    pytest.importorskip("matplotlib")
    from Fluoro2DRRLib.kinematics import knee_kinematics

    d = demo_inputs
    truth_k = knee_kinematics(d["result"].poses, d["anat"]["femur"], d["anat"]["tibia"])
    est = {k: np.asarray(v) + 0.5 for k, v in truth_k.items()}
    est["flexion"] = np.asarray(est["flexion"], dtype=float).copy()
    est["flexion"][1] = np.nan  # a failed frame
    path = tmp_path / "kinematics.png"
    pipeline.plot_kinematics(est, truth_k, path)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pipeline.plot_kinematics(est, None, tmp_path / "no_truth.png")
    assert (tmp_path / "no_truth.png").is_file()


def test_demo_scene_with_a_relative_path(demo_inputs, tmp_path, monkeypatch):
    """`fluoro2drr demo --out demo_out` passes a relative path; MRML's bundle writer needs an absolute one."""
    from Fluoro2DRRLib import mrml_adapter as ma

    monkeypatch.chdir(tmp_path)
    d = demo_inputs
    path = pipeline.write_demo_scene("relative_out/demo_scene.mrb", d["frames"], d["geometry"], d["bones"],
                                     d["result"], d["anat"])
    assert path.is_absolute() and path.is_file()
    scene = ma.load_scene_mrb("relative_out/demo_scene.mrb")
    assert len(ma.nodes_by_role(scene, "frames")) + scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode") >= 1

"""The command line end to end: simulate -> evaluate, the simulator's truth on its own frames, and every
bad input ending in one clear line (exit code 2) with nothing half-written left behind."""
from __future__ import annotations

import json

import numpy as np
import pytest

from Fluoro2DRRLib import pose_io
from Fluoro2DRRLib.cli import main
from Fluoro2DRRLib.frames_io import load_frames, write_frames
from Fluoro2DRRLib.geometry import CArmGeometry, apply_transform


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "sim"
    assert main(["--threads", "1", "simulate", "--out", str(out), "--frames", "3", "--size", "128",
                 "--seed", "2"]) == 0
    return out


def test_simulate_writes_everything(sim):
    for rel in ("frames/frame_0000.tif", "calibration.json", "calibration.txt", "models/femur.stl",
                "models/tibia.stl", "truth/femur.jts", "truth/tibia.jts", "truth/poses.csv", "truth/bones.json",
                "simulation.json"):
        assert (sim / rel).is_file(), rel
    assert not (sim.parent / "sim.partial").exists()
    assert load_frames(sim / "frames").frames.shape == (3, 128, 128)
    # the JointTrack calibration describes the same projection as our JSON
    from Fluoro2DRRLib.calibration_io import load_calibration

    g_json = load_calibration(sim / "calibration.json")
    g_jt = load_calibration(sim / "calibration.txt", image_size=(128, 128))
    pts = np.array([[10.0, -20.0, -800.0], [-30.0, 5.0, -850.0]])
    np.testing.assert_allclose(g_jt.project(pts), g_json.project(pts), atol=1e-9)


def test_truth_reprojects_onto_its_own_frames(sim):
    """Each bone's surface, placed by its truth pose and projected, lands on that bone's pixels."""
    from Fluoro2DRRLib.bones import bone_from_mesh_file

    g = CArmGeometry.from_dict(json.loads((sim / "calibration.json").read_text()))
    frames = load_frames(sim / "frames").frames
    jts = {n: pose_io.read_jts(sim / "truth" / f"{n}.jts") for n in ("femur", "tibia")}
    for name in ("femur", "tibia"):
        bone = bone_from_mesh_file(sim / "models" / f"{name}.stl", name)
        for k in range(len(frames)):
            world = apply_transform(jts[name][k], bone.surface_points_mm)  # JointTrack world = source frame
            px = np.rint(g.project(world)).astype(int)
            inside = (px[:, 0] >= 0) & (px[:, 0] < 128) & (px[:, 1] >= 0) & (px[:, 1] < 128)
            assert inside.mean() > 0.9
            on_bone = frames[k][px[inside, 1], px[inside, 0]] > 0
            assert on_bone.mean() > 0.97, (name, k, on_bone.mean())
            # and a wrong pose (5 mm off in-plane) does not fit as well: the check can fail
            shifted = g.project(world + np.array([5.0, 0.0, 0.0]))
            sp = np.rint(shifted).astype(int)
            ok = (sp[:, 0] >= 0) & (sp[:, 0] < 128) & (sp[:, 1] >= 0) & (sp[:, 1] < 128)
            assert (frames[k][sp[ok, 1], sp[ok, 0]] > 0).mean() < on_bone.mean()


def test_evaluate_truth_and_a_known_error(sim, tmp_path, capsys):
    assert main(["evaluate", "--poses", str(sim / "truth"), "--truth", str(sim / "truth"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["femur"]["in_plane_mm_median"] == pytest.approx(0.0, abs=1e-9)
    assert summary["tibia"]["success_rate_pct"] == 100.0
    # a registration output 0.5 mm off in-plane (along image x) for every frame
    truth = pose_io.read_poses_csv(sim / "truth" / "poses.csv")
    g = CArmGeometry.from_dict(json.loads((sim / "calibration.json").read_text()))
    shift = np.eye(4)
    shift[:3, 3] = g.world_from_source[:3, 0] * 0.5
    est = {n: shift @ p for n, p in truth.items()}
    out = tmp_path / "est"
    out.mkdir()
    pose_io.write_poses_csv(out / "poses.csv", est)
    assert main(["evaluate", "--poses", str(out), "--truth", str(sim / "truth"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for n in ("femur", "tibia"):
        assert summary[n]["in_plane_mm_median"] == pytest.approx(0.5, abs=0.02)
        assert summary[n]["rotation_deg_median"] == pytest.approx(0.0, abs=1e-6)


def _register(sim, out, **override):
    args = {"--frames": str(sim / "frames"), "--calibration": str(sim / "calibration.json"),
            "--femur": str(sim / "models" / "femur.stl"), "--tibia": str(sim / "models" / "tibia.stl"),
            "--out": str(out)}
    args.update(override)
    argv = ["--threads", "1", "register"]
    for k, v in args.items():
        if v is not None:
            argv += [k, v]
    return main(argv)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("fluoro2drr: error:")
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs(sim, tmp_path, capsys):
    out = tmp_path / "out"
    # missing / unreadable files
    assert _register(sim, out, **{"--femur": str(tmp_path / "nope.stl")}) == 2
    _one_line_error(capsys, "nope.stl", "not found")
    garbage = tmp_path / "garbage.stl"
    garbage.write_bytes(b"\x00\x01not a mesh")
    assert _register(sim, out, **{"--femur": str(garbage)}) == 2
    _one_line_error(capsys, "garbage.stl")
    # no calibration
    assert _register(sim, out, **{"--calibration": str(tmp_path / "none.txt")}) == 2
    _one_line_error(capsys, "none.txt")
    # a mesh in metres
    from Fluoro2DRRLib.bones import read_mesh, write_mesh, polydata_arrays

    poly, _ = read_mesh(sim / "models" / "femur.stl")
    pts, tri = polydata_arrays(poly)
    metres = tmp_path / "femur_m.stl"
    write_mesh(metres, pts / 1000.0, tri)
    assert _register(sim, out, **{"--femur": str(metres)}) == 2
    _one_line_error(capsys, "femur_m.stl", "metres")
    # an open mesh
    import vtk

    plane = vtk.vtkSphereSource()
    plane.SetRadius(30)
    plane.SetEndTheta(300)  # a sphere with a slice missing: open
    plane.Update()
    open_path = tmp_path / "open.vtp"
    w = vtk.vtkXMLPolyDataWriter()
    w.SetFileName(str(open_path))
    w.SetInputData(plane.GetOutput())
    w.Write()
    assert _register(sim, out, **{"--tibia": str(open_path)}) == 2
    _one_line_error(capsys, "open.vtp", "open")
    # a translation model folder that is not there (a typo): refused before anything is written
    assert _register(sim, out, **{"--translation": str(tmp_path / "my_model")}) == 2
    _one_line_error(capsys, "--translation", "my_model", "not a folder")
    assert not out.exists()
    assert _register(sim, out, **{"--restart-deg": "-1"}) == 2
    _one_line_error(capsys, "--restart-deg", "between 0 (off) and 30")
    assert not out.exists()
    assert _register(sim, out, **{"--wire-width-mm": "nan"}) == 2
    _one_line_error(capsys, "--wire-width-mm", "between 0 (off) and 30")
    assert not out.exists()
    # frame size that disagrees with the calibration
    frames = load_frames(sim / "frames").frames
    small = tmp_path / "small_frames"
    write_frames(small, frames[:, :64, :64])
    assert _register(sim, out, **{"--frames": str(small)}) == 2
    _one_line_error(capsys, "disagrees")
    # NaN frames
    nan_dir = tmp_path / "nan_frames"
    nan_dir.mkdir()
    bad = frames[0].astype(np.float32)
    bad[5, 5] = np.nan
    np.save(nan_dir / "x.npy", bad)
    from PIL import Image

    Image.fromarray(bad).save(nan_dir / "frame_0000.tif")
    assert _register(sim, out, **{"--frames": str(nan_dir)}) == 2
    _one_line_error(capsys, "NaN")
    # a bone outside the field of view (init pose 400 mm off to the side)
    jts = pose_io.read_jts(sim / "truth" / "femur.jts")
    jts[:, 0, 3] += 400.0
    far = tmp_path / "far.jts"
    pose_io.write_jts(far, jts[:1])
    assert _register(sim, out, **{"--init-femur": str(far)}) == 2
    _one_line_error(capsys, "far.jts", "outside the field of view")
    # an empty label

    labels = np.zeros((20, 20, 20), np.int16)
    labels[5:15, 5:15, 10:18] = 5
    import SimpleITK as sitk

    lab_path = tmp_path / "labels.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(lab_path))
    assert main(["simulate", "--out", str(tmp_path / "s2"), "--labelmap", str(lab_path)]) == 2
    _one_line_error(capsys, "labels.nrrd", "label 6", "empty")
    # an effect override that names no effect
    assert main(["simulate", "--out", str(tmp_path / "s3"), "--realism", "fluoro",
                 "--fluoro-effect", "focal_blur=0.1,0.4"]) == 2
    _one_line_error(capsys, "--fluoro-effect", "focal_blur=0.1,0.4", "focal_sigma_px")
    # nothing was left behind as if complete
    assert not (out / "report.json").exists()
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()


def test_register_help_shows_the_interface(capsys):
    with pytest.raises(SystemExit):
        main(["register", "--help"])
    text = capsys.readouterr().out
    for flag in ("--frames", "--calibration", "--femur", "--tibia", "--ct", "--labels", "--femur-label",
                 "--tibia-label", "--init-femur", "--init-tibia", "--translation", "--device", "--resume", "--out",
                 "--restart-deg", "--wire-width-mm", "--no-fill", "--no-motion-check", "--no-joint-prior"):
        assert flag in text

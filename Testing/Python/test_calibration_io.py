"""Calibration readers: JointTrack, mayaCam (OpenCV), DICOM positioner geometry, JSON, dispatch."""
from pathlib import Path

import numpy as np
import pytest

from Fluoro2DRRLib import calibration_io as cio
from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.geometry import CArmGeometry

SHARED = Path(__file__).resolve().parents[3] / "shared"
REAL_CAM = SHARED / "data" / "real_fluoro_knee" / "xr_calib_left_knee_cam01.txt"


def opencv_project(k, r, t, x):
    xc = x @ r.T + t
    uvw = xc @ k.T
    return uvw[:, :2] / uvw[:, 2:]


def parse_maya(path):
    nums = []
    for ln in Path(path).read_text().splitlines():
        try:
            nums += [float(v) for v in ln.replace(",", " ").split()]
        except ValueError:
            pass
    nums = np.array(nums)
    return nums[2:11].reshape(3, 3), nums[11:20].reshape(3, 3), nums[20:23]


def test_jt_intcalib_read_write(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("JT_INTCALIB\n  980.5 \n -1.25\n0.75\n0.28\n\n# comment after the numbers\n")
    with pytest.raises(InputError, match=r"calib\.txt: .*image size"):
        cio.read_jt_intcalib(path)
    g = cio.read_jt_intcalib(path, image_size=(1000, 800))
    assert g.source_to_detector_mm == 980.5 and g.pixel_spacing_mm == (0.28, 0.28)
    assert g.principal_offset_mm == (-1.25, 0.75) and g.image_size == (1000, 800)
    np.testing.assert_array_equal(g.world_from_source, np.eye(4))
    # JointTrack projection formula from the brief
    x = np.array([[12.0, -30.0, -830.0]])
    col = 1000 / 2 - 0.5 + (-1.25 - 980.5 * 12.0 / -830.0) / 0.28
    row = 800 / 2 - 0.5 - (0.75 - 980.5 * -30.0 / -830.0) / 0.28
    np.testing.assert_allclose(g.project(x)[0], [col, row], atol=1e-9)
    out = tmp_path / "out.txt"
    cio.write_jt_intcalib(out, g)
    assert cio.load_calibration(out, image_size=(1000, 800)).to_dict() == g.to_dict()
    path.write_text("JT_INTCALIB\n980\nabc\n")
    with pytest.raises(InputError, match=r"calib\.txt: line 3"):
        cio.read_jt_intcalib(path, image_size=100)


def _check_maya_against_opencv(path, pixel_spacing=None):
    g = cio.read_maya_cam(path, pixel_spacing_mm=pixel_spacing)
    k, r, t = parse_maya(path)
    rng = np.random.default_rng(0)
    # points in front of the camera: camera centre + depth along the optical axis + spread
    centre = -r.T @ t
    axis = r[2]
    pts = centre + np.outer(rng.uniform(0.6, 1.2, 20) * t[2], axis) + rng.normal(0, 40, (20, 3))
    np.testing.assert_allclose(g.project(pts), opencv_project(k, r, t, pts), atol=1e-6)
    np.testing.assert_allclose(g.principal_point_px, k[:2, 2], atol=1e-9)
    return g


def test_maya_cam_real_file():
    if not REAL_CAM.is_file():
        pytest.skip("shared real data not present")
    g = _check_maya_against_opencv(REAL_CAM)
    assert g.image_size == (1760, 1760)
    assert g.pixel_spacing_mm[0] == 0.25
    np.testing.assert_allclose(g.source_to_detector_mm, 8673.95205439 * 0.25)


def test_maya_cam_synthetic_round_trip(tmp_path):
    wfs = np.eye(4)
    c, s = np.cos(0.4), np.sin(0.4)
    wfs[:3, :3] = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    wfs[:3, 3] = [100.0, -50.0, 900.0]
    g0 = CArmGeometry(1200.0, (0.3, 0.31), (640, 480), principal_offset_mm=(2.0, -3.5), world_from_source=wfs)
    path = tmp_path / "cam.txt"
    cio.write_maya_cam(path, g0)
    g = _check_maya_against_opencv(path, pixel_spacing=0.3)
    np.testing.assert_allclose(g.world_from_source, wfs, atol=1e-9)
    np.testing.assert_allclose(g.principal_offset_mm, g0.principal_offset_mm, atol=1e-9)
    np.testing.assert_allclose(g.pixel_spacing_mm, g0.pixel_spacing_mm, atol=1e-12)
    np.testing.assert_allclose(g.source_to_detector_mm, 1200.0, atol=1e-9)
    pts = np.array([[5.0, 20.0, -10.0], [-30.0, 0.0, 40.0]])
    np.testing.assert_allclose(cio.load_calibration(path, pixel_spacing_mm=0.3).project(pts), g0.project(pts),
                               atol=1e-6)


def _write_dicom(path, **tags):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"  # XA
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(str(path), enforce_file_format=True)


DICOM_TAGS = dict(DistanceSourceToDetector=1000.0, ImagerPixelSpacing=[0.2, 0.3], Rows=400, Columns=600,
                  DistanceSourceToPatient=750.0)


@pytest.mark.parametrize("primary,secondary,source,beam", [
    (0.0, 0.0, [0, -750, 0], [0, 1, 0]),
    (90.0, 0.0, [750, 0, 0], [-1, 0, 0]),
    (0.0, 30.0, [0, -750 * np.cos(np.radians(30)), -750 * 0.5], [0, np.cos(np.radians(30)), 0.5]),
])
def test_dicom_positioner_convention(tmp_path, primary, secondary, source, beam):
    path = tmp_path / "img.dcm"
    _write_dicom(path, PositionerPrimaryAngle=primary, PositionerSecondaryAngle=secondary, **DICOM_TAGS)
    g = cio.load_calibration(path)
    assert g.image_size == (600, 400) and g.pixel_spacing_mm == (0.3, 0.2)
    np.testing.assert_allclose(g.source_position_world, source, atol=1e-9)
    np.testing.assert_allclose(g.beam_direction_world, beam, atol=1e-12)
    assert np.isclose(np.linalg.det(g.world_from_source[:3, :3]), 1.0)
    # the isocentre projects to the image centre
    np.testing.assert_allclose(g.project(np.zeros(3)), [299.5, 199.5], atol=1e-9)
    if primary == 0 and secondary == 0:
        # documented: image up = superior, image right = +x RAS (patient's right)
        c = g.project(np.array([[10.0, 0, 0], [0, 0, 10.0]]))
        assert c[0, 0] > 299.5 and abs(c[0, 1] - 199.5) < 1e-9
        assert c[1, 1] < 199.5 and abs(c[1, 0] - 299.5) < 1e-9


def test_dicom_missing_tags(tmp_path):
    path = tmp_path / "nosid.dcm"
    tags = dict(DICOM_TAGS)
    del tags["DistanceSourceToDetector"]
    _write_dicom(path, **tags)
    with pytest.raises(InputError, match=r"nosid\.dcm: DICOM tag DistanceSourceToDetector is missing"):
        cio.read_dicom_calibration(path)
    path2 = tmp_path / "nosod.dcm"
    tags = dict(DICOM_TAGS)
    del tags["DistanceSourceToPatient"]
    _write_dicom(path2, PositionerPrimaryAngle=0.0, PositionerSecondaryAngle=0.0, **tags)
    with pytest.warns(UserWarning, match="DistanceSourceToPatient"):
        g = cio.read_dicom_calibration(path2)
    assert g.source_to_patient_mm == pytest.approx(850.0)


def test_json_and_dispatch_errors(tmp_path):
    g0 = CArmGeometry(980.0, (0.28, 0.28), (1000, 1000), principal_offset_mm=(1.0, 2.0))
    path = tmp_path / "calibration.json"
    g0.save_json(path)
    g = cio.load_calibration(path)
    assert g.to_dict() == g0.to_dict()
    with pytest.raises(InputError, match=r"missing\.txt: file not found"):
        cio.load_calibration(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match=r"empty\.txt: empty file"):
        cio.load_calibration(empty)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x89\x00\x13random bytes")
    with pytest.raises(InputError, match=r"garbage\.bin: unrecognised calibration format"):
        cio.load_calibration(garbage)
    badjson = tmp_path / "bad.json"
    badjson.write_text('{"source_to_detector_mm": 1000')
    with pytest.raises(InputError, match=r"bad\.json: line 1"):
        cio.load_calibration(badjson)
    maya = tmp_path / "maya.txt"
    maya.write_text("image size\n100,100\n\ncamera matrix\n1,0,0\n0,1,0\n")
    with pytest.raises(InputError, match=r"maya\.txt: line 5: 'camera matrix' needs 9 numbers"):
        cio.load_calibration(maya)
    maya.write_text("image size\n100,100\n\ncamera matrix\n1,0,0\n0,1,0\n0,0,1\n")
    with pytest.raises(InputError, match=r"maya\.txt: no 'rotation' block"):
        cio.load_calibration(maya)

"""Frame loading: TIFF/PNG via Pillow, DICOM via pydicom, natural sort, errors."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from Fluoro2DRRLib.errors import InputError
from Fluoro2DRRLib.frames_io import check_frames_match_geometry, load_frames, write_frames
from Fluoro2DRRLib.geometry import CArmGeometry

SHARED = Path(__file__).resolve().parents[3] / "shared"
REAL = SHARED / "data" / "real_fluoro_knee"


def test_write_load_round_trip_uint16_and_uint8(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, (3, 24, 32)).astype(np.float32)
    paths = write_frames(tmp_path / "u16", a)
    assert [p.name for p in paths] == ["frame_0000.tif", "frame_0001.tif", "frame_0002.tif"]
    s = load_frames(tmp_path / "u16")
    assert s.frames.dtype == np.float32 and s.source_dtype == "uint16" and s.value_range == (0.0, 65535.0)
    np.testing.assert_array_equal(s.frames, a)
    assert s.size == (32, 24) and len(s) == 3
    b = rng.integers(0, 256, (2, 10, 12)).astype(np.float32)
    write_frames(tmp_path / "u8", b, dtype="uint8")
    s = load_frames(str(tmp_path / "u8" / "*.tif"))
    assert s.source_dtype == "uint8" and s.value_range == (0.0, 255.0)
    np.testing.assert_array_equal(s.frames, b)


def test_natural_sort_png_rgb_and_list(tmp_path):
    for i in (10, 2, 1):
        Image.fromarray(np.full((8, 9), i, np.uint8)).save(tmp_path / f"frame{i}.png")
    s = load_frames(tmp_path)
    assert [Path(p).name for p in s.paths] == ["frame1.png", "frame2.png", "frame10.png"]
    np.testing.assert_array_equal(s.frames[:, 0, 0], [1, 2, 10])
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 0] = 100
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    s = load_frames([tmp_path / "rgb.png"])
    np.testing.assert_allclose(s.frames[0], 29.9, atol=1e-4)


def test_multipage_tiff(tmp_path):
    pages = [Image.fromarray(np.full((6, 7), v, np.uint16)) for v in (5, 600, 7000)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    s = load_frames(tmp_path / "stack.tif")
    assert s.frames.shape == (3, 6, 7) and s.source_dtype == "uint16"
    np.testing.assert_array_equal(s.frames[:, 3, 3], [5, 600, 7000])


def test_multiframe_dicom(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    data = np.arange(3 * 5 * 4, dtype=np.uint16).reshape(3, 5, 4) * 100
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.NumberOfFrames = 5, 4, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagerPixelSpacing = [0.2, 0.3]
    ds.PixelData = data.tobytes()
    ds.save_as(str(tmp_path / "cine.dcm"), enforce_file_format=True)
    s = load_frames(tmp_path / "cine.dcm")
    np.testing.assert_array_equal(s.frames, data)
    assert s.source_dtype == "uint16" and s.pixel_spacing_mm == (0.3, 0.2)


def test_size_check_and_errors(tmp_path):
    write_frames(tmp_path / "a", np.zeros((2, 16, 20)))
    s = load_frames(tmp_path / "a")
    check_frames_match_geometry(s, CArmGeometry(1000, (0.3, 0.3), (20, 16)))
    with pytest.raises(InputError, match=r"frame_0000\.tif: frame size 20x16 disagrees with the calibration's 30x30"):
        check_frames_match_geometry(s, CArmGeometry(1000, (0.3, 0.3), (30, 30)))
    # different sizes
    Image.fromarray(np.zeros((17, 20), np.uint8)).save(tmp_path / "a" / "frame_0002.tif")
    with pytest.raises(InputError, match=r"frame_0002\.tif: frame 2 is 20x17"):
        load_frames(tmp_path / "a")
    # nothing matched / missing
    with pytest.raises(InputError, match=r"nothing_\*\.tif: no files match"):
        load_frames(str(tmp_path / "nothing_*.tif"))
    with pytest.raises(InputError, match=r"missing\.tif"):
        load_frames([tmp_path / "missing.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no frame files"):
        load_frames(tmp_path / "empty")
    # garbage file
    (tmp_path / "garbage.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(InputError, match=r"garbage\.tif: cannot read as an image"):
        load_frames(tmp_path / "garbage.tif")
    # NaN frame (float TIFF)
    bad = np.zeros((2, 5, 5), np.float32)
    bad[1, 2, 2] = np.nan
    (tmp_path / "nan").mkdir()
    for i in range(2):
        Image.fromarray(bad[i]).save(tmp_path / "nan" / f"f{i}.tif")
    with pytest.raises(InputError, match=r"f1\.tif: frame 1 contains NaN"):
        load_frames(tmp_path / "nan")
    # 1-D image
    Image.fromarray(np.zeros((1, 9), np.uint8)).save(tmp_path / "line.png")
    with pytest.raises(InputError, match=r"line\.png: frame 0 is not a 2-D image"):
        load_frames(tmp_path / "line.png")


def test_float_tiff_value_range(tmp_path):
    a = np.array([[[-1.5, 2.0], [0.25, 3.0]]], np.float32)
    Image.fromarray(a[0]).save(tmp_path / "f.tif")
    s = load_frames(tmp_path / "f.tif")
    assert s.source_dtype == "float32" and s.value_range == (-1.5, 3.0)
    np.testing.assert_array_equal(s.frames, a)


def test_real_lzw_frames():
    if not REAL.is_dir():
        pytest.skip("shared real data not present")
    s = load_frames(REAL / "L_Hop_Cam1_001_UND.0138.tif")
    assert s.frames.shape == (1, 1760, 1760) and s.source_dtype == "uint8" and s.frames.max() > 0

"""Fluoroscopy frames: TIFF / PNG (Pillow) and DICOM (pydicom), single or multi-frame.

Intensities are kept as stored (no rescaling to [0, 1], no DICOM modality LUT), as float32.
"""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

FRAME_SUFFIXES = (".tif", ".tiff", ".png", ".dcm")
_DTYPE_RANK = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]


@dataclass
class FrameStack:
    frames: np.ndarray  # (N, H, W) float32, original intensity values
    source_dtype: str  # e.g. "uint8", "uint16", "float32"
    value_range: tuple[float, float]  # dtype range for integers, data min/max for floats
    paths: list[str] = field(default_factory=list)  # one entry per frame (a multi-frame file repeats)
    pixel_spacing_mm: tuple[float, float] | None = None  # (x / columns, y / rows), from DICOM

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def natural_key(name: str):
    """Sort key so that ``frame2`` comes before ``frame10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(name))]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _pil_page(img, path) -> tuple[np.ndarray, str]:
    mode = img.mode
    if mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB" if mode != "1" else "L")
        mode = img.mode
    arr = np.asarray(img)
    if mode in ("RGB", "RGBA", "RGBX"):
        return _luminance(arr), str(arr.dtype)
    if mode == "LA":
        arr = arr[..., 0]
    if arr.ndim == 3:  # unusual multi-channel modes: luminance of the first three channels
        return (_luminance(arr) if arr.shape[-1] >= 3 else arr[..., 0]), str(arr.dtype)
    dtype = str(arr.dtype)
    if dtype == "int32" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        dtype = "uint16"  # Pillow opens some 16-bit PNGs as 32-bit "I"
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
        dtype = str(arr.dtype)
    return arr, dtype


def _read_pillow(path: Path) -> tuple[list[np.ndarray], str]:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            pages = []
            dtype = "uint8"
            for page in ImageSequence.Iterator(im):
                arr, dtype = _pil_page(page, path)
                pages.append(np.array(arr, copy=True))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(path, f"cannot read as an image ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    return pages, dtype


def _read_dicom(path: Path) -> tuple[list[np.ndarray], str, tuple[float, float] | None]:
    try:
        import pydicom
        ds = pydicom.dcmread(str(path), force=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(path, f"cannot read as DICOM ({exc.__class__.__name__})") from None
    if "PixelData" not in ds:
        raise InputError(path, "DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoders, bad lengths
        raise InputError(path, f"cannot decode the DICOM pixel data ({exc.__class__.__name__}: {str(exc)[:80]})") \
            from None
    arr = np.asarray(arr)
    dtype = str(arr.dtype)
    nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if spp >= 3:
        arr = _luminance(arr)
    if nframes > 1 or arr.ndim == 3:
        pages = [arr[i] for i in range(arr.shape[0])] if arr.ndim == 3 else [arr]
    else:
        pages = [arr]
    spacing = getattr(ds, "ImagerPixelSpacing", None) or getattr(ds, "PixelSpacing", None)
    px = (float(spacing[1]), float(spacing[0])) if spacing is not None and len(spacing) == 2 else None
    return pages, dtype, px


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _resolve(spec) -> list[Path]:
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
        if not paths:
            raise InputError("frames", "the list of frame files is empty")
        for p in paths:
            if not p.is_file():
                raise InputError(p, "file not found")
        return paths
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        paths = sorted((q for q in p.iterdir() if q.is_file() and q.suffix.lower() in FRAME_SUFFIXES),
                       key=lambda q: natural_key(q.name))
        if not paths:
            raise InputError(p, f"no frame files ({', '.join(FRAME_SUFFIXES)}) in this folder")
        return paths
    if p.is_file():
        return [p]
    if any(ch in s for ch in "*?["):
        paths = sorted((Path(q) for q in glob.glob(s) if Path(q).is_file()), key=lambda q: natural_key(str(q)))
        if not paths:
            raise InputError(s, "no files match this pattern")
        return paths
    raise InputError(s, "file or folder not found")


def load_frames(spec) -> FrameStack:
    """Load frames from a folder, a glob pattern, a list of files, or one multi-frame DICOM / TIFF."""
    paths = _resolve(spec)
    frames: list[np.ndarray] = []
    frame_paths: list[str] = []
    dtypes: set[str] = set()
    spacing = None
    for path in paths:
        if _is_dicom(path):
            pages, dtype, px = _read_dicom(path)
            spacing = spacing or px
        else:
            pages, dtype = _read_pillow(path)
        dtypes.add(dtype)
        for page in pages:
            page = np.asarray(page)
            if page.ndim != 2 or page.size == 0 or min(page.shape) < 2:
                raise InputError(path, f"frame {len(frames)} is not a 2-D image (shape {page.shape})")
            if frames and page.shape != frames[0].shape:
                raise InputError(path, f"frame {len(frames)} is {page.shape[1]}x{page.shape[0]} but frame 0 "
                                       f"({frame_paths[0]}) is {frames[0].shape[1]}x{frames[0].shape[0]}")
            f32 = page.astype(np.float32)
            if not np.isfinite(f32).all():
                raise InputError(path, f"frame {len(frames)} contains NaN or Inf values")
            frames.append(f32)
            frame_paths.append(str(path))
    if not frames:
        raise InputError(paths[0], "no image found")
    stack = np.stack(frames)
    dtype = max(dtypes, key=lambda d: _DTYPE_RANK.index(d) if d in _DTYPE_RANK else len(_DTYPE_RANK))
    if dtype.startswith(("uint", "int")):
        info = np.iinfo(np.dtype(dtype))
        value_range = (float(info.min), float(info.max))
    elif dtype == "bool":
        value_range = (0.0, 1.0)
    else:
        value_range = (float(stack.min()), float(stack.max()))
    return FrameStack(frames=stack, source_dtype=dtype, value_range=value_range, paths=frame_paths,
                      pixel_spacing_mm=spacing)


def check_frames_match_geometry(stack: FrameStack, geometry) -> None:
    """InputError when the frame size differs from the calibration's image size."""
    w, h = stack.size
    gw, gh = geometry.image_size
    if (w, h) != (gw, gh):
        what = stack.paths[0] if stack.paths else "frames"
        raise InputError(what, f"frame size {w}x{h} disagrees with the calibration's {gw}x{gh}")


def as_frame_stack(frames, what: str = "frames", dtype=None) -> np.ndarray:
    """One frame ``(H, W)`` or a stack ``(N, H, W)`` -> ``(N, H, W)`` (cast to ``dtype`` when given)."""
    arr = np.asarray(frames) if dtype is None else np.asarray(frames, dtype=dtype)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(what, f"expected (N, H, W) or (H, W) frames, got shape {arr.shape}")
    return arr


def write_frames(directory, frames, dtype: str = "uint16", prefix: str = "frame") -> list[Path]:
    """Write ``{prefix}_0000.tif`` ... as 8- or 16-bit TIFF; values are rounded and clipped to the dtype."""
    if dtype not in ("uint8", "uint16"):
        raise InputError("write_frames", f"dtype must be 'uint8' or 'uint16', not {dtype!r}")
    from PIL import Image

    arr = as_frame_stack(frames, "write_frames", np.float64)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = np.iinfo(np.dtype(dtype))
    out = []
    for i, frame in enumerate(arr):
        vals = np.clip(np.rint(np.nan_to_num(frame, nan=0.0)), info.min, info.max).astype(dtype)
        img = Image.fromarray(np.ascontiguousarray(vals if dtype == "uint8" else vals.astype("<u2")))
        target = directory / f"{prefix}_{i:04d}.tif"
        img.save(target, format="TIFF")
        out.append(target)
    return out


__all__ = ["FrameStack", "load_frames", "check_frames_match_geometry", "write_frames", "natural_key"]

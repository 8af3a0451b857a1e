"""Per-bone pose sequences: JointTrack ``.jts``, Autoscoper ``.tra`` and our long-format CSV.

Every in-memory pose is a numpy ``(N, 4, 4)`` float64 stack of rigid ``world_from_bone`` matrices.
Frames that were not tracked are NaN matrices (every element NaN).

Pose *files* may use another convention than ``world_from_bone``:

* JointTrack ``.jts`` stores ``source_from_file_model = source_from_world @ world_from_bone @
  inv(file_from_bone)``: the motion that carries the model *as its file stores it* (e.g. an STL that
  Slicer wrote in LPS) into JointTrack's X-ray source frame.
* Autoscoper ``.tra`` stores ``world_from_file_model = world_from_bone @ inv(file_from_bone)``
  (Autoscoper works in its lab/world frame).

Use :func:`file_pose_from_world_pose` / :func:`world_pose_from_file_pose` to convert (pass
``geometry=None`` for the ``.tra`` convention).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import rigid_inverse

JTS_HEADER = "JT_EULER_312"
JTS_COLUMNS = ("x_tran", "y_tran", "z_tran", "z_rot", "x_rot", "y_rot")
JTS_COLUMN_LINE = ("          x_tran,          y_tran,          z_tran,"
                   "                   z_rot,           x_rot,           y_rot")
CSV_MATRIX_COLUMNS = tuple(f"m{r}{c}" for r in range(4) for c in range(4))


# ---------------------------------------------------------------------------------------------
# Euler 3-1-2 (JointTrack JT_EULER_312): R = Rz(z_rot) @ Rx(x_rot) @ Ry(y_rot)
# ---------------------------------------------------------------------------------------------
def euler312_to_matrix(x, y, z, z_rot, x_rot, y_rot) -> np.ndarray:
    """Translation (mm) and JointTrack 3-1-2 angles (deg) -> rigid 4x4; broadcasts to ``(..., 4, 4)``."""
    x, y, z, a, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, y, z, z_rot, x_rot, y_rot)))
    a, b, c = np.deg2rad(a), np.deg2rad(b), np.deg2rad(c)
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    m = np.zeros(x.shape + (4, 4))
    m[..., 0, 0] = ca * cc - sa * sb * sc
    m[..., 0, 1] = -sa * cb
    m[..., 0, 2] = ca * sc + sa * sb * cc
    m[..., 1, 0] = sa * cc + ca * sb * sc
    m[..., 1, 1] = ca * cb
    m[..., 1, 2] = sa * sc - ca * sb * cc
    m[..., 2, 0] = -cb * sc
    m[..., 2, 1] = sb
    m[..., 2, 2] = cb * cc
    m[..., 0, 3], m[..., 1, 3], m[..., 2, 3] = x, y, z
    m[..., 3, 3] = 1.0
    return m


def matrix_to_euler312(m) -> np.ndarray:
    """Rigid 4x4 (or ``(..., 4, 4)``) -> ``(..., 6)`` = (x, y, z mm, z_rot, x_rot, y_rot deg).

    x_rot lies in [-90, 90]. At gimbal lock (x_rot = +-90 deg) only z_rot +- y_rot is defined: y_rot is
    set to 0 and z_rot carries the whole in-plane angle. NaN matrices give NaN rows.
    """
    m = np.asarray(m, dtype=float)
    r = m[..., :3, :3]
    cb = np.hypot(r[..., 0, 1], r[..., 1, 1])
    b = np.arctan2(r[..., 2, 1], cb)
    locked = cb < 1e-9
    with np.errstate(invalid="ignore"):
        a = np.where(locked, np.arctan2(r[..., 1, 0], r[..., 0, 0]), np.arctan2(-r[..., 0, 1], r[..., 1, 1]))
        c = np.where(locked, 0.0, np.arctan2(-r[..., 2, 0], r[..., 2, 2]))
    out = np.stack([m[..., 0, 3], m[..., 1, 3], m[..., 2, 3], np.rad2deg(a), np.rad2deg(b), np.rad2deg(c)], -1)
    out[np.isnan(m).any(axis=(-1, -2))] = np.nan
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_pose_stack(poses, what="poses") -> np.ndarray:
    p = np.asarray(poses, dtype=float)
    if p.shape == (4, 4):
        p = p[None]
    if p.ndim != 3 or p.shape[1:] != (4, 4):
        raise InputError(what, f"expected an (N, 4, 4) pose stack, got shape {p.shape}")
    return p


def _read_lines(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read as text ({exc.__class__.__name__})") from None


def _parse_numbers(path, lineno: int, line: str, count: int) -> list[float]:
    fields = [f.strip() for f in line.replace(";", ",").split(",")]
    if len(fields) == 1:  # whitespace separated is tolerated
        fields = line.split()
    while fields and fields[-1] == "":  # trailing comma
        fields.pop()
    if len(fields) != count:
        raise InputError(path, f"line {lineno}: expected {count} numbers, found {len(fields)}")
    try:
        return [float(f) for f in fields]
    except ValueError:
        raise InputError(path, f"line {lineno}: not a number in {line.strip()[:60]!r}") from None


# ---------------------------------------------------------------------------------------------
# JointTrack .jts
# ---------------------------------------------------------------------------------------------
def write_jts(path, poses) -> None:
    """Write a JointTrack ``JT_EULER_312`` file; ``poses`` are the matrices the file must hold."""
    p = _as_pose_stack(poses, str(path))
    e = matrix_to_euler312(p)
    lines = [JTS_HEADER, JTS_COLUMN_LINE]
    for row in e:
        lines.append(",".join(f"{v:16.10f}" if np.isfinite(v) else f"{'nan':>16}" for v in row))
    Path(path).write_text("\n".join(lines) + "\n")


def read_jts(path) -> np.ndarray:
    """Read a JointTrack ``JT_EULER_312`` file -> ``(N, 4, 4)``.

    Tolerates surrounding whitespace, blank lines and a column-name line in any order of the six names.
    """
    lines = _read_lines(path)
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise InputError(path, "empty pose file")
    if numbered[0][1].upper() != JTS_HEADER:
        raise InputError(path, f"line {numbered[0][0]}: expected '{JTS_HEADER}', found {numbered[0][1][:40]!r}")
    order = list(range(6))
    body = numbered[1:]
    if body and ("tran" in body[0][1].lower() or "rot" in body[0][1].lower()):
        names = [n.strip().lower() for n in body[0][1].split(",") if n.strip()]
        if sorted(names) != sorted(JTS_COLUMNS):
            raise InputError(path, f"line {body[0][0]}: expected the columns {', '.join(JTS_COLUMNS)}")
        order = [names.index(n) for n in JTS_COLUMNS]
        body = body[1:]
    if not body:
        raise InputError(path, "no pose rows after the header")
    rows = np.array([_parse_numbers(path, n, ln, 6) for n, ln in body])[:, order]
    return euler312_to_matrix(*rows.T)


# ---------------------------------------------------------------------------------------------
# Autoscoper .tra
# ---------------------------------------------------------------------------------------------
def write_tra(path, poses) -> None:
    """Autoscoper ``.tra``: one line per frame, the 4x4 row-major, NaN rows for untracked frames."""
    p = _as_pose_stack(poses, str(path))
    lines = [",".join("NaN" if not np.isfinite(v) else repr(float(v)) for v in m.ravel()) for m in p]
    Path(path).write_text("\n".join(lines) + "\n")


def read_tra(path) -> np.ndarray:
    """Read an Autoscoper ``.tra`` -> ``(N, 4, 4)``; NaN lines become NaN matrices.

    Row-major is expected; a file whose every tracked line is column-major (last *column* 0, 0, 0, 1)
    is transposed.
    """
    lines = _read_lines(path)
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise InputError(path, "empty pose file")
    flat = np.array([_parse_numbers(path, n, ln, 16) for n, ln in numbered])
    tracked = ~np.isnan(flat).any(axis=1)
    flat[~tracked] = np.nan
    m = flat.reshape(-1, 4, 4)
    good = m[tracked]
    if len(good):
        row_major = np.allclose(good[:, 3], [0, 0, 0, 1], atol=1e-6)
        col_major = np.allclose(good[:, :, 3], [0, 0, 0, 1], atol=1e-6)
        if not row_major and col_major:
            m = np.swapaxes(m, -1, -2).copy()
        elif not row_major:
            bad = int(np.flatnonzero(tracked)[np.argmax(~np.isclose(good[:, 3], [0, 0, 0, 1], atol=1e-6).all(1))])
            raise InputError(path, f"line {numbered[bad][0]}: not a rigid 4x4 (last row must be 0, 0, 0, 1)")
    return m


# ---------------------------------------------------------------------------------------------
# CSV (long format)
# ---------------------------------------------------------------------------------------------
def write_poses_csv(path, poses: dict, quality: list[dict] | None = None) -> None:
    """Columns ``frame,bone,m00..m33`` (one row per frame per bone), then any per-frame ``quality`` keys.

    ``quality`` is a list of per-frame dicts (index = frame, or its ``frame`` key). Floats are written
    with ``repr`` so a round trip is exact.
    """
    stacks = {str(k): _as_pose_stack(v, f"{path} ({k})") for k, v in poses.items()}
    qkeys: list[str] = []
    qby_frame: dict[int, dict] = {}
    for i, q in enumerate(quality or []):
        qby_frame[int(q.get("frame", i))] = q
        for k in q:
            if k not in ("frame", "bone") and k not in qkeys and k not in CSV_MATRIX_COLUMNS:
                qkeys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "bone", *CSV_MATRIX_COLUMNS, *qkeys])
        n = max((len(s) for s in stacks.values()), default=0)
        for i in range(n):
            q = qby_frame.get(i, {})
            for name, s in stacks.items():
                if i >= len(s):
                    continue
                w.writerow([i, name, *(repr(float(v)) for v in s[i].ravel()),
                            *(q.get(k, "") for k in qkeys)])


def read_poses_csv(path) -> dict[str, np.ndarray]:
    """Read the long-format CSV -> ``{bone: (N, 4, 4)}``; frames absent for a bone are NaN."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read as CSV ({exc.__class__.__name__})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise InputError(path, "empty pose file")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("frame", "bone", *CSV_MATRIX_COLUMNS) if c not in header]
    if missing:
        raise InputError(path, f"line 1: missing column(s) {', '.join(missing)}")
    fi, bi = header.index("frame"), header.index("bone")
    mi = [header.index(c) for c in CSV_MATRIX_COLUMNS]
    entries: dict[str, dict[int, np.ndarray]] = {}
    for lineno, r in enumerate(rows[1:], start=2):
        try:
            frame = int(float(r[fi]))
            mat = np.array([float(r[j]) for j in mi]).reshape(4, 4)
        except (ValueError, IndexError):
            raise InputError(path, f"line {lineno}: bad frame number or matrix value") from None
        if frame < 0:
            raise InputError(path, f"line {lineno}: negative frame number {frame}")
        entries.setdefault(r[bi].strip(), {})[frame] = mat
    if not entries:
        raise InputError(path, "no pose rows after the header")
    n = max(max(d) for d in entries.values()) + 1
    out = {}
    for name, d in entries.items():
        s = np.full((n, 4, 4), np.nan)
        for k, v in d.items():
            s[k] = v
        out[name] = s
    return out


# ---------------------------------------------------------------------------------------------
# conventions
# ---------------------------------------------------------------------------------------------
def file_pose_from_world_pose(world_from_bone, geometry=None, file_from_bone=None) -> np.ndarray:
    """``world_from_bone`` -> the pose a file stores.

    With a geometry (JointTrack ``.jts``): ``source_from_world @ world_from_bone @ inv(file_from_bone)``.
    With ``geometry=None`` (Autoscoper ``.tra``): ``world_from_bone @ inv(file_from_bone)``.
    ``file_from_bone`` defaults to identity. Vectorised over ``(N, 4, 4)``.
    """
    p = np.asarray(world_from_bone, dtype=float)
    if file_from_bone is not None:
        p = p @ rigid_inverse(np.asarray(file_from_bone, dtype=float))
    if geometry is not None:
        p = geometry.source_from_world @ p
    return p


def world_pose_from_file_pose(file_pose, geometry=None, file_from_bone=None) -> np.ndarray:
    """Inverse of :func:`file_pose_from_world_pose`."""
    p = np.asarray(file_pose, dtype=float)
    if geometry is not None:
        p = np.asarray(geometry.world_from_source, dtype=float) @ p
    if file_from_bone is not None:
        p = p @ np.asarray(file_from_bone, dtype=float)
    return p


def load_pose_file(path, bone: str | None = None) -> np.ndarray:
    """Read ``.jts`` / ``.tra`` / ``.csv`` (with ``bone`` unless the CSV holds one bone) -> ``(N, 4, 4)``.

    Returns the matrices as the file stores them (no change of convention).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".jts":
        return read_jts(path)
    if suffix == ".tra":
        return read_tra(path)
    if suffix == ".csv":
        d = read_poses_csv(path)
        if bone is None:
            if len(d) == 1:
                return next(iter(d.values()))
            raise InputError(path, f"holds several bones ({', '.join(d)}): say which one")
        if bone not in d:
            raise InputError(path, f"no bone named {bone!r} (found {', '.join(d)})")
        return d[bone]
    raise InputError(path, f"unknown pose file type {suffix or '(no suffix)'!r}: expected .jts, .tra or .csv")


def load_world_poses(path, bone: str | None = None, geometry=None, file_from_bone=None) -> np.ndarray:
    """A pose file -> ``world_from_bone`` ``(N, 4, 4)``, undoing the file's convention.

    ``.jts`` (JointTrack) stores source-frame poses: needs ``geometry``; ``.tra`` (Autoscoper) stores
    world poses of the model file; our ``.csv`` stores ``world_from_bone``. ``file_from_bone`` maps the
    bone frame (RAS) to the model file's own coordinates (e.g. LPS for an STL saved by Slicer).
    """
    stored = load_pose_file(path, bone)
    suffix = Path(path).suffix.lower()
    if suffix == ".jts":
        if geometry is None:
            raise InputError(path, "a JointTrack .jts pose needs the C-arm calibration")
        return world_pose_from_file_pose(stored, geometry, file_from_bone)
    if suffix == ".tra":
        return world_pose_from_file_pose(stored, None, file_from_bone)
    return stored


def rotation_angle_deg(r_a, r_b) -> np.ndarray:
    """Geodesic angle between rotation stacks (deg)."""
    r_a, r_b = np.asarray(r_a, dtype=float)[..., :3, :3], np.asarray(r_b, dtype=float)[..., :3, :3]
    tr = np.einsum("...ij,...ij->...", r_a, r_b)  # trace(Ra Rb^T)
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


__all__ = [
    "euler312_to_matrix", "matrix_to_euler312", "write_jts", "read_jts", "write_tra", "read_tra",
    "write_poses_csv", "read_poses_csv", "file_pose_from_world_pose", "world_pose_from_file_pose",
    "load_pose_file", "rotation_angle_deg",
]

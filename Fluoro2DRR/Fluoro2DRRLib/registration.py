"""Two-bone 2D/3D registration with DiffDRR: automatic start, coarse-to-fine refinement, tracking.

For each frame we look for ``world_from_bone`` of femur and tibia such that the sum of their DRRs
matches the frame (brought to line-integral polarity). One 12-DOF problem: both bones' DRRs are
channels of one render and are summed, so overlapping bones are explained together.

Pose update per bone, about the bone's own centre ``c`` (world, at the start pose ``P0``)::

    world_from_bone = T(c + v) R(w) T(-c) P0          w: axis-angle (rad), v: translation (mm)

Levels: detector widths (e.g. 64, 128, 256) with the volumes box-averaged to match; many cheap
iterations at the coarse level, few at the fine one, each level stopping when the pose stops moving.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .bones import BoneModel, knee_joint
from .cpu_memory import reuse_freed_buffers
from .errors import InputError
from .fluoro_sim import TARGET_LI_SCALE
from .geometry import CArmGeometry, apply_transform
from .metrics import gradient_ncc, ncc
from .render import TwoBoneRenderer, resolve_device

BONES = ("femur", "tibia")
_DEBUG = bool(__import__("os").environ.get("FLUORO2DRR_DEBUG"))


@dataclass
class RegistrationSettings:
    detector_sizes: tuple[int, ...] = (64, 128, 256)
    voxel_mm: tuple[float, ...] = (2.4, 1.2, 1.2)  # bone volume resolution per level
    start_iterations: tuple[int, ...] = (80, 40, 15)  # first frame / re-initialised frames
    track_iterations: tuple[int, ...] = (40, 30, 10)  # tracked frames start close
    lr_rotation_deg: tuple[float, ...] = (1.5, 0.5, 0.2)
    lr_translation_mm: tuple[float, ...] = (2.0, 0.6, 0.25)
    stop_translation_mm: float = 0.02  # per-iteration pose change below which a level stops
    stop_rotation_deg: float = 0.02
    stop_patience: int = 4
    # converged: the finest level stopped by itself, or its similarity rose less than this over its second half
    converged_similarity_gain: float = 2e-4
    # per level, or one name for all: "trilinear" (sampled inside each bone's box) or "siddon" (exact)
    renderer: str | tuple[str, ...] = "trilinear"
    compile_renderer: bool = False  # torch.compile the DiffDRR renderer (measured: see bench_speed_levers)
    # keep freed large CPU buffers for the next evaluation while a sequence registers (glibc; see cpu_memory)
    reuse_cpu_buffers: bool = True
    # at most this many detector pixels (poses x pixels of the level) rendered at once: a larger batch (the
    # automatic start's 9 pairs, the flexion search's 49) is evaluated in chunks, the gradients summed -- the
    # same objective and steps, with the memory of one chunk. Registering 1024 x 1024 frames, the flexion
    # search's 49 pairs at 128 px rendered as one batch held 4.2 GB; with 65536 (one pair at 256 px, four at
    # 128) the whole registration peaked at 1.04 GB, 0.79 GB with ray_step_voxels below
    # (results/registration_memory_chunked_*). 0: one batch.
    max_pixels_per_evaluation: int = 65536
    # trilinear samples per ray: spaced this many voxels along the longest chord a ray of the batch cuts through
    # the bone's box at the poses a refinement level (or a render) starts from; one count for all of a level's
    # evaluations (a change of count is a step in the objective). Until the fifteenth session the count came
    # from the box's diagonal, the longest chord of any view, 2.2x what a lateral knee view cuts (77-88 mm
    # against 171-181 mm). 0: the diagonal's count.
    ray_step_voxels: float = 0.75
    optimizer: str = "lbfgs"  # "lbfgs" (strong-Wolfe line search) or "adam"
    rotation_scale_mm: float = 50.0  # lbfgs works on (w * this, v): radians at a lever arm of 50 mm ~ mm
    # Each level searches a bounded region around its start (smooth tanh bounds): the line search
    # cannot throw a bone out along the weakly constrained depth direction.
    bound_rotation_deg: tuple[float, ...] = (20.0, 6.0, 3.0)
    bound_translation_mm: tuple[float, ...] = (30.0, 8.0, 4.0)
    # tracked frames start within a few mm / deg of their answer: tighter regions (a temporal prior)
    track_bound_rotation_deg: tuple[float, ...] = (6.0, 3.0, 1.5)
    track_bound_translation_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
    # automatic start
    auto_rotation_grid_deg: float = 15.0
    auto_depth_offsets_mm: tuple[float, ...] = (-50.0, -25.0, 0.0, 25.0, 50.0)
    auto_candidates: int = 3  # best coarse candidates per bone; 2x this many (femur, tibia) pairs refined
    auto_joint_window_mm: float = 60.0  # the tibia is searched this far around where the default knee puts it
    # the automatic start's (femur, tibia) pairs kept after each level but the last, the best by similarity less
    # the joint penalty on that level (0 or None: all). The 64 px level cannot rank them (on seed 24's first
    # frame the pairs that won at 256 px ranked 7th and 8th of 9 there, all within 0.01 similarity); the 128 px
    # level put the winner 1st-3rd on three benchmark first frames. The finest level costs most per pair.
    auto_candidates_kept_per_level: tuple[int, ...] | None = (0, 3)
    # knee completion (with a knee joint): after the automatic start, the tibia the knee as scanned puts under
    # the chosen femur, flexed about its flexion axis to the angle (every auto_flexion_step_deg within
    # +-auto_flexion_range_deg) whose pair with that femur scores best at 128 px, is refined too when it lies
    # auto_flexion_apart_mm / _deg or more from the chosen tibia; the better pair is kept. On seed 22 (effects
    # per sequence) every tibia candidate of the search locked onto the other leg, 45 mm away, while the truth
    # explained the translated frame better (similarity 0.717 against 0.61-0.65).
    auto_flexion_search: bool = True
    auto_flexion_range_deg: float = 120.0
    auto_flexion_step_deg: float = 5.0
    auto_flexion_apart_mm: float = 10.0
    auto_flexion_apart_deg: float = 15.0
    # tracking
    # a frame is "lost" when its dissimilarity (1 - similarity) exceeds this many times the recent median
    # plus a margin; it is then refined again with the wide (first-frame) search, then the automatic start
    lost_dissimilarity_ratio: float = 2.0
    lost_dissimilarity_margin: float = 0.01
    # a recovery whose dissimilarity is below this fraction of the track's is taken as a re-acquisition
    reacquire_dissimilarity_ratio: float = 0.5
    # ... or below this fraction of the tracked pose's on the same frame, and no worse than the track's. Seed 24
    # (twenty-fourth session): the tibia's track drifted 12-28 deg over frames 5-7 (each frame a little worse);
    # at frame 8 the search found the right pose, 0.70x the tracked pose's dissimilarity and 0.75x the track's,
    # flagged failed (a 25 mm "jump" from the wrong frame 7), and so were frames 9-15, each searched from frame 7
    reacquire_same_frame_ratio: float = 0.8
    max_jump_mm: float = 25.0
    max_jump_deg: float = 20.0
    min_similarity: float = 0.5  # below this a frame is not "converged"
    xray_highpass_fraction: float = 0.08  # raw fluoroscopy: high-pass sigma as a fraction of the image width
    # raw fluoroscopy: after the finest level, this many rounds of re-weighting it. A raw frame holds what
    # the bone models cannot explain (patella, fibula, the other leg, wires, markers); each round weighs every
    # pixel by how well the DRR at the current pose explains it (Cauchy weight of its residual after the best
    # linear intensity fit, scale = outlier_scale x the residuals' robust sigma) and refines again on the
    # finest level with tracking bounds. Measured on the benchmark's 20 full-strength simulated frames: from
    # the true poses (bench_optimum_bias.py, 2 rounds) raw frames 1.73 -> 0.57 deg, the raw polish after the
    # translated frame 1.49 -> 0.70 deg; the translated sequence (bench_registration.py, femur / tibia median
    # rotation) 1.19 / 1.57 deg with 0 rounds, 0.69 / 1.21 with 1, 0.58 / 0.74 with 2, 0.45 / 0.68 with 3, at
    # ~2 s per round per frame on one CPU thread. Depth (out-of-plane) is not helped.
    outlier_rounds: int = 3
    outlier_scale: float = 3.0
    # raw fluoroscopy: thin bright curves (EMG wires, leads; metrics.thin_line_mask) narrower than this on the
    # detector, in pieces of at least raw_thin_line_min_area_mm2 (a wire's piece some 100 mm long; the bones'
    # own thin lines -- a plateau's or a condyle's cortex seen edge-on -- gave pieces of 90-320 mm2 on the
    # benchmark's frames), are filled from their surroundings in the raw frame before anything is compared
    # with it. The re-weighting above down-weights what the bones cannot explain at the current pose; a wire
    # along a bone's edge is explained by moving the edge onto it. Seed 22 (effects once per sequence), a wire
    # looping round the condyles: the raw frame's polish took the femur 12.8 deg / 2.5 mm off, even from the
    # true pose. With the wire filled (and left out of the finer levels: Registrar.fixed_levels) that sequence's
    # femur frames 2-9 end 0.19-0.29 mm / 0.5-2.3 deg off, every frame of both bones within 1 mm
    # (results/registration_translated_wire_fill_*). A bone line joined to a wire stays when the translated
    # frame shows it too (prepare_frame_and_translation; results/registration_translated_wire_bone_ridges_*).
    # 0 leaves the frame as it is.
    raw_thin_line_width_mm: float = 7.0
    raw_thin_line_min_area_mm2: float = 500.0
    # translated frames: compare in the networks' output space, exp(-S / scale), where their errors are
    # uniform ("target"), or in line integrals, -log of it, which amplifies them inside dense bone ("log")
    translated_space: str = "target"
    # with translation: a last tracking-sized refinement on the raw frame (exact edges) after the translated one
    polish_on_raw_frame: bool = True
    # how: "finest": only rounds of re-weighting on the finest level (a raw fluoroscopy frame; `polish_rounds` of
    # them, see outlier_rounds), so what the bone models cannot explain is weighed down before it pulls; "all":
    # the whole tracking registration (every level, unweighted, then outlier_rounds of re-weighting). Measured
    # from the true poses (twenty-fourth session): "all" let a sensor on seed 24's tibial edge turn the tibia
    # 4.3-5.7 deg on frames 0-5 (the translated pose 0.8-2.7 deg), "finest" kept it at 0.7-2.0 deg. 12 rounds:
    # each round's refinement is bounded, and 6 stopped short of the raw frame's optimum (a tibia's turn about its
    # long axis, which a single view barely sees); tracking, seeds 21-24 once per sequence, the tibia's median
    # rotation 0.87 -> 0.82 deg pooled, seed 24 1.10 -> 0.82, the femur 0.51 -> 0.47, in-plane within 0.01 mm
    # (twenty-fifth session; 3 rounds had left seed 22 frame 6's femur at 2.08 deg, 6 at 0.77).
    # "weighted": every level, each weighted by the outliers at the start pose, then the rounds: it keeps the
    # coarse levels' reach (capture range at 40 mm, seeds 24 and 31: 100 % where "finest" passed 17 / 33 %);
    # tracking (6 rounds, seeds 22 + 24): tibia 0.92 deg where "finest" gave 1.16, but in-plane 0.34 mm where it
    # gave 0.25 and the femur 0.66 deg where 0.54, so not the default (twenty-fifth session)
    polish_levels: str = "finest"
    polish_rounds: int = 12
    # a polish that explains the translated frame this many times worse (dissimilarity) is dropped
    polish_max_dissimilarity_ratio: float = 2.0
    # after the sequence: a frame whose dissimilarity exceeds this many times the median of the good frames
    # (plus lost_dissimilarity_margin), or that failed, is registered again from each good neighbour's pose,
    # backwards then forwards; the better-explaining pose is kept (tracking never looks back otherwise)
    revisit_weak_frames: bool = True
    revisit_dissimilarity_ratio: float = 1.5
    # after the revisits, a good frame that some bone's pose puts off its two neighbours' motion (their
    # interpolation) by more than off_motion_in_plane_mm across the beam or off_motion_rotation_deg, and
    # off_motion_ratio times further off than either neighbour lies off its own neighbours' motion (one frame
    # out of line, not a fast or turning motion: a frame 16 deg off makes each neighbour look 8 deg off), is
    # flagged failed, so the bridge below registers its raw frame from that motion. Its similarity cannot
    # tell: with the joint prior keeping the bones together, a tibia turned 16 deg (seed 24 frame 11) scored
    # as well as its neighbours and tracking neither jumped nor lost it. False: similarity and tracking alone
    # flag frames.
    flag_off_motion_frames: bool = True
    off_motion_in_plane_mm: float = 3.0
    off_motion_rotation_deg: float = 8.0
    off_motion_ratio: float = 1.5
    # then a frame still failed between two good frames (at most this many frames apart) is registered on the
    # raw frame from their interpolated pose, and kept when it explains the raw frame better and stays within
    # the tolerances below of that interpolation (a translated frame that wires or a bone at the field's edge
    # confused can prefer a wrong pose; the raw frame and the neighbours' motion still agree on the right one)
    bridge_failed_frames: bool = True
    bridge_max_gap_frames: int = 4
    bridge_in_plane_mm: float = 3.0
    bridge_rotation_deg: float = 6.0
    # (a failed first or last frame, with good frames on one side only, is bridged from the next good frame's
    # constant-velocity extrapolation). A frame the bridge cannot register either keeps its "failed" flag,
    # and each bone of it lying further than bridge_in_plane_mm across the beam or fill_rotation_deg turned
    # from the neighbours' motion carries that motion's pose instead, noted "not measured": on such frames the
    # raw and the translated frame both explained a wrong pose better than the true one (seed 24 frame 5:
    # registered 28 mm / 64 deg off, the interpolation 0.8 mm / 0.6 deg), so a pose far off the motion is the
    # worse guess. Unless the frame contradicts that motion: when the motion's pose explains the registered
    # image more than fill_max_dissimilarity_ratio times worse (dissimilarity) than the frame's own pose, a
    # good-looking neighbour may be the wrong one and the frame keeps its pose (measured: 1.11 and 1.20 on the
    # two fills above that helped, 1.71 on one that would have copied a neighbour 29 deg off).
    # False keeps the registered poses.
    fill_failed_frames: bool = True
    fill_rotation_deg: float = 15.0
    fill_max_dissimilarity_ratio: float = 1.5
    # fluoroscopy frames (raw or translated), after each good frame's registration: restarts from the pose with
    # every bone turned by this many degrees about each of the two axes across the beam (4 starts, refined with
    # the tracking settings); the best is kept when its dissimilarity is below (1 - restart_min_gain) x the
    # pose's own and, with translation, when the polished restart also explains the raw frame better than the
    # polished pose (on a held-out sequence the translated frame alone chose a wrong turn). Turning out of the
    # image plane barely changes a short bone's outline, so an artefact can hold it in a wrong optimum that
    # tracking then carries along for frames (the tibia 5-9 deg off on 8 of 20 frames of a held-out sequence,
    # while starting from the truth finds < 1 deg and explains the frame better:
    # Testing/benchmarks/results/registration_translated_restarts_2026-11-21.md). Clean DRRs do not need it
    # (0.27 deg on the same sequence); 0 turns it off; it costs 4 tracking-sized registrations per frame.
    restart_rotation_deg: float = 6.0
    restart_min_gain: float = 0.03
    # knee joint prior: a single view measures a bone's depth (along the beam) only through its magnification,
    # weakly, so a bone can sit tens of mm too close to the source and still match its outline (the automatic
    # start put a tibia 27 mm off and tracking carried 20-50 mm). Femur and tibia segmented from one scan carry
    # their joint (bones.knee_joint): across the beam the two copies of its centre separate with flexion (in
    # the image, measured there), along the beam they stay together within joint_depth_tolerance_mm plus
    # joint_depth_per_in_plane x their in-plane separation (an oblique view shows part of the sagittal roll-back
    # along the beam), and in all directions they stay within joint_max_separation_mm (the centre is where the
    # bones met as scanned; deep flexion rolls and turns it some 40 mm apart; a tibia template that locked onto
    # the other leg or the femur's shaft puts it 100 mm or more apart). Beyond either, every mm costs
    # joint_prior_weight x excess^2 in the objective (similarity lies in [-1, 1]: 10 mm beyond costs 0.1).
    # 0 turns it off; bones that do not meet as loaded carry no joint and no prior.
    joint_prior_weight: float = 1e-3
    joint_depth_tolerance_mm: float = 5.0
    joint_depth_per_in_plane: float = 0.5
    joint_max_separation_mm: float = 60.0
    # and the joint's angles: relative to the femur, the tibia turns from its pose as scanned about the flexion
    # axis (KneeJoint.flexion_axis_femur) freely, and about the other two axes (ab/adduction, internal-external
    # rotation; together they tilt the flexion axis) by at most joint_max_off_axis_deg; beyond it every deg
    # costs joint_prior_weight x excess^2. A tibia locked onto the other leg (seed 22, effects per sequence)
    # sat 75 deg off about an axis a knee cannot turn about, its joint centre within 60 mm of the femur's.
    # Knees: internal-external rotation some 10-30 deg over a squat or a kneel, ab/adduction under 10.
    joint_max_off_axis_deg: float = 35.0
    # and mediolaterally: along the femur's flexion axis (medio-lateral, in the femur's frame, so for any view)
    # the joint centre's two copies stay within joint_mediolateral_tolerance_mm; beyond it every mm costs
    # joint_prior_weight x excess^2. A knee's tibia slides medio-laterally on the femur by a few mm at most,
    # while flexion and roll-back move the copies apart in the sagittal plane only. In a lateral view this axis
    # lies along the beam, where the image measures a bone's depth only through its size: the depth tolerance
    # above (5 mm + 0.5 x the in-plane separation, for any view) let the tibia of seeds 22 and 24 (effects once
    # per sequence) settle 5-10 mm from the femur's depth, at its edge, against 0.4 mm at most in the truth.
    # With it, pooled over seeds 21-24 (once per sequence), the tibia went 0.375 -> 0.318 mm in-plane and
    # 0.99 -> 0.90 deg, the femur level (results/registration_translated_mediolateral_joint_*). None: no such term.
    joint_mediolateral_tolerance_mm: float | None = 3.0

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, pairs: list[str] | tuple[str, ...] = ()) -> "RegistrationSettings":
        """A copy with ``KEY=VALUE`` items applied (VALUE as JSON, else a string; lists become tuples): what the
        benchmarks' ``--setting`` passes. An unknown key or an unreadable item is an InputError."""
        known = {f.name for f in fields(self)}
        changes = {}
        for item in pairs:
            key, sep, text = str(item).partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise InputError("--setting", f"expected KEY=VALUE with KEY a registration setting, not {item!r}")
            try:
                value = json.loads(text)
            except ValueError:
                value = text
            changes[key] = tuple(value) if isinstance(value, list) else value
        return replace(self, **changes)


@dataclass
class FrameResult:
    frame: int
    poses: dict[str, np.ndarray]
    similarity: float
    iterations: int
    converged: bool
    reinitialised: bool
    seconds: float
    note: str = ""
    failed: bool = False  # similarity below the floor, or still lost after the recovery
    # the track was lost here and the recovery explained the frame clearly better than the track had explained
    # its frames: the track is followed from this frame's new pose, and the frames before it are in question
    reacquired: bool = False

    def quality(self) -> dict:
        return {"frame": self.frame, "similarity": round(float(self.similarity), 5), "iterations": self.iterations,
                "converged": bool(self.converged), "reinitialised": bool(self.reinitialised),
                "failed": bool(self.failed), "reacquired": bool(self.reacquired), "seconds": round(self.seconds, 3),
                "note": self.note}


@dataclass
class SequenceResult:
    poses: dict[str, np.ndarray]
    quality: list[dict] = field(default_factory=list)


# ---- small SE(3) helpers in torch ---------------------------------------------------------------
def _skew(w: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(w[..., 0])
    return torch.stack([torch.stack([zero, -w[..., 2], w[..., 1]], -1),
                        torch.stack([w[..., 2], zero, -w[..., 0]], -1),
                        torch.stack([-w[..., 1], w[..., 0], zero], -1)], -2)


def rotation_from_axis_angle(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_exp(_skew(w))


def compose_update(start: torch.Tensor, centre: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """start (B, K, 4, 4), centre (B, K, 3), w/v (B, K, 3) -> T(c + v) R(w) T(-c) start."""
    rot = rotation_from_axis_angle(w)
    t = centre + v - (rot @ centre.unsqueeze(-1)).squeeze(-1)
    upd = torch.zeros_like(start)
    upd[..., :3, :3] = rot
    upd[..., :3, 3] = t
    upd[..., 3, 3] = 1.0
    return upd @ start


def interpolate_pose(a: np.ndarray, b: np.ndarray, t: float, centroid_bone: np.ndarray) -> np.ndarray:
    """world_from_bone between ``a`` (t = 0) and ``b`` (t = 1): the bone's centroid moves on a straight line,
    its orientation on the shortest arc (slerp), so the bone turns about its own centre, not the world origin."""
    from scipy.spatial.transform import Rotation, Slerp

    rot = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([a[:3, :3], b[:3, :3]])))([t]).as_matrix()[0]
    c = np.asarray(centroid_bone, dtype=float)
    centre = (1.0 - t) * (a[:3, :3] @ c + a[:3, 3]) + t * (b[:3, :3] @ c + b[:3, 3])
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rot, centre - rot @ c
    return out


def _rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    r = a[:3, :3] @ b[:3, :3].T
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


# ---- the image side -----------------------------------------------------------------------------
def prepare_translated_frame(raw_frame: np.ndarray, translated: np.ndarray,
                             fov: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A frame translated by the bundled networks -> (line-integral image, field-of-view mask, info).

    The networks output the clean target of fluoro_sim: exp(-line integral / scale), bone dark on white, so
    -log inverts it exactly (up to the scale, which NCC ignores). The field of view comes from the raw
    frame (pass ``fov`` when it is already known): outside the image-intensifier circle the networks paint a
    uniform grey.
    """
    from .metrics import field_of_view_mask

    if fov is None:
        fov = np.asarray(field_of_view_mask(np.asarray(raw_frame, np.float32)), dtype=np.float32)
    image = -np.log(np.clip(np.asarray(translated, np.float32), 1e-3, 1.0)) * fov
    return image.astype(np.float32), fov, {"polarity": "translated", "reason": "translation networks"}


def translating(translation) -> bool:
    """Whether a ``translation`` value ("none", "bundled" or a model folder) asks for translated frames."""
    return translation is not None and str(translation).strip().lower() != "none"


def prepare_frame(frame: np.ndarray, polarity: str = "auto") -> tuple[np.ndarray, np.ndarray, dict]:
    """(line-integral-polarity image, field-of-view mask, info) at the frame's own resolution."""
    from .metrics import field_of_view_mask
    from .polarity import to_line_integral

    frame = np.asarray(frame, dtype=np.float32)
    if frame.ndim != 2:
        raise InputError("frame", f"expected a 2-D image, got shape {frame.shape}")
    if not np.all(np.isfinite(frame)):
        raise InputError("frame", "contains NaN or infinite values")
    fov = np.asarray(field_of_view_mask(frame), dtype=np.float32)
    image, info = to_line_integral(frame, polarity=polarity, fov_mask=fov)
    return np.asarray(image, np.float32), fov, info


def sequence_polarity(frames: np.ndarray, polarity: str = "auto") -> str:
    """``polarity`` itself, or for "auto" the one polarity of the whole sequence
    (:func:`polarity.detect_sequence_polarity`): frames of one C-arm never flip polarity between frames."""
    if polarity != "auto":
        return polarity
    from .polarity import detect_sequence_polarity

    return detect_sequence_polarity(frames)[0]


# a raw frame's field-of-view value for a pixel filled from its surroundings (Registrar.fixed_levels)
FILLED_PIXEL = 0.5


def fill_from_surroundings(image: np.ndarray, holes: np.ndarray, sigma_px: float) -> np.ndarray:
    """``image`` with the ``holes`` pixels replaced by the Gaussian-weighted mean of the pixels around them
    (normalised convolution). Left out of the field of view alone, a wire still pulls: the raw frame's
    similarity high-passes the image, so the wire leaves a halo some 20 px wide around its hole."""
    from scipy import ndimage

    keep = (~holes).astype(np.float32)
    weight = ndimage.gaussian_filter(keep, sigma_px)
    mean = ndimage.gaussian_filter(np.asarray(image, np.float32) * keep, sigma_px) / np.maximum(weight, 1e-6)
    return np.where(holes, mean, image).astype(np.float32)


def prepare_frame_and_translation(frame: np.ndarray, translated: np.ndarray | None, polarity: str = "auto",
                                  thin_lines_px: tuple[float, float] | None = None):
    """-> (the raw frame prepared, the image to register): the translated frame prepared when there is one
    (its field of view taken from the raw frame), else the raw frame again. ``thin_lines_px`` (widest curve,
    smallest piece, in the frame's pixels: :meth:`Registrar.thin_lines_px`) fills a raw fluoroscopy frame's
    thin bright curves (:func:`metrics.thin_line_mask`) from their surroundings (:func:`fill_from_surroundings`)
    and marks them FILLED_PIXEL in its field of view (:meth:`Registrar.fixed_levels`: left out of every level but
    the coarsest; the prepared info's ``thin_line_pixels`` counts them); the translated frame is left as it is
    (the networks remove wires), and the raw curves it shows too are bone and stay (``thin_line_bone_pixels``)."""
    raw_prepared = prepare_frame(frame, polarity)
    translated_prepared = None if translated is None else prepare_translated_frame(frame, translated,
                                                                                   fov=raw_prepared[1])
    if thin_lines_px is not None and raw_prepared[2]["polarity"] == "xray":
        from .metrics import thin_line_mask

        image, fov, info = raw_prepared
        curves = thin_line_mask(image, fov, *thin_lines_px)
        bone_ridges = 0
        if curves.any() and translated_prepared is not None:
            # a thin curve the translated frame shows too is bone, not a wire (the networks remove wires): the
            # tibial plateau's rim or the condyles' overlap line, joined to a wire that crosses it. Filled with
            # the wire, seed 23's tibia tilted 4.6 deg out of plane on frame 17 (kept: 0.6 deg from the truth; README)
            from scipy import ndimage

            ridges = ndimage.binary_dilation(thin_line_mask(translated_prepared[0], fov, thin_lines_px[0], 1.0))
            bone_ridges = int((curves & ridges).sum())
            curves &= ~ridges
        if curves.any():
            image = fill_from_surroundings(image, curves, sigma_px=thin_lines_px[0])
            fov = np.where(curves & (fov > 0), FILLED_PIXEL, fov).astype(np.float32)
        raw_prepared = (image, fov, {**info, "thin_line_pixels": int(curves.sum()),
                                     "thin_line_bone_pixels": bone_ridges})
    return raw_prepared, raw_prepared if translated_prepared is None else translated_prepared


def _downsample(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) -> (1, 1, h, w) by area averaging (antialiased)."""
    if tuple(image.shape[-2:]) == (size[1], size[0]):
        return image
    return F.interpolate(image, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)


def highpass(image: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """image minus its Gaussian low-pass (separable, reflect-padded): removes soft tissue's smooth ramp."""
    radius = max(1, int(3 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    k = k / k.sum()
    b, c, h, w = image.shape
    flat = image.reshape(b * c, 1, h, w)
    pad_h, pad_w = min(radius, h - 1), min(radius, w - 1)
    low = F.conv2d(F.pad(flat, (pad_w, pad_w, 0, 0), mode="reflect"), k[None, None, None, radius - pad_w:radius + pad_w + 1])
    low = F.conv2d(F.pad(low, (0, 0, pad_h, pad_h), mode="reflect"), k[None, None, radius - pad_h:radius + pad_h + 1, None])
    return image - low.reshape(b, c, h, w)


def similarity(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None,
               highpass_fraction: float = 0.0) -> torch.Tensor:
    """0.5 global NCC + 0.5 gradient NCC: higher is better, 1 is perfect.

    Global NCC gives the wide, smooth basin; gradient NCC the sharp peak at the edges. Patch NCC (as in
    xvr) was measured to be jagged on bone DRRs (mostly flat windows) and is left out of the objective.
    With ``highpass_fraction`` > 0 (raw fluoroscopy) the global NCC compares both images high-passed with a
    Gaussian of that fraction of the image width, so the soft tissue's smooth ramp does not dominate it.
    """
    if highpass_fraction > 0:
        sigma = highpass_fraction * fixed.shape[-1]
        return 0.5 * ncc(highpass(fixed, sigma), highpass(moving, sigma), mask=mask) + \
            0.5 * gradient_ncc(fixed, moving, mask=mask)
    return 0.5 * ncc(fixed, moving, mask=mask) + 0.5 * gradient_ncc(fixed, moving, mask=mask)


def outlier_weights(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor, highpass_fraction: float = 0.0,
                    scale: float = 3.0) -> torch.Tensor:
    """Per-pixel weights in (0, 1] (same shape as ``fixed``, (1, 1, H, W)): how well ``moving`` (the DRR at
    the current pose) explains each pixel of ``fixed`` (the frame), compared as :func:`similarity` compares
    them (high-passed when ``highpass_fraction`` > 0).

    The frame is fitted by ``a * moving + b`` over the mask (least squares); a pixel whose residual ``r`` is
    large for the frame's noise gets ``1 / (1 + (r / (scale * sigma))^2)`` (Cauchy), sigma the residuals'
    robust spread (1.4826 x median |r|): structure the bones cannot explain (another bone, a wire) stops
    pulling the pose, while the bones' own edges, explained at a near-right pose, keep their weight.
    """
    if highpass_fraction > 0:
        sigma_px = highpass_fraction * fixed.shape[-1]
        fixed, moving = highpass(fixed, sigma_px), highpass(moving, sigma_px)
    w = mask
    total = w.sum().clamp_min(1e-12)
    mean_f, mean_m = (w * fixed).sum() / total, (w * moving).sum() / total
    df, dm = fixed - mean_f, moving - mean_m
    gain = (w * df * dm).sum() / (w * dm * dm).sum().clamp_min(1e-12)
    residual = df - gain * dm
    inside = residual[mask > 0]
    if inside.numel() == 0:
        return torch.ones_like(fixed)
    sigma = 1.4826 * inside.abs().median() + 1e-12
    return 1.0 / (1.0 + (residual / (scale * sigma)) ** 2)


def _settings_of(fn, args, kwargs) -> RegistrationSettings:
    """The RegistrationSettings a call of ``fn`` runs with: its Registrar's (``self`` or ``registrar``), its
    ``settings``, or the defaults."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    for name in ("self", "registrar"):
        if bound.get(name) is not None:
            return bound[name].settings
    return bound.get("settings") or RegistrationSettings()


def _reusing_cpu_buffers(fn):
    """Run ``fn`` (a function or a generator) inside :func:`cpu_memory.reuse_freed_buffers` when its settings'
    ``reuse_cpu_buffers`` asks for it: the engine's entry points (a sequence, the revisits, one frame), not each
    refinement (leaving the outermost one hands the memory back, which each refinement would pay again)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            with reuse_freed_buffers(_settings_of(fn, args, kwargs).reuse_cpu_buffers):
                yield from fn(*args, **kwargs)
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        with reuse_freed_buffers(_settings_of(fn, args, kwargs).reuse_cpu_buffers):
            return fn(*args, **kwargs)
    return function


class Registrar:
    """Holds the renderers of every level for one set of bones and one C-arm; registers frames."""

    def __init__(self, geometry: CArmGeometry, bones: dict[str, BoneModel], settings: RegistrationSettings | None = None,
                 device: str = "auto"):
        self.settings = settings or RegistrationSettings()
        self.device = resolve_device(device)
        self.geometry = geometry
        self.names = [n for n in BONES if n in bones]
        if not self.names:
            raise InputError("bones", "no femur or tibia model given")
        self.bones = bones
        s = self.settings
        self.levels = []
        renderers = (s.renderer,) * len(s.detector_sizes) if isinstance(s.renderer, str) else tuple(s.renderer)
        if len(renderers) != len(s.detector_sizes) or len(s.voxel_mm) != len(s.detector_sizes):
            raise InputError("settings", "detector_sizes, voxel_mm and renderer need one entry per level")
        for size, voxel, kind in zip(s.detector_sizes, s.voxel_mm, renderers):
            g = geometry.resized(size)
            level_bones = [bones[n].resampled(voxel) for n in self.names]
            self.levels.append(TwoBoneRenderer(g, level_bones, kind, device=self.device,
                                               compile_renderer=s.compile_renderer))
        self.centroids_bone = {n: bones[n].centroid_mm for n in self.names}
        self.joint = (knee_joint(bones["femur"], bones["tibia"])
                      if len(self.names) == 2 and s.joint_prior_weight > 0 else None)
        if self.joint is not None:
            self._joint_centres = torch.as_tensor(np.stack([self.joint.centre_femur_mm, self.joint.centre_tibia_mm]),
                                                  dtype=torch.float32, device=self.device)  # (2, 3) bone frames
            self._beam = torch.as_tensor(geometry.beam_direction_world, dtype=torch.float32, device=self.device)
            self._flexion_axis = torch.as_tensor(self.joint.flexion_axis_femur, dtype=torch.float32, device=self.device)
            self._tibia_in_femur = torch.as_tensor(self.joint.tibia_in_femur, dtype=torch.float32,
                                                   device=self.device)  # femur_from_tibia as scanned
        self.highpass = 0.0  # set per frame from its polarity
        self.target_space = False  # translated frames compared in the networks' output space (per frame)

    # -- helpers --
    def _stack(self, poses: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.as_tensor(np.stack([poses[n] for n in self.names], 0)[None], dtype=torch.float32,
                               device=self.device)

    def _unstack(self, t: torch.Tensor, b: int = 0) -> dict[str, np.ndarray]:
        arr = t[b].detach().cpu().double().numpy()
        return {n: arr[i] for i, n in enumerate(self.names)}

    def _centres(self, poses: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(np.stack([self.centroids_bone[n] for n in self.names]), dtype=poses.dtype,
                            device=poses.device)
        return (poses[..., :3, :3] @ c.unsqueeze(-1)).squeeze(-1) + poses[..., :3, 3]

    def _joint_copies_apart(self, poses: torch.Tensor) -> torch.Tensor:
        """(B, 2, 4, 4) -> (B, 3) world mm: the femur's copy of the joint centre less the tibia's."""
        c = (poses[:, :, :3, :3] @ self._joint_centres.unsqueeze(-1)).squeeze(-1) + poses[:, :, :3, 3]  # (B, 2, 3)
        return c[:, 0] - c[:, 1]

    def joint_excess_mm(self, poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2, 4, 4) -> ((B,), (B,)): how far (mm) the joint centre's two copies lie apart beyond their
        tolerances, along the beam and in all directions (0 within them, and always 0 without a joint)."""
        if self.joint is None:
            zero = torch.zeros(poses.shape[0], dtype=poses.dtype, device=poses.device)
            return zero, zero
        apart = self._joint_copies_apart(poses)
        along = apart @ self._beam
        across = torch.sqrt(((apart - along[:, None] * self._beam) ** 2).sum(-1) + 1e-6)
        s = self.settings
        depth = F.relu(along.abs() - s.joint_depth_tolerance_mm - s.joint_depth_per_in_plane * across)
        separation = F.relu(torch.sqrt(along ** 2 + across ** 2) - s.joint_max_separation_mm)
        return depth, separation

    def joint_off_axis_deg(self, poses: torch.Tensor) -> torch.Tensor:
        """(B, 2, 4, 4) -> (B,): how far (deg) the tibia has turned, relative to the femur and from its pose as
        scanned, about axes other than the flexion axis: the angle by which that turn tilts the flexion axis
        (0 without a joint). A pure flexion leaves the axis where it was."""
        if self.joint is None:
            return torch.zeros(poses.shape[0], dtype=poses.dtype, device=poses.device)
        femur_from_tibia = poses[:, 0, :3, :3].transpose(-1, -2) @ poses[:, 1, :3, :3]
        turn = femur_from_tibia @ self._tibia_in_femur[:3, :3].T  # scanned -> now, femur frame
        moved = turn @ self._flexion_axis
        chord = torch.sqrt(((moved - self._flexion_axis) ** 2).sum(-1) + 1e-12)  # finite gradient at 0
        return torch.rad2deg(2.0 * torch.asin(torch.clamp(chord / 2.0, max=1.0)))

    def joint_mediolateral_mm(self, poses: torch.Tensor) -> torch.Tensor:
        """(B, 2, 4, 4) -> (B,): the joint centre's two copies apart along the femur's flexion axis (signed mm;
        0 without a joint)."""
        if self.joint is None:
            return torch.zeros(poses.shape[0], dtype=poses.dtype, device=poses.device)
        axis_world = poses[:, 0, :3, :3] @ self._flexion_axis
        return (self._joint_copies_apart(poses) * axis_world).sum(-1)

    def joint_penalty(self, poses: torch.Tensor) -> torch.Tensor:
        """(B, K, 4, 4) -> (B,): the joint prior's cost (added to -similarity)."""
        s = self.settings
        depth, separation = self.joint_excess_mm(poses)
        off_axis = F.relu(self.joint_off_axis_deg(poses) - s.joint_max_off_axis_deg)
        cost = depth ** 2 + separation ** 2 + off_axis ** 2
        if s.joint_mediolateral_tolerance_mm is not None:
            cost = cost + F.relu(self.joint_mediolateral_mm(poses).abs() - s.joint_mediolateral_tolerance_mm) ** 2
        return s.joint_prior_weight * cost

    def fixed_levels(self, image: np.ndarray, fov: np.ndarray):
        """The frame's pyramid: (image, mask) per level. ``fov``: 1 in the field, 0 outside, FILLED_PIXEL for
        pixels filled from their surroundings (a wire's: :func:`prepare_frame_and_translation`), which every level
        but the coarsest leaves out. At the coarsest (64 px, 4.4 mm pixels on the benchmark) a left-out wire takes
        a band of coarse pixels with it, and with it a bone edge the wire runs along (seed 22 frame 13: from the
        true pose the tibia went 7.8 mm off; kept there, filled, 0.2 mm). The fill alone on the finer levels
        leaves a blurred edge beside the wire that still pulls (a wire 2 px outside a femur's outline: 4.9 deg
        off when only the finest level left it out, 0.3 deg when every level but the coarsest did).
        """
        img = torch.as_tensor(image, dtype=torch.float32, device=self.device)[None, None]
        msk = torch.as_tensor(fov, dtype=torch.float32, device=self.device)[None, None]
        in_field = (msk > 0.5 * FILLED_PIXEL).float()
        out = []
        for k, r in enumerate(self.levels):
            size = (r.width, r.height)
            m = (_downsample(msk if k > 0 else in_field, size) > 0.99).float()
            out.append((_downsample(img, size), m))
        return out

    # -- local optimisation --
    def refine(self, fixed_levels, start: torch.Tensor, iterations: tuple[int, ...],
               levels: tuple[int, ...] | None = None, tracking: bool = False,
               kept_per_level: tuple[int, ...] | None = None) -> tuple[torch.Tensor, float, int, bool]:
        """L-BFGS (or Adam) over (w, v) per bone, coarse to fine. start: (B, K, 4, 4); returns the best of the batch.
        ``kept_per_level[j]``: after the j-th level refined (but the last), only this many of the batch go on, the
        best by similarity less the joint penalty on that level (where that level can already rank them)."""
        s = self.settings
        levels = tuple(range(len(self.levels))) if levels is None else levels
        poses = start.detach().clone()
        total_iterations = 0
        converged = True
        for j, li in enumerate(levels):
            if j > 0 and kept_per_level is not None and j - 1 < len(kept_per_level):
                poses = self._best_of(fixed_levels, poses, levels[j - 1], kept_per_level[j - 1])
            n_iter = iterations[li]
            if n_iter <= 0:
                continue
            renderer = self.levels[li]
            fixed, mask = fixed_levels[li]
            centre = self._centres(poses).detach()
            if s.optimizer == "lbfgs":
                w, v, n_done, level_converged = self._lbfgs(renderer, fixed, mask, poses, centre, n_iter, li, tracking)
            else:
                w, v, n_done, level_converged = self._adam(renderer, fixed, mask, poses, centre, n_iter, li)
            total_iterations += n_done
            with torch.no_grad():
                poses = compose_update(poses, centre, w, v)
            if _DEBUG:
                sim = float(self.score(fixed_levels, poses, li).max())
                print(f"  level {li} ({renderer.width}px): {n_done} evaluations, similarity {sim:.4f}")
            if li == levels[-1]:
                converged = level_converged
        with torch.no_grad():
            renderer = self.levels[levels[-1]]
            fixed, mask = fixed_levels[levels[-1]]
            sims = similarity(fixed, self._moving(self._render(renderer, poses)), mask, self.highpass)
            best = int(torch.argmax(sims - self.joint_penalty(poses)))
        return poses[best:best + 1], float(sims[best]), total_iterations, converged

    def _best_of(self, fixed_levels, poses: torch.Tensor, level: int, keep: int) -> torch.Tensor:
        """The ``keep`` poses of the batch (B, K, 4, 4) scoring best on ``level``, best first."""
        if keep <= 0 or poses.shape[0] <= keep:
            return poses
        with torch.no_grad():
            order = torch.argsort(self.score(fixed_levels, poses, level) - self.joint_penalty(poses), descending=True)
        return poses[order[:keep]]

    def _lbfgs(self, renderer, fixed, mask, poses, centre, n_eval, li, tracking=False):
        s = self.settings
        rot_deg = (s.track_bound_rotation_deg if tracking else s.bound_rotation_deg)[li]
        rot_bound = math.radians(rot_deg) * s.rotation_scale_mm
        trans_bound = (s.track_bound_translation_mm if tracking else s.bound_translation_mm)[li]
        x = torch.zeros(poses.shape[:-2] + (6,), device=self.device, requires_grad=True)
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=n_eval, max_eval=n_eval, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-7, line_search_fn="strong_wolfe")
        count = [0]
        history = []
        n_points = self._samples(renderer, poses)

        def bounded(x):
            w = rot_bound * torch.tanh(x[..., :3] / rot_bound) / s.rotation_scale_mm
            v = trans_bound * torch.tanh(x[..., 3:] / trans_bound)
            return w, v

        def closure():
            opt.zero_grad()
            loss = self._loss_backward(renderer, fixed, mask, poses, centre, lambda part: bounded(x[part]),
                                       n_points).sum()
            count[0] += 1
            history.append(float(loss) / poses.shape[0])
            return loss

        opt.step(closure)
        with torch.no_grad():
            w, v = bounded(x)
        half = history[len(history) // 2:]
        settled = len(history) >= 2 and (max(half) - min(history)) < s.converged_similarity_gain
        return w, v, count[0], count[0] < n_eval or settled

    def _adam(self, renderer, fixed, mask, poses, centre, n_iter, li):
        s = self.settings
        w = torch.zeros(poses.shape[:-2] + (3,), device=self.device, requires_grad=True)
        v = torch.zeros_like(w, requires_grad=True)
        opt = torch.optim.Adam([{"params": [w], "lr": math.radians(s.lr_rotation_deg[li])},
                                {"params": [v], "lr": s.lr_translation_mm[li]}])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(n_iter, 1), eta_min=0.0)
        still = 0
        prev_w, prev_v = w.detach().clone(), v.detach().clone()
        it = 0
        n_points = self._samples(renderer, poses)
        for it in range(n_iter):
            opt.zero_grad()
            self._loss_backward(renderer, fixed, mask, poses, centre, lambda part: (w[part], v[part]), n_points)
            opt.step()
            sched.step()
            with torch.no_grad():
                dw = math.degrees(float((w - prev_w).norm(dim=-1).max()))
                dv = float((v - prev_v).norm(dim=-1).max())
                prev_w.copy_(w)
                prev_v.copy_(v)
            still = still + 1 if (dw < s.stop_rotation_deg and dv < s.stop_translation_mm) else 0
            if still >= s.stop_patience:
                return w.detach(), v.detach(), it + 1, True
        return w.detach(), v.detach(), it + 1, False

    def _chunks(self, renderer: TwoBoneRenderer, n_poses: int) -> list[slice]:
        """A batch of ``n_poses`` on ``renderer``'s level, cut into slices of at most
        ``max_pixels_per_evaluation`` detector pixels in all (one pose at least)."""
        budget = self.settings.max_pixels_per_evaluation
        per_chunk = max(1, budget // (renderer.width * renderer.height)) if budget > 0 else n_poses
        return [slice(i, min(i + per_chunk, n_poses)) for i in range(0, n_poses, per_chunk)]

    def _samples(self, renderer: TwoBoneRenderer, poses: torch.Tensor) -> list[int] | None:
        """Samples per ray per bone for evaluations near ``poses`` (``ray_step_voxels``; None: the diagonal's)."""
        step = self.settings.ray_step_voxels
        return renderer.samples_per_ray(poses, step) if step > 0 else None

    def _render(self, renderer: TwoBoneRenderer, poses: torch.Tensor) -> torch.Tensor:
        """``renderer(poses)`` without gradients, in :meth:`_chunks` (bounded memory), one sample count."""
        n_points = self._samples(renderer, poses)
        with torch.no_grad():
            return torch.cat([renderer(poses[part], n_points) for part in self._chunks(renderer, poses.shape[0])])

    def _loss_backward(self, renderer, fixed, mask, poses, centre, update, n_points=None) -> torch.Tensor:
        """The objective (joint penalty less similarity) of each pose of the batch moved by ``update(part)`` ->
        (w, v) of those poses (tensors that lead to the optimiser's leaves), in :meth:`_chunks`: each chunk's
        gradient flows into the leaves before the next is rendered, so only one chunk's samples live at a time.
        ``n_points``: the renderer's samples per ray (:meth:`_samples` of the level's start).
        Returns the losses (B,), detached; the leaves' ``.grad`` hold the gradient of their sum."""
        losses = []
        for part in self._chunks(renderer, poses.shape[0]):
            w, v = update(part)
            current = compose_update(poses[part], centre[part], w, v)
            loss = self.joint_penalty(current) - similarity(fixed, self._moving(renderer(current, n_points)), mask,
                                                            self.highpass)
            total = loss.sum()
            if not total.requires_grad:  # no ray touches any bone: nothing to follow
                total = total + 0.0 * (w.sum() + v.sum())
            total.backward()
            losses.append(loss.detach())
        return torch.cat(losses)

    def _moving(self, rendered: torch.Tensor) -> torch.Tensor:
        """Rendered bones (B, K, h, w) -> the image compared with the frame (B, 1, h, w)."""
        total = rendered.sum(1, keepdim=True)
        if self.target_space:
            return 1.0 - torch.exp(-total / TARGET_LI_SCALE)
        return total

    def score(self, fixed_levels, poses: torch.Tensor, level: int) -> torch.Tensor:
        with torch.no_grad():
            fixed, mask = fixed_levels[level]
            return similarity(fixed, self._moving(self._render(self.levels[level], poses)), mask, self.highpass)

    # -- automatic start --
    def auto_start(self, fixed_levels, default: dict[str, np.ndarray]) -> torch.Tensor:
        """From a rough default pose: for each bone a grid over rotations and depths, each placed in-plane by
        normalised cross-correlation of its coarse DRR with the frame; the tibia also near each femur
        candidate. Returns the joint candidates (B, K, 4, 4); :meth:`refine` keeps the best."""
        s = self.settings
        renderer = self.levels[0]
        fixed, mask = fixed_levels[0]
        g = renderer.geometry
        beam = torch.as_tensor(g.beam_direction_world, dtype=torch.float32, device=self.device)
        start = self._stack(default)  # (1, K, 4, 4)
        a = s.auto_rotation_grid_deg
        angles = [(rx, ry, rz) for rx in (-a, 0.0, a) for ry in (-a, 0.0, a) for rz in (-a, -a / 2, 0.0, a / 2, a)]
        w_grid = torch.tensor(np.radians(angles), dtype=torch.float32, device=self.device)  # (R, 3) world axes

        def search(k, around, max_shift_px=None, keep=s.auto_candidates):
            """Best poses of bone k over the rotation x depth grid about ``around`` (4x4), each placed in-plane
            by NCC (shifts up to ``max_shift_px`` from where ``around`` projects, when given)."""
            cands = []
            c_k = (around[:3, :3] @ torch.as_tensor(self.centroids_bone[self.names[k]], dtype=torch.float32,
                                                    device=self.device) + around[:3, 3])
            for depth in s.auto_depth_offsets_mm:
                n = len(w_grid)
                base = around[None, None].expand(n, 1, 4, 4)
                v = (beam * depth).expand(n, 1, 3)
                poses_k = compose_update(base, c_k.expand(n, 1, 3), w_grid[:, None], v)
                with torch.no_grad():
                    drr = self._moving(self._render_single(renderer, k, poses_k))  # (R, 1, h, w)
                scores, shifts = _ncc_search(fixed, mask, drr, max_shift_px)
                for r in range(n):
                    cands.append((float(scores[r]), poses_k[r, 0], shifts[r]))
            cands.sort(key=lambda c: -c[0])
            return [_shift_in_plane(pose, dx, dy, g, self.device) for _, pose, (dy, dx) in cands[:keep]]

        first = search(0, start[0, 0])
        if len(self.names) == 1:
            return torch.stack(first)[:, None]
        # The tibia: searched over the whole frame around its own default (its template can lock onto the
        # femur's shaft or the other leg), and near where the knee as segmented (the joint) puts it relative to
        # each femur candidate -- without a joint, where the defaults' femur-to-tibia offset puts it (only right
        # when the defaults form a knee: default_pose places every bone on the principal ray). With a joint,
        # every tibia candidate also comes slid along its ray to its femur's joint depth (single-view depth is
        # the weak one). All pairings are refined; the best similarity less the joint penalty wins.
        anywhere = search(1, start[0, 1])
        joint = [torch.stack([f, t]) for f, t in zip(first, anywhere)]
        if self.joint is not None:  # each pair again with the tibia at the femur's joint depth
            joint += [torch.stack([f, self._tibia_at_joint_depth(f, t)]) for f, t in zip(first, anywhere)]
            relative = self._tibia_in_femur
        else:
            relative = torch.linalg.inv(start[0, 0]) @ start[0, 1]
        source = g.source_position_world
        for femur_pose in first:
            predicted = femur_pose @ relative
            # detector pixels per mm at the predicted tibia's depth (magnification)
            centre = predicted[:3, :3].cpu().numpy() @ self.centroids_bone[self.names[1]] + predicted[:3, 3].cpu().numpy()
            depth_mm = float(np.dot(centre - source, g.beam_direction_world))
            window_px = s.auto_joint_window_mm * g.source_to_detector_mm / (depth_mm * g.pixel_spacing_mm[0])
            tibia = search(1, predicted, window_px, keep=1)[0]
            if self.joint is not None:
                tibia = self._tibia_at_joint_depth(femur_pose, tibia)
            joint.append(torch.stack([femur_pose, tibia]))
        return torch.stack(joint)  # (n_c, K, 4, 4)

    def flexed_tibia(self, fixed_levels, femur_pose: torch.Tensor, level: int = 1) -> torch.Tensor:
        """The tibia (4x4) where the knee as scanned, flexed about its flexion axis, puts it under ``femur_pose``:
        flexion angles every auto_flexion_step_deg within +-auto_flexion_range_deg (the axis' sign is free); the
        one whose pair with the femur scores best on ``level`` (similarity less the joint penalty)."""
        s = self.settings
        angles = np.arange(-s.auto_flexion_range_deg, s.auto_flexion_range_deg + 1e-6, s.auto_flexion_step_deg)
        centre = self._joint_centres[0]
        turns = torch.zeros(len(angles), 4, 4, device=self.device)
        turns[:, :3, :3] = rotation_from_axis_angle(torch.as_tensor(np.radians(angles), dtype=torch.float32,
                                                                    device=self.device)[:, None] * self._flexion_axis)
        turns[:, :3, 3] = centre - turns[:, :3, :3] @ centre
        turns[:, 3, 3] = 1.0
        tibias = femur_pose[None] @ turns @ self._tibia_in_femur  # (A, 4, 4): about the joint centre, in the femur frame
        pairs = torch.stack([femur_pose[None].expand_as(tibias), tibias], 1)
        level = min(level, len(self.levels) - 1)
        with torch.no_grad():
            scores = self.score(fixed_levels, pairs, level) - self.joint_penalty(pairs)
        return tibias[int(torch.argmax(scores))]

    def _knee_completion(self, fixed_levels, best: torch.Tensor, sim: float, n_it: int, conv: bool, iterations):
        """After the automatic start: the tibia the knee as scanned puts under the chosen femur at the flexion
        that explains the frame best (:meth:`flexed_tibia`). When it lies apart from the chosen tibia, the pair
        (chosen femur, that tibia) is refined through every level and kept when it scores better (similarity
        less the joint penalty, finest level). The automatic start's tibia search is the tibia's own template
        over the frame: it can lock onto the other leg, while the femur, the larger bone, is found."""
        s = self.settings
        if self.joint is None or len(self.names) != 2:
            return best, sim, n_it, conv
        tibia = self.flexed_tibia(fixed_levels, best[0, 0])
        chosen = best[0, 1]
        a, b = chosen.cpu().double().numpy(), tibia.cpu().double().numpy()
        c = self.centroids_bone[self.names[1]]
        apart_mm = float(np.linalg.norm((a[:3, :3] - b[:3, :3]) @ c + a[:3, 3] - b[:3, 3]))
        apart_deg = _rotation_deg(a, b)
        if apart_mm < s.auto_flexion_apart_mm and apart_deg < s.auto_flexion_apart_deg:
            return best, sim, n_it, conv
        other, other_sim, other_it, other_conv = self.refine(fixed_levels, torch.stack([best[0, 0], tibia])[None],
                                                             iterations)
        finest = len(self.levels) - 1
        both = torch.cat([best, other])
        with torch.no_grad():
            gain = self.score(fixed_levels, both, finest) - self.joint_penalty(both)
        if _DEBUG:
            print(f"  knee completion: tibia {apart_mm:.1f} mm / {apart_deg:.1f} deg apart; "
                  f"scores {float(gain[0]):.4f} (chosen) vs {float(gain[1]):.4f}")
        if float(gain[1]) > float(gain[0]):
            return other, other_sim, n_it + other_it, other_conv
        return best, sim, n_it + other_it, conv

    def _tibia_at_joint_depth(self, femur_pose: torch.Tensor, tibia_pose: torch.Tensor) -> torch.Tensor:
        """The tibia slid along the ray through its joint centre to the femur's joint centre's depth: its
        outline keeps its place in the image, only its size changes (4x4 tensors)."""
        jf = femur_pose[:3, :3] @ self._joint_centres[0] + femur_pose[:3, 3]
        jt = tibia_pose[:3, :3] @ self._joint_centres[1] + tibia_pose[:3, 3]
        source = torch.as_tensor(self.geometry.source_position_world, dtype=torch.float32, device=self.device)
        scale = ((jf - source) @ self._beam) / ((jt - source) @ self._beam)
        out = tibia_pose.clone()
        out[:3, 3] += (jt - source) * (scale - 1.0)
        return out

    def _render_single(self, renderer: TwoBoneRenderer, k: int, poses_k: torch.Tensor) -> torch.Tensor:
        """Render bone k alone: poses_k (B, 1, 4, 4) -> (B, 1, h, w)."""
        far = torch.eye(4, device=self.device).expand(poses_k.shape[0], len(self.names), 4, 4).clone()
        far[:, :, 2, 3] = 1e6  # other bones far behind the source: outside every ray
        far[:, k] = poses_k[:, 0]
        return self._render(renderer, far)[:, k:k + 1]

    # -- one frame --
    def _frame_levels(self, frame_image: np.ndarray, fov: np.ndarray, polarity: str):
        """Set the similarity's mode for this frame's polarity and return its image pyramid."""
        self.highpass = self.settings.xray_highpass_fraction if polarity == "xray" else 0.0
        self.target_space = polarity == "translated" and self.settings.translated_space == "target"
        if self.target_space:  # the prepared image is S / scale inside the field: back to 1 - exp(-S / scale)
            frame_image = 1.0 - np.exp(-np.asarray(frame_image, np.float32))
        return self.fixed_levels(frame_image, fov)

    def thin_lines_px(self, frame_shape) -> tuple[float, float] | None:
        """(widest curve, smallest piece) of ``raw_thin_line_*`` in the pixels of a frame of ``frame_shape``
        (its pixels span the calibrated detector), for :func:`prepare_frame_and_translation`; None when off."""
        s = self.settings
        if s.raw_thin_line_width_mm <= 0:
            return None
        pixel_mm = self.geometry.pixel_spacing_mm[0] * self.geometry.width / float(frame_shape[-1])
        return s.raw_thin_line_width_mm / pixel_mm, s.raw_thin_line_min_area_mm2 / pixel_mm ** 2

    def prepare(self, frame: np.ndarray, translated: np.ndarray | None, polarity: str = "auto"):
        """:func:`prepare_frame_and_translation` with this registrar's wire settings (:meth:`thin_lines_px`)."""
        return prepare_frame_and_translation(frame, translated, polarity, self.thin_lines_px(np.shape(frame)))

    def similarities_at(self, frame_image: np.ndarray, fov: np.ndarray, poses: list[dict[str, np.ndarray]],
                        polarity: str = "drr") -> list[float]:
        """The objective at each of several poses on the finest level (as :meth:`register_frame` scores them):
        one image pyramid, one batched render."""
        fl = self._frame_levels(frame_image, fov, polarity)
        stacked = torch.as_tensor(np.stack([np.stack([p[n] for n in self.names]) for p in poses]),
                                  dtype=torch.float32, device=self.device)
        return [float(v) for v in self.score(fl, stacked, len(self.levels) - 1)]

    def similarity_at(self, frame_image: np.ndarray, fov: np.ndarray, poses: dict[str, np.ndarray],
                      polarity: str = "drr") -> float:
        return self.similarities_at(frame_image, fov, [poses], polarity)[0]

    @_reusing_cpu_buffers
    def register_frame(self, frame_image: np.ndarray, fov: np.ndarray, start: dict[str, np.ndarray],
                       auto: bool, tracking: bool, polarity: str = "drr") -> tuple[dict[str, np.ndarray], float, int, bool]:
        """``polarity`` of the prepared image's source: "drr", "xray" (raw fluoroscopy: high-passed global NCC
        against soft tissue) or "translated"."""
        fl = self._frame_levels(frame_image, fov, polarity)
        s = self.settings
        if auto:
            candidates = self.auto_start(fl, start)
            iters = s.start_iterations
        else:
            candidates = self._stack(start)
            iters = s.track_iterations if tracking else s.start_iterations
        best, sim, n_it, conv = self.refine(fl, candidates, iters, tracking=tracking and not auto,
                                            kept_per_level=s.auto_candidates_kept_per_level if auto else None)
        if auto and s.auto_flexion_search:
            best, sim, n_it, conv = self._knee_completion(fl, best, sim, n_it, conv, iters)
        if polarity == "xray" and s.outlier_rounds > 0:
            best, extra = self.reweighted_refine(fl, best, s.outlier_rounds)
            n_it += extra
            sim = float(self.score(fl, best, len(self.levels) - 1)[0])  # the plain objective: comparable
        return self._unstack(best), sim, n_it, conv

    def polish_frame(self, frame_image: np.ndarray, fov: np.ndarray, start: dict[str, np.ndarray],
                     polarity: str) -> dict[str, np.ndarray]:
        """The raw-frame polish's refinement (see ``polish_levels``): on a raw fluoroscopy frame ("xray"),
        ``polish_rounds`` rounds of :meth:`reweighted_refine` on the finest level ("weighted": after a tracking
        refinement over every level, each weighted by :func:`outlier_weights` at ``start``); else (or with "all")
        the tracking registration of :meth:`register_frame`."""
        s = self.settings
        if s.polish_levels not in ("finest", "weighted", "all"):
            raise InputError("settings", f"polish_levels must be 'finest', 'weighted' or 'all', not {s.polish_levels!r}")
        if s.polish_levels != "all" and polarity == "xray" and s.polish_rounds > 0:
            levels = self._frame_levels(frame_image, fov, polarity)
            poses = self._stack(start)
            if s.polish_levels == "weighted":
                with torch.no_grad():
                    weighted = [(fixed, mask * outlier_weights(fixed, self._moving(self._render(renderer, poses)), mask,
                                                               self.highpass, s.outlier_scale))
                                for renderer, (fixed, mask) in zip(self.levels, levels)]
                poses, *_ = self.refine(weighted, poses, s.track_iterations, tracking=True)
            best, _ = self.reweighted_refine(levels, poses, s.polish_rounds)
            return self._unstack(best)
        return self.register_frame(frame_image, fov, start, False, True, polarity)[0]

    def reweighted_refine(self, fixed_levels, poses: torch.Tensor, rounds: int) -> tuple[torch.Tensor, int]:
        """``rounds`` x (:func:`outlier_weights` at the current pose, then a tracking-sized refinement of the
        finest level under those weights). poses (1, K, 4, 4) -> (poses, evaluations)."""
        s = self.settings
        finest = len(self.levels) - 1
        fixed, mask = fixed_levels[finest]
        weighted = list(fixed_levels)
        evaluations = 0
        for _ in range(rounds):
            with torch.no_grad():
                weights = outlier_weights(fixed, self._moving(self._render(self.levels[finest], poses)), mask,
                                          self.highpass, s.outlier_scale)
            weighted[finest] = (fixed, mask * weights)
            poses, _, n, _ = self.refine(weighted, poses, s.track_iterations, levels=(finest,), tracking=True)
            evaluations += n
        return poses, evaluations

    def restart_out_of_plane(self, frame_image: np.ndarray, fov: np.ndarray, poses: dict[str, np.ndarray],
                             polarity: str) -> tuple[dict[str, np.ndarray], float, float, int]:
        """Restarts from ``poses`` turned by ``restart_rotation_deg`` about each detector axis (every bone about
        its own centre, all bones together: each restart lets every bone re-settle). Returns (poses, similarity
        before, similarity after, evaluations); ``poses`` unchanged unless a restart explains the frame clearly
        better (dissimilarity below ``1 - restart_min_gain`` times the pose's own, on the finest level)."""
        s = self.settings
        fl = self._frame_levels(frame_image, fov, polarity)
        finest = len(self.levels) - 1
        start = self._stack(poses)
        before = float(self.score(fl, start, finest)[0])
        if s.restart_rotation_deg <= 0:
            return poses, before, before, 0
        axes = torch.as_tensor(self.geometry.world_from_source[:3, :2].T.copy(), dtype=torch.float32,
                               device=self.device)  # the detector's two in-plane directions, world
        turn = math.radians(s.restart_rotation_deg)
        w = torch.stack([sign * turn * axis for axis in axes for sign in (-1.0, 1.0)])  # (4, 3)
        n_starts, n_bones = len(w), start.shape[1]
        centres = self._centres(start).expand(n_starts, n_bones, 3)
        candidates = compose_update(start.expand(n_starts, n_bones, 4, 4), centres,
                                    w[:, None].expand(n_starts, n_bones, 3), torch.zeros_like(centres))
        best, after, evaluations, _ = self.refine(fl, candidates, s.track_iterations, tracking=True)
        if polarity == "xray" and s.outlier_rounds > 0 and (1 - after) < (1 - s.restart_min_gain) * (1 - before):
            best, extra = self.reweighted_refine(fl, best, s.outlier_rounds)
            evaluations += extra
            after = float(self.score(fl, best, finest)[0])
        if (1 - after) < (1 - s.restart_min_gain) * (1 - before):
            return self._unstack(best), before, after, evaluations
        return poses, before, after, evaluations


def polish_dissimilarity_ratios(registrar: Registrar, translated_prepared: tuple, poses: dict[str, np.ndarray],
                                polished: dict[str, np.ndarray]) -> dict[str, float]:
    """How much worse the translated frame explains each bone's polish: per bone, the translated frame's
    dissimilarity (1 - similarity) with that bone polished and the others where the translated frame put them,
    over its dissimilarity at ``poses``; ``"all"``: every bone polished. One batched render."""
    t_image, t_fov, t_info = translated_prepared
    candidates = [poses, polished] + [{**poses, n: polished[n]} for n in registrar.names]
    d = [1.0 - v for v in registrar.similarities_at(t_image, t_fov, candidates, t_info["polarity"])]
    base = max(d[0], 1e-6)
    return {"all": d[1] / base, **{n: d[2 + i] / base for i, n in enumerate(registrar.names)}}


def polish_on_raw_frame(registrar: Registrar, raw_prepared: tuple, poses: dict[str, np.ndarray],
                        translated_prepared: tuple | None = None) -> dict[str, np.ndarray]:
    """Last refinement on the raw frame (its own polarity, high-passed) from a pose found on the translated one.

    The translated image gives the wide basin (it looks like a DRR), the raw frame the exact edges (the
    networks soften and slightly reshape them): measured in Testing/benchmarks/bench_capture_range.py.
    Tracking-sized search regions, so the pose stays in the basin the translated frame chose; on a raw
    fluoroscopy frame only the finest level, re-weighted from the start (:meth:`Registrar.polish_frame`), so a
    wire or a sensor on a bone's edge is weighed down before it can pull the edge onto itself.
    ``raw_prepared``: :func:`prepare_frame` of the raw frame. With ``translated_prepared`` (the translated
    frame, prepared) the polish is kept only when the translated frame still agrees with it: a raw frame
    whose wires, saturation or soft tissue pull the pose away (its dissimilarity on the translated frame
    grows more than ``polish_max_dissimilarity_ratio`` times; legitimate polishes measured 0.99-1.46x, a
    runaway one 5.2x) leaves the translated pose as it was. :func:`raw_polish` also says why it dropped one.
    """
    return raw_polish(registrar, raw_prepared, poses, translated_prepared)[0]


def raw_polish(registrar: Registrar, raw_prepared: tuple, poses: dict[str, np.ndarray],
               translated_prepared: tuple | None = None) -> tuple[dict[str, np.ndarray], str]:
    """:func:`polish_on_raw_frame`, and a note for the frame's quality: "" when the polish was kept, else why
    the translated pose was kept as it was.

    Not polished at all: a raw frame that scores below zero at the translated pose. Its polarity is read the
    wrong way round (a one-frame registration decides it from that frame alone, and a frame whose leg fills
    the field reads as a DRR): on seed 22's 60-deg frame the true pose scored -0.175 so, and the polish ran
    the femur 14.5 mm and the tibia 20.4 mm off, its dissimilarity on the translated frame 1.96-2.00x, just
    under the veto (Testing/benchmarks/results/capture_range_sequence_scenes_2026-12-06.md). With the right
    polarity the raw frame scores clearly above zero wherever the translated pose is near the bones.
    """
    image, fov, info = raw_prepared
    if translated_prepared is not None:
        at_start = registrar.similarity_at(image, fov, poses, info["polarity"])
        if at_start < 0.0:
            return poses, (f"raw-frame polish skipped: the raw frame scores {at_start:.3f} at the translated pose "
                           f"(its polarity '{info['polarity']}' looks inverted)")
    result = registrar.polish_frame(image, fov, poses, info["polarity"])
    if translated_prepared is not None:
        t_image, t_fov, t_info = translated_prepared
        before, after = (1.0 - v for v in registrar.similarities_at(t_image, t_fov, [poses, result], t_info["polarity"]))
        ratio = after / max(before, 1e-6)
        if ratio > registrar.settings.polish_max_dissimilarity_ratio:
            return poses, (f"raw-frame polish dropped: the translated frame disagrees with it (dissimilarity "
                           f"{ratio:.2f}x, limit {registrar.settings.polish_max_dissimilarity_ratio:g}x)")
    return result, ""


def _ncc_search(fixed: torch.Tensor, mask: torch.Tensor, templates: torch.Tensor, max_shift_px: float | None = None):
    """Best normalised cross-correlation of each template (cropped to its support) over in-plane shifts.

    fixed (1, 1, H, W); templates (R, 1, H, W). Returns scores (R,) and (dy, dx) pixel shifts that move the
    template onto the frame.
    """
    fixed = fixed * mask
    R = templates.shape[0]
    support = templates.sum(0)[0] > 1e-3 * templates.max()
    if not support.any():
        return torch.full((R,), -1.0), [(0, 0)] * R
    rows = torch.nonzero(support.any(1)).squeeze(-1)
    cols = torch.nonzero(support.any(0)).squeeze(-1)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    tmpl = templates[:, :, r0:r1, c0:c1]
    th, tw = tmpl.shape[-2:]
    tmpl = tmpl - tmpl.mean(dim=(-1, -2), keepdim=True)
    tmpl = tmpl / (tmpl.flatten(1).norm(dim=1).view(R, 1, 1, 1) + 1e-8)
    pad_y, pad_x = th // 2, tw // 2
    padded = F.pad(fixed, (pad_x, pad_x, pad_y, pad_y))
    num = F.conv2d(padded, tmpl)  # (1, R, oh, ow)
    ones = torch.ones(1, 1, th, tw, device=fixed.device)
    local_sum = F.conv2d(padded, ones)
    local_sq = F.conv2d(padded ** 2, ones)
    local_var = (local_sq - local_sum ** 2 / (th * tw)).clamp_min(1e-8)
    score = num / local_var.sqrt()
    if max_shift_px is not None:
        oh, ow_ = score.shape[-2:]
        dy = torch.arange(oh, device=score.device) - pad_y - r0
        dx = torch.arange(ow_, device=score.device) - pad_x - c0
        far = (dy[:, None] ** 2 + dx[None, :] ** 2) > max_shift_px ** 2
        score = score.masked_fill(far, -1e9)
    flat = score[0].flatten(1)
    best, idx = flat.max(dim=1)
    ow = score.shape[-1]
    shifts = []
    for i in idx.tolist():
        y, x = divmod(i, ow)
        # output (y, x) places the template's top-left at padded (y, x) = frame (y - pad_y, x - pad_x)
        shifts.append((y - pad_y - r0, x - pad_x - c0))
    return best, shifts


def _shift_in_plane(pose: torch.Tensor, dx_px: float, dy_px: float, g: CArmGeometry, device) -> torch.Tensor:
    """Move a bone so that its projection moves by (dx, dy) pixels, keeping its depth."""
    p = pose.detach().cpu().double().numpy()
    centre = p[:3, 3]
    col_row = g.project(centre[None])[0]
    target_px = col_row + np.array([dx_px, dy_px])
    ray_end = g.pixel_to_world(target_px[None])[0]
    src = g.source_position_world
    depth = np.dot(centre - src, g.beam_direction_world)
    ray = ray_end - src
    new_centre = src + ray * depth / np.dot(ray, g.beam_direction_world)
    out = p.copy()
    out[:3, 3] += new_centre - centre
    return torch.as_tensor(out, dtype=torch.float32, device=device)


# ---- default pose ---------------------------------------------------------------------------------
def default_pose(geometry: CArmGeometry, bone: BoneModel, bone_from_view: np.ndarray | None = None) -> np.ndarray:
    """A bone's centroid on the principal ray at the nominal patient distance, oriented by ``bone_from_view``
    (default: the bone frame's axes aligned with a lateral view)."""
    from .phantom import SOURCE_FROM_LATERAL_VIEW

    depth = geometry.source_to_patient_mm or 0.85 * geometry.source_to_detector_mm
    rot = SOURCE_FROM_LATERAL_VIEW if bone_from_view is None else np.linalg.inv(bone_from_view)
    pose = geometry.world_from_source @ rot
    c_world = apply_transform(pose, bone.centroid_mm[None])[0]
    target = geometry.source_position_world + geometry.beam_direction_world * depth
    pose = pose.copy()
    pose[:3, 3] += target - c_world
    return pose


# ---- sequences ----------------------------------------------------------------------------------
def _extrapolate(prev: np.ndarray, prev2: np.ndarray | None, centroid_bone: np.ndarray,
                 geometry: CArmGeometry) -> np.ndarray:
    """Constant-velocity prediction, except along the beam: single-plane depth estimates are the noisiest
    component, and extrapolating their noise compounds it, so the predicted depth is the previous one."""
    if prev2 is None:
        return prev
    delta = prev @ np.linalg.inv(prev2)
    out = delta @ prev
    u, _, vt = np.linalg.svd(out[:3, :3])
    out[:3, :3] = u @ vt
    beam = geometry.beam_direction_world
    c_prev = apply_transform(prev, centroid_bone[None])[0]
    c_new = apply_transform(out, centroid_bone[None])[0]
    out[:3, 3] -= np.dot(c_new - c_prev, beam) * beam
    return out


@_reusing_cpu_buffers
def register_sequence(frames: np.ndarray, geometry: CArmGeometry, bones: dict[str, BoneModel],
                      init_poses: dict[str, np.ndarray] | None = None, translation: str = "none",
                      device: str = "auto", settings: RegistrationSettings | None = None, progress=None,
                      should_stop=None, polarity: str = "auto", start_frame: int = 0,
                      previous: dict[str, np.ndarray] | None = None, registrar: Registrar | None = None,
                      on_frame=None, default_poses: dict[str, np.ndarray] | None = None,
                      previous_quality: list[dict] | None = None,
                      translated_frames: np.ndarray | None = None) -> SequenceResult:
    """Register every frame. ``init_poses``: name -> (1, 4, 4) (first frame) or (N, 4, 4) (every frame);
    without it the first frame (and any lost frame) gets the automatic start from :func:`default_pose`.

    ``default_poses`` (name -> 4x4): a rough pose the automatic start searches around (default: each bone
    on the principal ray at the nominal patient distance, in a lateral view).
    ``previous``/``previous_quality``: poses and quality of the frames before ``start_frame`` (resume, or a
    caller stepping one frame at a time): tracking and the lost-track test continue from them.
    ``translated_frames``: frames already translated (aligned with ``frames``) so that a caller stepping
    frame by frame translates each frame once.
    ``progress(done, total, FrameResult)`` after each frame; ``should_stop()`` is checked between frames
    (finished frames are returned); ``on_frame(FrameResult)`` lets callers write results frame by frame.
    Tracking only looks forward: the second pass over weak frames (:func:`iter_revisit_weak_frames`) is run by
    the callers after the last frame (``pipeline.run_registration``, ``mrml_adapter.SequenceRegistrationJob``).
    """
    from .frames_io import as_frame_stack

    frames = as_frame_stack(frames, dtype=np.float32)
    n = len(frames)
    if (frames.shape[2], frames.shape[1]) != tuple(geometry.image_size):
        raise InputError("frames", f"frame size {frames.shape[2]}x{frames.shape[1]} disagrees with the calibration's "
                                   f"{geometry.width}x{geometry.height}")
    bad = [i for i in range(n) if not np.all(np.isfinite(frames[i]))]
    if bad:
        raise InputError("frames", f"frame {bad[0]} contains NaN or infinite values")
    settings = settings or RegistrationSettings()
    polarity = sequence_polarity(frames, polarity)  # callers that step frame by frame pass it resolved
    registrar = registrar or Registrar(geometry, bones, settings, device)
    names = registrar.names
    translated = None
    if translating(translation):
        if translated_frames is not None:
            translated = np.asarray(translated_frames, dtype=np.float32)
        else:
            from .translation.inference import Translator

            translated = np.zeros_like(frames)
            translated[start_frame:] = Translator.for_option(translation, device).translate(frames[start_frame:])

    per_frame_init = None
    first_init = None
    if init_poses is not None:
        arrays = {k: np.asarray(v, dtype=float).reshape(-1, 4, 4) for k, v in init_poses.items() if k in names}
        if any(len(a) not in (1, n) for a in arrays.values()):
            raise InputError("init poses", f"need 1 row or {n} rows (one per frame)")
        if arrays and all(len(a) == n and n > 1 for a in arrays.values()):
            per_frame_init = arrays
        elif arrays:
            first_init = {k: a[0] for k, a in arrays.items()}
    defaults = {name: (np.asarray(default_poses[name], float) if default_poses and name in default_poses
                       else default_pose(geometry, bones[name])) for name in names}

    poses = {name: np.full((n, 4, 4), np.nan) for name in names}
    if previous is not None:
        for name in names:
            poses[name][:start_frame] = previous[name][:start_frame]
    quality: list[dict] = []
    sims: list[float] = [float(q["similarity"]) for q in (previous_quality or [])
                         if not q.get("failed", False)][-5:]
    # tracking continues from good frames only: a failed frame never seeds the next one
    good = np.zeros(n, dtype=bool)
    for k in range(start_frame):
        good[k] = all(np.all(np.isfinite(poses[nm][k])) for nm in names)
    for q in previous_quality or []:
        if q.get("failed", False) and 0 <= int(q["frame"]) < start_frame:
            good[int(q["frame"])] = False
    track_start = 0
    for i in range(start_frame, n):
        if should_stop is not None and should_stop():
            break
        t0 = time.time()
        raw_prepared, (image, fov, frame_info) = registrar.prepare(
            frames[i], None if translated is None else translated[i], polarity)
        last_good = int(np.flatnonzero(good[:i])[-1]) if good[:i].any() else None
        reinit = reacquired = False
        note = ""
        if per_frame_init is not None:
            start = {nm: per_frame_init[nm][i] for nm in names}
            auto, tracking = False, False
        elif last_good is not None:
            # constant velocity from the last two good frames when they are consecutive, else the last good pose
            prev2 = last_good - 1 if last_good > max(0, track_start) and good[last_good - 1] else None
            start = {nm: _extrapolate(poses[nm][last_good], None if prev2 is None else poses[nm][prev2],
                                      bones[nm].centroid_mm, geometry) for nm in names}
            auto, tracking = False, True
        elif first_init is not None and i == start_frame:
            start = {nm: first_init.get(nm, defaults[nm]) for nm in names}
            auto, tracking = not all(nm in first_init for nm in names), False
        else:
            start = defaults
            auto, tracking = True, False
        result, sim, iters, conv = registrar.register_frame(image, fov, start, auto, tracking, frame_info["polarity"])
        if tracking:
            ref = float(np.median(sims[-5:])) if sims else sim

            def lost(sim_value, pose):
                jump_mm = max(np.linalg.norm(pose[nm][:3, 3] - poses[nm][last_good][:3, 3]) for nm in names)
                jump_deg = max(_rotation_deg(pose[nm], poses[nm][last_good]) for nm in names)
                bad = (1 - sim_value) > settings.lost_dissimilarity_ratio * (1 - ref) + settings.lost_dissimilarity_margin
                return bad or jump_mm > settings.max_jump_mm or jump_deg > settings.max_jump_deg, jump_mm, jump_deg

            is_lost, jump_mm, jump_deg = lost(sim, result)
            still_lost = False
            if is_lost:
                note = f"lost track (similarity {sim:.3f} vs {ref:.3f}, jump {jump_mm:.1f} mm {jump_deg:.1f} deg)"
                reinit = True
                tracked_dissimilarity = 1 - sim
                # first the wide first-frame search from the prediction, then the automatic start
                for auto_again in (False, True):
                    r2, s2, it2, c2 = registrar.register_frame(image, fov, start, auto_again, False,
                                                               frame_info["polarity"])
                    iters += it2
                    if s2 > sim:
                        result, sim, conv = r2, s2, c2
                    if not lost(sim, result)[0]:
                        break
                    # re-acquired: the search found a pose that explains the frame clearly better than the
                    # track did (its start was wrong, not this frame): follow the new pose from here on. "Clearly":
                    # far better than the track explained its recent frames, or clearly better than the track's
                    # own pose explains this frame and no worse than the track explained its recent frames
                    if (1 - sim) < settings.reacquire_dissimilarity_ratio * (1 - ref) or (
                            (1 - sim) <= (1 - ref)
                            and (1 - sim) < settings.reacquire_same_frame_ratio * tracked_dissimilarity):
                        note += f"; re-acquired (similarity {sim:.3f} vs {ref:.3f}): earlier frames may be wrong"
                        reacquired = True
                        sims.clear()
                        track_start = i  # no velocity across the re-acquisition
                        break
                else:
                    still_lost = True
        failed = bool(sim < settings.min_similarity or (tracking and still_lost))
        restarted = None
        if not failed and settings.restart_rotation_deg > 0 and frame_info["polarity"] != "drr":
            restarted, before, after, it3 = registrar.restart_out_of_plane(image, fov, result, frame_info["polarity"])
            iters += it3
            restart_note = f"out-of-plane restart (dissimilarity {1 - before:.4f} -> {1 - after:.4f})"
            if restarted is result:
                restarted = None
        if translated is not None and not failed and settings.polish_on_raw_frame:
            result, polish_note = raw_polish(registrar, raw_prepared, result, (image, fov, frame_info))
            if restarted is not None:
                # the translated frame alone can prefer a wrong turn (its optimum is biased by a few degrees where
                # the networks reshape an edge): the restart is kept only when it also explains the raw frame better
                polished, restart_polish_note = raw_polish(registrar, raw_prepared, restarted, (image, fov, frame_info))
                raw_image, raw_fov, raw_info = raw_prepared
                raw_old, raw_new = registrar.similarities_at(raw_image, raw_fov, [result, polished], raw_info["polarity"])
                if raw_new > raw_old:
                    result, sim, polish_note = polished, after, restart_polish_note
                    note = "; ".join(filter(None, (note, restart_note, f"raw frame {raw_old:.4f} -> {raw_new:.4f}")))
            note = "; ".join(filter(None, (note, polish_note)))
        elif restarted is not None:
            result, sim = restarted, after
            note = "; ".join(filter(None, (note, restart_note)))
        for nm in names:
            poses[nm][i] = result[nm]
        good[i] = not failed
        if not failed:
            sims.append(sim)
        fr = FrameResult(i, {nm: result[nm] for nm in names}, sim, iters, bool(conv and sim >= settings.min_similarity),
                         reinit, time.time() - t0, note, failed, reacquired)
        quality.append(fr.quality())
        if on_frame is not None:
            on_frame(fr)
        if progress is not None:
            progress(i + 1, n, fr)
    return SequenceResult(poses=poses, quality=quality)


def weak_frames(quality: list[dict], ratio: float, margin: float = 0.01) -> tuple[list[int], float]:
    """Frames that failed or whose dissimilarity (1 - similarity) exceeds ``ratio`` x the good frames' median
    plus ``margin``; and that threshold."""
    good = [1.0 - float(q["similarity"]) for q in quality
            if not q.get("failed", False) and np.isfinite(float(q.get("similarity", np.nan)))]
    threshold = ratio * float(np.median(good)) + margin if good else 0.0
    weak = [int(q["frame"]) for q in quality
            if q.get("failed", False) or not (1.0 - float(q.get("similarity", np.nan))) <= threshold]
    return weak, threshold


@_reusing_cpu_buffers
def iter_revisit_weak_frames(frames: np.ndarray, poses: dict[str, np.ndarray], quality: list[dict],
                             registrar: Registrar, translated_frames: np.ndarray | None = None,
                             polarity: str = "auto"):
    """Second pass over a registered sequence. First, the frames before each re-acquisition of the track are
    re-tracked backwards from it (:func:`_retrack_before_reacquisitions`). Then weak frames (:func:`weak_frames`)
    are registered again from the poses of their good neighbours, backwards (so a frame 0 that the automatic
    start got wrong is reached from frame 1) then forwards; a new pose is kept when it explains the frame
    better than the old one (higher similarity on the same image) and clears the similarity floor; a failed
    frame stays failed unless the new pose makes it a good frame (dissimilarity within the weak-frame threshold).

    Then a good frame out of line with its neighbours' motion (:func:`off_motion_frames`) is flagged failed.
    A frame still failed after that, between two good frames or next to one at either end, is bridged on the
    raw frame (:func:`_bridge_failed_frames`), which also clears the flag of a frame whose pose it confirms (a
    search from one neighbour landing where the frame already is does not: that neighbour may share the frame's
    error -- measured: seed 22's last frame, 1.1 mm / 3.6 deg off, was "confirmed" so from frame 18 -- and a
    flagged frame that is right only costs a look, a wrong one that is not flagged costs a wrong result), and
    gives a frame it cannot register its neighbours' motion where its own pose is far off that motion.

    Updates ``poses`` (name -> (N, 4, 4)) and ``quality`` (one dict per frame, matched by "frame") in place.
    A generator: yields ``(frame, revised)`` after each frame it tries, so a GUI can drive it in slices.
    """
    settings = registrar.settings
    names = registrar.names
    polarity = sequence_polarity(frames, polarity)
    by_frame = {int(q["frame"]): q for q in quality}
    yield from _retrack_before_reacquisitions(frames, poses, by_frame, registrar, translated_frames, polarity)
    weak_list, threshold = weak_frames(quality, settings.revisit_dissimilarity_ratio, settings.lost_dissimilarity_margin)
    weak = set(weak_list)
    n = len(frames)

    def is_good(j):
        q = by_frame.get(j)
        return q is not None and not q.get("failed", False) and j not in weak \
            and _finite({nm: poses[nm][j] for nm in names})

    for order, neighbour_step in ((range(n - 1, -1, -1), 1), (range(n), -1)):
        for i in order:
            j = i + neighbour_step
            if i not in weak or i not in by_frame or not (0 <= j < n and is_good(j)):
                continue
            t0 = time.time()
            again = _register_from_neighbour(i, j, frames, poses, registrar, translated_frames, polarity)
            if again.revised:
                good_now = (1.0 - again.sim) <= threshold
                # a failed frame stays failed unless its new pose explains it as well as the good frames do: a
                # marginally better pose (seen: 0.815 -> 0.8155) is no reason to trust it, and the bridge below
                # only tries frames still failed
                _record_new_pose(by_frame[i], "; ".join(filter(None, (
                                     f"revisited from frame {j} (similarity {again.old_sim:.3f} -> {again.sim:.3f})",
                                     again.polish_note))),
                                 again.sim, again.iters, again.conv, t0,
                                 failed=bool(by_frame[i].get("failed", False)) and not good_now)
                if good_now:
                    weak.discard(i)  # good now: it can seed its own neighbours
            yield i, again.revised
    # (judged among the frames not failed after the revisits: a frame still weak on its image is a registered
    # pose all the same, and its motion counts -- seed 22 frame 6, 12 deg off, has a weak frame two away)
    off_motion = off_motion_frames(poses, quality, registrar) if settings.flag_off_motion_frames else {}
    for i, what in off_motion.items():
        _add_note(by_frame[i], f"off its neighbours' motion ({what})", failed=True)
    if settings.bridge_failed_frames:
        yield from _bridge_failed_frames(frames, poses, by_frame, registrar, translated_frames, polarity, is_good,
                                         set(off_motion))


def _retrack_before_reacquisitions(frames, poses, by_frame, registrar: Registrar, translated_frames, polarity):
    """Tracking re-acquired at frame r (its recovery explained the frame clearly better than the track had its
    frames): the track before r may have drifted (seed 24: the tibia turned 12-28 deg over frames 5-7, each frame
    scoring only a little worse than the one before, so nothing was lost until the jump back at frame 8). Frames
    r-1, r-2, ... are registered again from the pose of the frame after them, backwards, as far as the previous
    re-acquisition; a new pose is kept when it explains its frame better. The walk stops at the first frame whose
    pose is kept or lands where the frame already was: from there back the old track agrees with the new one.
    Yields ``(frame, revised)``."""
    names = registrar.names
    reacquired = sorted(i for i, q in by_frame.items() if q.get("reacquired", False) and not q.get("failed", False))
    for k, r in enumerate(reacquired):
        floor = reacquired[k - 1] if k else -1
        for i in range(r - 1, floor, -1):
            if i not in by_frame or not _finite({nm: poses[nm][i + 1] for nm in names}):
                break
            t0 = time.time()
            again = _register_from_neighbour(i, i + 1, frames, poses, registrar, translated_frames, polarity)
            if again.revised:
                _record_new_pose(by_frame[i], "; ".join(filter(None, (
                                     f"re-tracked back from re-acquired frame {r} (similarity {again.old_sim:.3f} -> "
                                     f"{again.sim:.3f})", again.polish_note))),
                                 again.sim, again.iters, again.conv, t0, failed=bool(by_frame[i].get("failed", False)))
            yield i, again.revised
            if not again.revised or again.agrees:
                break


class _NeighbourRegistration(NamedTuple):
    revised: bool  # the new pose explains the frame better and clears the floor: written into the poses
    agrees: bool  # the new pose (before the polish) lands where the old one was (:func:`_same_place`)
    old_sim: float
    sim: float
    iters: int
    conv: bool
    polish_note: str


def _register_from_neighbour(i: int, j: int, frames, poses, registrar: Registrar, translated_frames,
                             polarity: str) -> _NeighbourRegistration:
    """Frame ``i`` registered again (tracking) from frame ``j``'s pose. When the new pose explains the frame
    better than its old one (on the registered image) and clears the similarity floor, it is polished on the raw
    frame (with translation) and written into ``poses``; the caller records the quality."""
    settings, names = registrar.settings, registrar.names
    raw_prepared, (image, fov, info) = registrar.prepare(
        frames[i], None if translated_frames is None else translated_frames[i], polarity)
    old_pose = {nm: poses[nm][i].copy() for nm in names}
    old_sim = registrar.similarity_at(image, fov, old_pose, info["polarity"]) if _finite(old_pose) else -np.inf
    start = {nm: poses[nm][j] for nm in names}
    result, sim, iters, conv = registrar.register_frame(image, fov, start, False, True, info["polarity"])
    revised = bool(sim > old_sim + 1e-4 and sim >= settings.min_similarity)
    agrees = _same_place(old_pose, result, registrar)
    polish_note = ""
    if revised:
        if translated_frames is not None and settings.polish_on_raw_frame:
            result, polish_note = raw_polish(registrar, raw_prepared, result, (image, fov, info))
        for nm in names:
            poses[nm][i] = result[nm]
    return _NeighbourRegistration(revised, agrees, float(old_sim), float(sim), int(iters), bool(conv), polish_note)


def _off_motion(i: int, poses: dict[str, np.ndarray], registrar: Registrar) -> tuple[float, str]:
    """How far frame ``i``'s pose lies off the interpolation of frames ``i - 1`` and ``i + 1``, in units of the
    settings' off_motion tolerances (the worst bone, the worst of in-plane and rotation), and where, in words."""
    s = registrar.settings
    worst, what = 0.0, ""
    for nm in registrar.names:
        motion = interpolate_pose(poses[nm][i - 1], poses[nm][i + 1], 0.5, registrar.centroids_bone[nm])
        in_plane = _in_plane_mm(motion, poses[nm][i], registrar, nm)
        turned = _rotation_deg(motion, poses[nm][i])
        score = max(in_plane / s.off_motion_in_plane_mm, turned / s.off_motion_rotation_deg)
        if score > worst:
            worst, what = score, f"{nm} {in_plane:.1f} mm across the beam, {turned:.1f} deg"
    return worst, what


def off_motion_frames(poses: dict[str, np.ndarray], quality: list[dict], registrar: Registrar,
                      usable=None) -> dict[int, str]:
    """Frames out of line with their neighbours' motion (``RegistrationSettings.flag_off_motion_frames``):
    frame -> which bone, how far, in words. Only a frame whose two nearest frames on either side are ``usable``
    (default: not failed, finite poses) is judged: each neighbour must itself lie off its own neighbours' motion
    ``off_motion_ratio`` times less than the frame does (a frame next to the sequence's end or a failed frame
    cannot show that the neighbour is the one in line)."""
    names = registrar.names
    if usable is None:
        by_frame = {int(q["frame"]): q for q in quality}

        def usable(j):
            q = by_frame.get(j)
            return q is not None and not q.get("failed", False) and _finite({nm: poses[nm][j] for nm in names})

    n = len(poses[names[0]])
    ok = [usable(j) for j in range(n)]
    off = {i: _off_motion(i, poses, registrar) for i in range(1, n - 1) if ok[i - 1] and ok[i] and ok[i + 1]}
    s = registrar.settings
    return {i: off[i][1] for i in range(2, n - 2)
            if i in off and i - 1 in off and i + 1 in off and off[i][0] > 1.0
            and off[i][0] > s.off_motion_ratio * max(off[i - 1][0], off[i + 1][0])}


def _finite(poses: dict[str, np.ndarray]) -> bool:
    return all(np.all(np.isfinite(p)) for p in poses.values())


def _add_note(q: dict, note: str, **fields) -> None:
    """Append ``note`` to a frame's quality note and update its other ``fields``."""
    q.update(note=f"{q['note']}; {note}" if q.get("note") else note, **fields)


def _record_new_pose(q: dict, note: str, sim: float, iters: int, conv: bool, t0: float, failed: bool = False) -> None:
    """A frame's quality after the second pass gave it a new pose (no longer failed unless ``failed``)."""
    _add_note(q, note, similarity=round(float(sim), 5), iterations=int(q.get("iterations", 0)) + iters,
              converged=bool(conv), failed=bool(failed),
              seconds=round(float(q.get("seconds", 0.0)) + time.time() - t0, 3))


def _motion_start(i: int, poses, registrar: Registrar, good: list[int], is_good, max_gap: int):
    """-> (the neighbours' motion at frame ``i``: name -> 4x4, a phrase saying from which frames, "interpolated"
    or "extrapolated") or None.

    Between the nearest good frames on either side (at most ``max_gap`` apart): their interpolation. At
    either end of the sequence (good frames on one side only), for the frame next to a good frame: that
    frame's constant-velocity extrapolation (from it and the frame beyond it when that one is good too)."""
    names, n = registrar.names, len(poses[registrar.names[0]])
    a = max((j for j in good if j < i), default=None)
    b = min((j for j in good if j > i), default=None)
    if a is not None and b is not None:
        if b - a > max_gap:
            return None
        return ({nm: interpolate_pose(poses[nm][a], poses[nm][b], (i - a) / (b - a), registrar.centroids_bone[nm])
                 for nm in names}, f"between frames {a} and {b}", "interpolated")
    side = a if a is not None else b
    if side is None or abs(i - side) != 1:
        return None
    beyond = side - (i - side)
    prev2 = beyond if 0 <= beyond < n and is_good(beyond) else None
    return ({nm: _extrapolate(poses[nm][side], None if prev2 is None else poses[nm][prev2],
                              registrar.centroids_bone[nm], registrar.geometry) for nm in names},
            f"from frame {side}'s motion", "extrapolated")


def _bridge_failed_frames(frames, poses, by_frame, registrar: Registrar, translated_frames, polarity, is_good,
                          off_motion: set[int] = frozenset()):
    """Frames still failed next to good frames: registered on the raw frame from the neighbours' motion
    (:func:`_motion_start`: interpolated between good frames, or extrapolated at either end); kept when the raw
    frame's similarity rises and the pose stays within ``bridge_in_plane_mm`` / ``bridge_rotation_deg`` of
    the motion (see RegistrationSettings). When it lands within that of the motion and where the frame already
    is (:func:`_same_place`), the frame's pose is confirmed: its "failed" flag is cleared -- for a frame flagged
    only for lying off that motion (``off_motion``), wherever the motion is: the raw frame, started from the
    motion, going back to the frame's pose says the motion changed there (a real jolt), when the motion's pose
    explains the raw frame worse than the frame's own does. Otherwise, with
    ``fill_failed_frames``, each bone whose pose is far off the motion carries the motion's pose (still failed)."""
    settings, names = registrar.settings, registrar.names
    n = len(frames)
    good = [j for j in range(n) if is_good(j)]
    for i in range(n):
        q = by_frame.get(i)
        if q is None or not q.get("failed", False):
            continue
        motion = _motion_start(i, poses, registrar, good, is_good, settings.bridge_max_gap_frames)
        if motion is None:
            continue
        start, where, how = motion
        t0 = time.time()
        raw_prepared, (image, fov, info) = registrar.prepare(
            frames[i], None if translated_frames is None else translated_frames[i], polarity)
        raw_image, raw_fov, raw_info = raw_prepared
        result, new_raw, iters, conv = registrar.register_frame(raw_image, raw_fov, start, False, True,
                                                                raw_info["polarity"])
        old_pose = {nm: poses[nm][i] for nm in names}
        old_raw = registrar.similarity_at(raw_image, raw_fov, old_pose, raw_info["polarity"]) \
            if _finite(old_pose) else -np.inf
        near_motion = _same_place(start, result, registrar, settings.bridge_in_plane_mm, settings.bridge_rotation_deg)
        bridged = bool(new_raw > old_raw + 1e-4 and near_motion)
        if bridged:
            for nm in names:
                poses[nm][i] = result[nm]
            _record_new_pose(q, f"bridged on the raw frame {where} (raw similarity {old_raw:.3f} -> {new_raw:.3f})",
                             registrar.similarity_at(image, fov, result, info["polarity"]),  # on the registered image
                             iters, conv, t0)
        elif (near_motion or (i in off_motion and old_raw > registrar.similarity_at(
                raw_image, raw_fov, start, raw_info["polarity"]))) and _same_place(old_pose, result, registrar):
            # the raw frame, started from the neighbours' motion, lands where the frame already is: its pose is
            # right (a noisy or confused translated frame only lowered its similarity; or, for a frame flagged
            # off the motion whose raw frame the motion's pose explains worse than its own, the motion really
            # changed there. Seed 24 frame 6, its tibia 15 deg off, went back to its pose from the motion too,
            # though the motion's pose explained its raw frame better, 0.99x the dissimilarity: not a jolt)
            _add_note(q, f"confirmed on the raw frame {where}", failed=False)
        elif settings.fill_failed_frames:
            # "far off": for a frame flagged for lying off the motion, as far as flagged it
            far_mm, far_deg = ((settings.off_motion_in_plane_mm, settings.off_motion_rotation_deg) if i in off_motion
                               else (settings.bridge_in_plane_mm, settings.fill_rotation_deg))
            off = [nm for nm in names if not _same_place(old_pose, start, registrar, far_mm, far_deg, names=(nm,))]
            if off:
                filled = {nm: start[nm] if nm in off else old_pose[nm] for nm in names}
                own, motion_sim = registrar.similarities_at(image, fov, [old_pose, filled], info["polarity"])
                ratio = (1.0 - motion_sim) / max(1.0 - own, 1e-6)
                if ratio <= settings.fill_max_dissimilarity_ratio:
                    for nm in off:
                        poses[nm][i] = start[nm]
                    _add_note(q, f"{', '.join(off)} pose {how} {where} (its registration was off the motion; "
                                 f"not measured)")
                else:
                    _add_note(q, f"left as registered: the frame contradicts its neighbours' motion "
                                 f"({ratio:.1f}x the dissimilarity)")
        yield i, bridged


def _same_place(a: dict[str, np.ndarray], b: dict[str, np.ndarray], registrar: Registrar,
                in_plane_mm: float = 1.0, rotation_deg: float = 2.0, names=None) -> bool:
    """Both poses put every bone's centroid within ``in_plane_mm`` across the beam and within
    ``rotation_deg`` (depth is left out: single-plane depth is the loose component, and the raw-frame
    polish moves it)."""
    names = registrar.names if names is None else names
    if not _finite({n: a[n] for n in names}):
        return False
    return all(_in_plane_mm(a[n], b[n], registrar, n) <= in_plane_mm and _rotation_deg(a[n], b[n]) <= rotation_deg
               for n in names)


def _in_plane_mm(a: np.ndarray, b: np.ndarray, registrar: Registrar, name: str) -> float:
    """How far (mm) pose ``b`` puts bone ``name``'s centroid from where pose ``a`` puts it, across the ray
    from the source through ``a``'s (what the image measures; depth along the ray it barely does)."""
    c = np.r_[registrar.centroids_bone[name], 1.0]
    ca, cb = (a @ c)[:3], (b @ c)[:3]
    source = registrar.geometry.source_position_world
    ray = (ca - source) / np.linalg.norm(ca - source)
    d = cb - ca
    return float(np.linalg.norm(d - (d @ ray) * ray))

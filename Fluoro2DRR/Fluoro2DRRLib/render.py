"""Two-bone DRRs with DiffDRR's renderers: one forward call, one channel per bone, one pose per bone.

The rays come from DiffDRR's ``Detector`` placed by :class:`~Fluoro2DRRLib.geometry.CArmGeometry`
(world frame). Each bone's pose moves the rays into that bone's own voxel grid
(``ijk_from_world = ijk_from_bone @ bone_from_world``), so each pose moves only its own bone and
each bone keeps its own cropped volume. We never call ``diffdrr.data.read``: it re-centres and
reorients the volume (and mutates its input); building the rays ourselves keeps every frame named
in geometry.py and undoes nothing implicitly.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffdrr.renderers import Siddon, Trilinear

from .bones import BoneModel
from .geometry import CArmGeometry, rigid_inverse


def rigid_inverse_torch(m: torch.Tensor) -> torch.Tensor:
    rot_t = m[..., :3, :3].transpose(-1, -2)
    t = -(rot_t @ m[..., :3, 3:4])
    bottom = m[..., 3:4, :]
    return torch.cat([torch.cat([rot_t, t], -1), bottom], -2)


def apply_torch(m: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """m (B, 4, 4) applied to pts (B, N, 3)."""
    return pts @ m[:, :3, :3].transpose(-1, -2) + m[:, None, :3, 3]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from .errors import InputError

        raise InputError("--device cuda", "no CUDA GPU is available here (use --device cpu or auto)")
    return torch.device(device)


class TwoBoneRenderer(torch.nn.Module):
    """Render ``len(bones)`` channels: ``forward(world_from_bone (B, n_bones, 4, 4)) -> (B, n_bones, H, W)``.

    Pixel values are line integrals (mm x relative density): bone bright, background 0.
    """

    def __init__(self, geometry: CArmGeometry, bones: list[BoneModel], renderer: str = "trilinear",
                 step_mm: float | None = None, device="cpu", dtype=torch.float32, compile_renderer: bool = False):
        super().__init__()
        self.geometry = geometry
        self.names = [b.name for b in bones]
        source, target = geometry.ray_endpoints_world()
        self.register_buffer("source", source.to(dtype))
        self.register_buffer("target", target.to(dtype))
        self.renderer_name = renderer
        self.n_points = []  # per bone, trilinear: samples per ray, ~0.75 voxel steps along the box's diagonal
        self.voxel_mm = []  # per bone: its finest voxel edge
        for i, bone in enumerate(bones):
            self.register_buffer(f"density_{i}", torch.as_tensor(bone.density, dtype=dtype))
            self.register_buffer(f"ijk_from_bone_{i}",
                                 torch.as_tensor(np.linalg.inv(bone.bone_from_ijk), dtype=dtype))
            # The diagonal is the longest chord any view can cut through the box: enough samples for every pose.
            diag_mm = float(np.linalg.norm(np.array(bone.density.shape) * bone.voxel_mm))
            step = step_mm or float(bone.voxel_mm.min()) * 0.75
            self.n_points.append(int(np.clip(diag_mm / step, 32, 1024)))
            self.voxel_mm.append(float(bone.voxel_mm.min()))
        # voxel_shift=0.5 with grid_sample(align_corners=False) puts voxel centres at integer indices.
        if renderer == "trilinear":
            self.renderer = Trilinear(voxel_shift=0.5)
        elif renderer == "siddon":
            self.renderer = Siddon(voxel_shift=0.5)
        else:
            raise ValueError(f"renderer must be 'trilinear' or 'siddon', not {renderer!r}")
        if compile_renderer:
            self.renderer = torch.compile(self.renderer)
        self.to(device)

    @property
    def height(self) -> int:
        return self.geometry.height

    @property
    def width(self) -> int:
        return self.geometry.width

    def density(self, i: int) -> torch.Tensor:
        return getattr(self, f"density_{i}")

    def _rays_in_bone(self, i: int, world_from_bone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ray's source and target (B, N, 3) in bone i's voxel indices."""
        batch = world_from_bone.shape[0]
        ijk_from_world = getattr(self, f"ijk_from_bone_{i}") @ rigid_inverse_torch(world_from_bone[:, i])
        return (apply_torch(ijk_from_world, self.source.expand(batch, -1, -1)),
                apply_torch(ijk_from_world, self.target.expand(batch, -1, -1)))

    def samples_per_ray(self, world_from_bone: torch.Tensor, step_voxels: float) -> list[int]:
        """Per bone, the trilinear samples per ray that space ``step_voxels`` voxels along the longest chord any
        ray cuts through the bone's box at these poses (B, n_bones, 4, 4): for :meth:`forward`'s ``n_points``.
        A view sees far shorter chords than the box's diagonal (a lateral knee: 77-88 mm against 171-181 mm)."""
        world_from_bone = world_from_bone.detach().to(self.source)
        ray_length = (self.target - self.source).norm(dim=-1)
        out = []
        with torch.no_grad():
            for i in range(len(self.names)):
                alpha_in, alpha_out = _ray_box_alphas(*self._rays_in_bone(i, world_from_bone), self.density(i).shape)
                longest_mm = float(((alpha_out - alpha_in).clamp_min(0.0) * ray_length).max())
                out.append(int(np.clip(math.ceil(longest_mm / (step_voxels * self.voxel_mm[i])) + 1, 32, 1024)))
        return out

    def forward(self, world_from_bone: torch.Tensor, n_points: list[int] | None = None) -> torch.Tensor:
        """``n_points``: trilinear samples per ray per bone (default: enough for the box's diagonal; see
        :meth:`samples_per_ray`). An optimiser keeps one count for all its evaluations: the count is a step in
        the objective."""
        world_from_bone = world_from_bone.to(self.source)
        batch = world_from_bone.shape[0]
        n_rays = self.target.shape[1]
        ray_length = (self.target - self.source).norm(dim=-1).unsqueeze(1).expand(batch, -1, -1)
        n_points = self.n_points if n_points is None else n_points
        channels = []
        for i in range(len(self.names)):
            density = self.density(i)
            src, tgt = self._rays_in_bone(i, world_from_bone)
            if self.renderer_name == "siddon":
                img = self.renderer(density, src, tgt, ray_length)
                channels.append(img.view(batch, self.height, self.width))
                continue
            # Trilinear, restricted to the rays that cross this bone's box, each sampled only inside it:
            # the box covers a fraction of the detector and of each ray, which is most of the speed.
            alpha_in, alpha_out = _ray_box_alphas(src, tgt, density.shape)
            with torch.no_grad():
                hit = (alpha_out > alpha_in).any(0)
                index = torch.nonzero(hit).squeeze(-1)
            full = torch.zeros(batch, n_rays, dtype=src.dtype, device=src.device)
            if index.numel() > 0:
                a0 = alpha_in[:, index].unsqueeze(-1)
                a1 = torch.maximum(alpha_out[:, index], alpha_in[:, index]).unsqueeze(-1)
                img = self.renderer(density, src, tgt[:, index], ray_length[:, :, index], n_points=n_points[i],
                                    alphamin=a0, alphamax=a1)
                full = full.index_copy(1, index, img[:, 0])
            channels.append(full.view(batch, self.height, self.width))
        return torch.stack(channels, dim=1)


def _ray_box_alphas(src: torch.Tensor, tgt: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Parametric entry/exit (B, N) of rays src + a (tgt - src), a in [0, 1], through the voxel box.

    Voxel centres are at integer indices, so the box spans [-0.5, dim - 0.5] on each axis.
    """
    direction = tgt - src
    direction = torch.where(direction.abs() < 1e-9, torch.full_like(direction, 1e-9), direction)
    lo = torch.full((3,), -0.5, dtype=src.dtype, device=src.device)
    hi = torch.tensor(shape, dtype=src.dtype, device=src.device) - 0.5
    t0 = (lo - src) / direction
    t1 = (hi - src) / direction
    alpha_in = torch.minimum(t0, t1).amax(-1).clamp(0.0, 1.0)
    alpha_out = torch.maximum(t0, t1).amin(-1).clamp(0.0, 1.0)
    return alpha_in, alpha_out


def render_numpy(geometry: CArmGeometry, bones: list[BoneModel], world_from_bone: np.ndarray,
                 renderer: str = "trilinear", batch: int = 4, progress=None) -> np.ndarray:
    """Render poses (N, n_bones, 4, 4) -> (N, n_bones, H, W) float32 without gradients."""
    module = TwoBoneRenderer(geometry, bones, renderer)
    poses = torch.as_tensor(np.asarray(world_from_bone), dtype=torch.float32)
    out = []
    with torch.inference_mode():
        for start in range(0, len(poses), batch):
            out.append(module(poses[start:start + batch]).numpy())
            if progress is not None:
                progress(min(start + batch, len(poses)), len(poses))
    return np.concatenate(out, 0)


def bone_outside_view(geometry: CArmGeometry, bone: BoneModel, world_from_bone: np.ndarray,
                      min_fraction: float = 0.5) -> bool:
    """True when less than ``min_fraction`` of the bone's surface points project inside the image."""
    pts = bone.surface_points_mm if bone.surface_points_mm is not None else bone.corners_mm()
    from .geometry import apply_transform

    world = apply_transform(world_from_bone, pts[:: max(1, len(pts) // 2000)])
    src = apply_transform(rigid_inverse(geometry.world_from_source), world)
    if np.any(src[:, 2] >= -1.0):
        return True
    px = geometry.project(world)
    inside = (px[:, 0] >= 0) & (px[:, 0] <= geometry.width - 1) & (px[:, 1] >= 0) & (px[:, 1] <= geometry.height - 1)
    return inside.mean() < min_fraction

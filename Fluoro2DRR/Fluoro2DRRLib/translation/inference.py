"""Fluoroscopy -> DRR-like translation with the bundled (or a user's) two-stage model.

>>> tr = Translator.load()                 # Resources/Models, checksums verified
>>> drr_like = tr.translate(frames)        # (N, H, W) any range -> (N, H, W) float32 in [0, 1]

The output has the polarity and the fixed intensity map of ``fluoro_sim.clean_drr_target``
(``exp(-summed bone line integral / 30)``: background 1, bone darker).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, read_json_object
from .networks import UNetGenerator, build_stage2, pad_to_multiple

WEIGHT_FILES = {"stage1": "stage1.pt", "stage2": "stage2.pt"}


def model_dir_candidates() -> list[Path]:
    """Source tree (``<repo>/Resources/Models``) and Slicer install (``<module>/Resources/Models``)."""
    here = Path(__file__).resolve()
    return [here.parents[3] / "Resources" / "Models", here.parents[2] / "Resources" / "Models"]


def find_model_dir() -> Path:
    for d in model_dir_candidates():
        if (d / "models.json").is_file():
            return d
    raise InputError("translation model", "no models.json found in " +
                     " or ".join(str(d) for d in model_dir_candidates()) +
                     "; train one with 'fluoro2drr train' or pass model_dir")


def translation_model_dir(translation) -> Path | None:
    """The model folder that a ``--translation`` value names: ``None`` for "none", the bundled folder for
    "bundled", else the value itself, a folder holding ``models.json`` (what ``fluoro2drr train`` writes, e.g.
    after fine-tuning on your own paired frames). Checked here, before any frame is registered."""
    value = str(translation if translation is not None else "none").strip()
    if value.lower() == "none":
        return None
    if value.lower() == "bundled":
        return find_model_dir()
    folder = Path(value).expanduser()
    if not (folder / "models.json").is_file():
        raise InputError("--translation", f"must be 'none', 'bundled' or a model folder holding models.json "
                                          f"(written by 'fluoro2drr train'); {value!r} is "
                                          f"{'a folder without models.json' if folder.is_dir() else 'not a folder'}")
    return folder


def _sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pick_device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device", f"{device} requested but CUDA is not available")
    return torch.device(device)


def _load_weights(model_dir: Path, info: dict, name: str):
    entry = (info.get("models") or {}).get(name)
    if entry is None:
        raise InputError(model_dir / "models.json", f"lists no {name} model")
    path = model_dir / entry.get("file", WEIGHT_FILES[name])
    if not path.is_file():
        raise InputError(path, f"{name} weights file is missing")
    digest = _sha256(path)
    if digest != entry.get("sha256"):
        raise InputError(path, f"checksum mismatch (sha256 {digest[:12]}..., models.json expects "
                               f"{str(entry.get('sha256'))[:12]}...): the file is corrupt or was replaced")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(path, f"cannot read {name} weights ({exc})") from exc
    arch = blob["arch"]
    if name == "stage1":
        net = UNetGenerator(**arch["kwargs"])
    else:
        net = build_stage2(arch["class"], **arch["kwargs"])
    try:
        net.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the {arch['class']} architecture ({exc})") from exc
    return net.eval(), blob


class Translator:
    """Two-stage fluoroscopy-to-DRR translator (stage 1 U-Net generator, stage 2 restorer)."""

    def __init__(self, stage1, stage2=None, image_size: int = 256, percentiles=(0.5, 99.5),
                 device="cpu", info=None):
        self.stage1, self.stage2 = stage1, stage2
        self.image_size = int(image_size)
        self.percentiles = tuple(percentiles)
        self.device = torch.device(device)
        self.info = info or {}

    @classmethod
    def for_option(cls, translation, device="auto") -> "Translator | None":
        """The translator a ``--translation`` value asks for ("none" -> None, "bundled", or a model folder)."""
        model_dir = translation_model_dir(translation)
        return None if model_dir is None else cls.load(model_dir, device=device)

    @classmethod
    def load(cls, model_dir=None, device="auto", stage="both") -> "Translator":
        """Load ``stage1.pt`` / ``stage2.pt`` listed (with sha256) in ``models.json``.

        ``stage``: ``"both"`` (default: stage 1 then stage 2, as trained), ``"1"`` (stage 1 only) or
        ``"2"`` (stage 2 only, on the normalised frame: a diagnostic / ablation, not what it was
        trained on).
        """
        stage = str(stage)
        if stage not in ("1", "2", "both"):
            raise InputError("stage", f"must be 1, 2 or both, not {stage!r}")
        model_dir = Path(model_dir) if model_dir is not None else find_model_dir()
        mj = model_dir / "models.json"
        info = read_json_object(mj, missing="models.json is missing (it lists the weights and their checksums)")
        dev = _pick_device(device)
        torch.set_flush_denormal(True)
        # on CUDA the networks run channels-last: cuDNN's float16 convolutions take that layout natively
        # (networks alone on an H200, batch 256: 3330 -> 4190 frames/s; results/gpu_2026-12-04.md)
        layout = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        s1 = _load_weights(model_dir, info, "stage1")[0].to(dev, memory_format=layout) if stage in ("1", "both") \
            else None
        s2 = None
        if stage in ("2", "both"):
            s2, _ = _load_weights(model_dir, info, "stage2")
            s2 = s2.to(dev, memory_format=layout)
        return cls(s1, s2, info.get("image_size", 256),
                   info.get("normalize_percentiles", (0.5, 99.5)), dev, info)

    # ----------------------------------------------------------------------------------
    def _prepare(self, frames) -> np.ndarray:
        from ..frames_io import as_frame_stack

        arr = as_frame_stack(frames)
        if arr.shape[0] == 0 or min(arr.shape[1:]) < 8:
            raise InputError("frames", f"no usable frames (shape {arr.shape})")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise InputError("frames", f"frames must be real numbers, not {arr.dtype}")
        arr = arr.astype(np.float32, copy=False)
        # a frame's float64 sum is finite exactly when all its pixels are (float32 values cannot overflow it),
        # and summing needs no frame-sized boolean mask
        with np.errstate(invalid="ignore"):  # inf + -inf in one frame: NaN, as wanted, without a warning
            bad = ~np.isfinite(arr.sum(axis=(1, 2), dtype=np.float64))
        if bad.any():
            raise InputError("frames", f"frame(s) {np.flatnonzero(bad)[:10].tolist()} contain NaN or inf")
        return arr

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        step = max(1, flat.shape[1] // 262144)
        q = torch.quantile(flat[:, ::step], torch.tensor([self.percentiles[0] / 100, self.percentiles[1] / 100],
                                                         device=x.device), dim=1)
        lo, hi = q[0].view(-1, 1, 1, 1), q[1].view(-1, 1, 1, 1)
        return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)

    def default_batch(self) -> int:
        """Frames per batch when the caller names none: 8 on the CPU (no faster per frame beyond), 32 on CUDA,
        where larger batches keep the card busier (H200, 512 x 512: 757 / 947 / 1106 frames/s at batch 16 / 64 /
        256) and 32 stays modest in memory for frames of any size."""
        return 32 if self.device.type == "cuda" else 8

    def translate(self, frames, batch: int | None = None, progress=None, stage=None) -> np.ndarray:
        """``(N, H, W)`` (or ``(H, W)``) frames, any range -> ``(N, H, W)`` float32 in [0, 1].

        ``batch``: frames per network pass (default :meth:`default_batch`). ``progress``: optional callable
        ``progress(done, total)``. ``stage``: ``"1"`` to stop after stage 1 even when stage 2 is loaded.
        """
        arr = self._prepare(frames)
        n, h, w = arr.shape
        batch = self.default_batch() if batch is None else max(1, int(batch))
        out = np.empty((n, h, w), np.float32)
        use_s1 = self.stage1 is not None and str(stage) != "2"
        use_s2 = self.stage2 is not None and str(stage) != "1"
        if not (use_s1 or use_s2):
            raise InputError("stage", f"stage {stage} was not loaded")
        mult = max(2 ** self.stage1.depth if use_s1 else 1, getattr(self.stage2, "multiple", 1) if use_s2 else 1)
        s = self.image_size
        # keep the aspect ratio: the longer side -> image_size, padded to the network multiple
        scale = s / max(h, w)
        wh = (max(8, round(h * scale)), max(8, round(w * scale)))
        cuda = self.device.type == "cuda"
        layout = torch.channels_last if cuda else torch.contiguous_format
        # CUDA: results come back through one page-locked buffer. A plain .cpu() allocated and faulted in a
        # fresh host tensor every batch and copied it a second time into `out`: 46 of 88 ms per 64 frames
        # of 512 x 512 on an H200 (results/gpu_2026-12-04.md)
        staging = torch.empty((min(batch, n), h, w), dtype=torch.float32, pin_memory=True) if cuda else None
        with torch.inference_mode():
            for i in range(0, n, batch):
                x = torch.from_numpy(arr[i:i + batch]).to(self.device)[:, None]
                x = self._normalize(x)
                x = F.interpolate(x, size=wh, mode="bilinear", antialias=True, align_corners=False)
                xp, (hh, ww) = pad_to_multiple(x, mult)
                xp = xp.contiguous(memory_format=layout)
                with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                    y = self.stage1(xp)[0] if use_s1 else xp
                    if use_s2:
                        y = self.stage2(y)
                y = y[..., :hh, :ww].float().clamp(0, 1)
                y = F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
                y = y[:, 0].clamp(0, 1)
                if cuda:
                    k = y.shape[0]
                    staging[:k].copy_(y)  # synchronous: the buffer is read right below
                    out[i:i + k] = staging[:k].numpy()
                else:
                    out[i:i + batch] = y.numpy()
                if progress is not None:
                    progress(min(i + batch, n), n)
        return out

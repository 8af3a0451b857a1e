"""Training of the two-stage translation model on simulated pairs (+ optional real paired frames).

``train(config, out_dir)`` writes into ``out_dir``:

* ``cache/train.npz``, ``cache/val.npz`` -- simulated pairs (re-used when present),
* ``checkpoints/stage1.ckpt``, ``checkpoints/stage2.ckpt`` -- full training state after each epoch
  (``resume=True`` continues from them),
* ``val_stage{1,2}_epochNN.png`` -- validation grids (input | stage 1 | stage 2 | target),
* ``metrics.json`` -- per-epoch losses and validation PSNR / SSIM / NCC,
* ``stage1.pt``, ``stage2.pt``, ``models.json`` -- the exported model (what :class:`Translator` loads).
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError, read_json_object
from .data import SimulatedPairDataset, build_cache, default_source, default_workers, training_effects
from .losses import GeneratorLoss, adversarial_loss
from .networks import PatchDiscriminator, UNetGenerator, build_stage2, count_parameters

DEFAULT_CONFIG = {
    "seed": 0,
    "image_size": 256,
    "normalize_percentiles": [0.5, 99.5],
    "data": {"source": "procedural", "n_train": 600, "n_val": 24, "seed": 0, "val_seed": 100000},
    "stage1": {"base": 16, "depth": 4, "max_ch": 128, "d_base": 32, "epochs": 6, "steps_per_epoch": 200,
               "batch": 4, "crop": 192, "lr": 2e-4, "d_lr": 2e-4, "betas": [0.5, 0.999],
               "adv_kind": "lsgan",
               "weights": {"l1": 0.5, "ssim": 0.3, "perceptual": 0.2, "lpips": 0.0, "seg": 0.2,
                           "adv": 1e-3}},
    "stage2": {"name": "drunet", "kwargs": {"channels": [16, 32, 64, 128], "n_blocks": 2,
                                            "noise_level": 0.02},
               "epochs": 3, "steps_per_epoch": 200, "batch": 4, "crop": 128, "lr": 2e-4,
               "betas": [0.9, 0.999],
               "weights": {"l1": 0.5, "ssim": 0.3, "perceptual": 0.2, "lpips": 0.0, "seg": 0.2,
                           "adv": 0.0}},
    "finetune": {"epochs": 2, "lr": 5e-5},
    "lpips_weights": None,
    "time_budget_min": {"stage1": None, "stage2": None},
}


def merge_config(config) -> dict:
    """Config dict or JSON path, deep-merged over DEFAULT_CONFIG."""
    if isinstance(config, (str, Path)):
        config = read_json_object(config, missing="training config not found")

    def merge(a, b):
        out = copy.deepcopy(a)
        for k, v in (b or {}).items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    merged = merge(DEFAULT_CONFIG, config)
    # a stage-2 network's keyword arguments belong to that network: a config that picks another
    # backbone must not inherit the default DRUNet's (SR-ResNet has no ``channels``)
    stage2 = (config or {}).get("stage2") or {}
    if "name" in stage2 and "kwargs" in stage2:
        merged["stage2"]["kwargs"] = copy.deepcopy(stage2["kwargs"])
    return merged


def adopt_trained_model(cfg: dict, model_dir: Path, info: dict, keep_simulated_epochs: bool = False) -> dict:
    """The config of a run that starts from a trained model (``models.json`` ``info`` of ``model_dir``): that
    model's architectures, image size and normalisation. Fine-tuning (the default): no simulated epochs (the
    model had them), only the ``finetune`` phase on the paired frames. ``keep_simulated_epochs``: the config's
    simulated epochs run on, from the model's weights (more training, or a new data recipe, without starting
    over)."""
    out = copy.deepcopy(cfg)
    models = info.get("models") or {}
    if "stage1" not in models:
        raise InputError(model_dir / "models.json", "lists no stage1 model to fine-tune")
    out["image_size"] = int(info.get("image_size", out["image_size"]))
    out["normalize_percentiles"] = list(info.get("normalize_percentiles", out["normalize_percentiles"]))
    out["stage1"].update({k: v for k, v in models["stage1"]["arch"]["kwargs"].items()
                          if k in ("base", "depth", "max_ch")})
    if not keep_simulated_epochs:
        out["stage1"]["epochs"] = out["stage2"]["epochs"] = 0
    if "stage2" in models:
        out["stage2"]["name"] = models["stage2"]["arch"]["class"]
        out["stage2"]["kwargs"] = dict(models["stage2"]["arch"]["kwargs"])
    out["init_from"] = {"model_dir": str(model_dir), "config_hash": info.get("config_hash"),
                        "stage2": "stage2" in models}
    return out


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pick_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device", f"{device} requested but CUDA is not available")
    return torch.device(device)


# ------------------------------------------------------------------------------------ metrics
def psnr(x, y):
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ncc(x, y):
    x = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    y = y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-8)


def image_metrics(pred, target) -> dict:
    from .losses import ssim
    return {"psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target, reduce=False).mean()),
            "ncc": float(ncc(pred, target).mean())}


def robust_normalize_t(x: torch.Tensor, p=(0.5, 99.5)) -> torch.Tensor:
    """Per-image percentile normalisation of (B, 1, H, W) to [0, 1]."""
    flat = x.flatten(1).float()
    q = torch.quantile(flat[:, :: max(1, flat.shape[1] // 65536)],
                       torch.tensor([p[0] / 100, p[1] / 100], device=x.device), dim=1)
    lo, hi = q[0].view(-1, 1, 1, 1), q[1].view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


# ------------------------------------------------------------------------------------ models
def scheduled_lr(stage_cfg: dict, epoch: int, budget_min: float | None = None,
                 spent_min: float = 0.0) -> float:
    """``lr_schedule``: ``[[from_epoch, lr], ...]`` (the last entry at or before ``epoch``); else ``lr``.

    With a time budget, ``lr_schedule_budget_fraction`` ``[[fraction, lr], ...]`` goes by the fraction of the
    budget spent instead (a run stopped by its budget does not know its epoch count in advance)."""
    by_budget = stage_cfg.get("lr_schedule_budget_fraction")
    if by_budget and budget_min:
        schedule, now = by_budget, spent_min / budget_min
    else:
        schedule, now = stage_cfg.get("lr_schedule") or [], epoch
    lr = stage_cfg["lr"]
    for start, value in sorted(schedule):
        if now >= start:
            lr = value
    return float(lr)


def build_models(cfg):
    s1 = cfg["stage1"]
    g = UNetGenerator(base=s1["base"], depth=s1["depth"], max_ch=s1["max_ch"])
    d = PatchDiscriminator(base=s1["d_base"])
    s2 = build_stage2(cfg["stage2"]["name"], **cfg["stage2"]["kwargs"])
    return g, d, s2


def stage1_arch(cfg):
    s1 = cfg["stage1"]
    return {"class": "UNetGenerator", "kwargs": {"base": s1["base"], "depth": s1["depth"], "max_ch": s1["max_ch"]}}


def stage2_arch(cfg):
    return {"class": cfg["stage2"]["name"], "kwargs": dict(cfg["stage2"]["kwargs"])}


def export_models(out_dir, g, s2, cfg, metrics=None, stage2_trained=True, compute=None) -> dict:
    """Write ``stage1.pt``, ``stage2.pt`` and ``models.json`` (sha256, params, config hash)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"image_size": cfg["image_size"], "normalize_percentiles": cfg["normalize_percentiles"]}
    entries = {}
    for name, net, arch in [("stage1", g, stage1_arch(cfg)), ("stage2", s2, stage2_arch(cfg))]:
        if name == "stage2" and not stage2_trained:
            continue
        path = out_dir / f"{name}.pt"
        sd = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        torch.save({"arch": arch, "state_dict": sd, **common}, path)
        entries[name] = {"file": path.name, "sha256": sha256_file(path), "parameters": count_parameters(net),
                         "bytes": path.stat().st_size, "arch": arch}
    info = {"format": 1, "models": entries, "config_hash": config_hash(cfg), **common,
            "target_map": "exp(-sum_bones_line_integral / 30.0)  (fluoro_sim.clean_drr_target)",
            "metrics": metrics or {}, "compute": compute or {}}
    (out_dir / "models.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------ data
class _PairedWrapper(Dataset):
    """Adapt any dataset yielding (frame, target[, mask]) arrays/tensors to (1,S,S) tensors."""

    def __init__(self, ds, size, percentiles):
        self.ds, self.size, self.p = ds, size, percentiles

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        frame, target = item[0], item[1]
        mask = item[2] if len(item) > 2 else None

        def prep(a, norm):
            t = torch.as_tensor(np.asarray(a, dtype=np.float32))
            while t.dim() < 4:
                t = t.unsqueeze(0)
            if norm:
                t = robust_normalize_t(t, self.p)
            if t.shape[-2:] != (self.size, self.size):
                t = F.interpolate(t, size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False)
            return t[0]

        f, t = prep(frame, True), prep(target, False).clamp(0, 1)
        m = prep(mask, False) if mask is not None else torch.full_like(t, -1.0)  # -1: no mask
        return f, t, m


def _seed_loader_worker(worker_id: int) -> None:
    """Each loader process its own augmentation stream (a copied generator would repeat the same crops)."""
    info = torch.utils.data.get_worker_info()
    ds = info.dataset
    if hasattr(ds, "_rng"):
        ds._rng = np.random.default_rng([int(info.seed % (1 << 31)), worker_id])


def _loop(loader):
    while True:
        for batch in loader:
            yield batch


def _save_grid(path, rows):
    """rows: list of lists of (H, W) arrays in [0, 1] -> PNG."""
    from PIL import Image
    img = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


# ------------------------------------------------------------------------------------ train
def train(config, out_dir, device="auto", resume=False, paired=None, progress=True, init_from=None,
          continue_simulated=False) -> dict:
    """Train stage 1 (GAN) then stage 2 (on stage-1 outputs); export the model into ``out_dir``.

    ``paired``: optional torch Dataset of real (frame, target[, mask]) pairs for fine-tuning.
    ``init_from``: "bundled" or a model folder: start from that trained model and run only the fine-tuning
    phase on ``paired`` (minutes instead of the simulated training's hours); with ``continue_simulated``
    the config's simulated epochs run first, from that model's weights, and the stage-1 generator is kept
    only where it beats the starting model on the validation pairs.
    Returns the metrics dict (also in ``out_dir/metrics.json``).
    """
    from tqdm import tqdm

    from .inference import _load_weights, translation_model_dir

    cfg = merge_config(config)
    start_model = translation_model_dir(init_from) if init_from is not None else None
    start_info = None
    if start_model is not None:
        if paired is None and not continue_simulated:
            raise InputError("--init-from", "starting from a trained model is for fine-tuning: it needs real "
                                            "paired frames (--paired-frames, --calibration, --femur, --tibia, "
                                            "--poses), or --continue-simulated to train on simulated pairs")
        start_info = read_json_object(start_model / "models.json", missing="models.json is missing")
        cfg = adopt_trained_model(cfg, start_model, start_info, keep_simulated_epochs=continue_simulated)
    elif continue_simulated:
        raise InputError("--continue-simulated", "needs --init-from: the trained model to continue from")
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    dev = pick_device(device)
    torch.set_flush_denormal(True)  # no-norm residual nets hit denormals on CPU: 10-20x slower
    torch.manual_seed(cfg["seed"])
    size = cfg["image_size"]
    pct = cfg["normalize_percentiles"]
    dcfg = cfg["data"]
    t_start = time.time()

    # data
    source = None
    if dcfg["source"] != "procedural":
        source = default_source(dcfg["source"], **dcfg.get("drr", {}))
    tr_cache, va_cache = out / "cache" / "train.npz", out / "cache" / "val.npz"
    simulated_epochs = cfg["stage1"]["epochs"] > 0 or cfg["stage2"]["epochs"] > 0
    # "workers": processes that build phantoms and simulate frames ("auto": all cores but one; 0: serial)
    workers = dcfg.get("workers", 0)
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise InputError("training config", f'data.workers must be "auto" or a count >= 0, not {workers!r}')
    workers = default_workers() if workers == "auto" else workers
    compress = bool(dcfg.get("compress_cache", True))
    # "fluoro_effects": the simulator's effect ranges for the training pairs (KEY=VALUE strings); absent: the
    # training default (data.TRAINING_FLUORO_EFFECTS, the wider focal blur the bundled weights were trained on)
    effects = training_effects(dcfg.get("fluoro_effects"))
    if simulated_epochs and not tr_cache.exists():
        build_cache(tr_cache, dcfg["n_train"], size, dcfg["seed"], source, effects, progress=progress,
                    workers=workers, compress=compress)
    if not va_cache.exists():
        build_cache(va_cache, dcfg["n_val"], size, dcfg["val_seed"], source, effects, progress=progress,
                    workers=workers, compress=compress)
    metrics_data_minutes = (time.time() - t_start) / 60
    val = SimulatedPairDataset(va_cache, normalize=tuple(pct))
    vf = torch.stack([val[i][0] for i in range(len(val))]).to(dev)
    vt = torch.stack([val[i][1] for i in range(len(val))]).to(dev)

    g, d, s2 = build_models(cfg)
    if start_model is not None:  # the trained model's weights (checksums verified); a fresh discriminator
        g.load_state_dict(_load_weights(start_model, start_info, "stage1")[0].state_dict())
        if cfg["init_from"]["stage2"]:
            s2.load_state_dict(_load_weights(start_model, start_info, "stage2")[0].state_dict())
    g, d, s2 = g.to(dev), d.to(dev), s2.to(dev)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if resume and metrics_path.exists() else \
        {"history": [], "params": {"stage1": count_parameters(g), "stage2": count_parameters(s2),
                                   "discriminator": count_parameters(d)}}
    metrics["raw_val"] = image_metrics(vf, vt)
    metrics["minutes_data"] = metrics_data_minutes
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop and batch sizes: pick the fastest kernels once

    def run_stage1(x):
        g.eval()
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), 8):
                outs.append(g(x[i:i + 8])[0])
        return torch.cat(outs)

    def run_stage2(x):
        s2.eval()
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), 8):
                outs.append(s2(x[i:i + 8]).clamp(0, 1))
        return torch.cat(outs)

    # the user's paired frames (at most 32), scored as well: how well the model fits the real frames
    paired_ds, paired_eval = None, None
    if paired is not None:
        if len(paired) == 0:
            raise InputError("--paired-frames", "no paired frame has a finite pose for both bones")
        paired_ds = _PairedWrapper(paired, size, pct)
        pick = range(min(len(paired_ds), 32))
        paired_eval = tuple(torch.stack([paired_ds[i][k] for i in pick]).to(dev) for k in (0, 1))

    def validate(stage, epoch, with_s2):
        o1 = run_stage1(vf)
        res = {"stage1": image_metrics(o1, vt)}
        o2 = None
        if with_s2:
            o2 = run_stage2(o1)
            res["stage2"] = image_metrics(o2, vt)
        if paired_eval is not None:
            p1 = run_stage1(paired_eval[0])
            res["paired_stage1"] = image_metrics(p1, paired_eval[1])
            if with_s2:
                res["paired_stage2"] = image_metrics(run_stage2(p1), paired_eval[1])
        rows = []
        for i in range(min(4, len(vf))):
            r = [vf[i, 0].cpu().numpy(), o1[i, 0].cpu().numpy()]
            r.append(o2[i, 0].cpu().numpy() if o2 is not None else np.zeros_like(r[0]))
            r.append(vt[i, 0].cpu().numpy())
            rows.append(r)
        name = "val_final.png" if stage is None else f"val_stage{stage}_epoch{epoch:02d}.png"
        _save_grid(out / name, rows)
        return res

    if paired_eval is not None and "paired_start" not in metrics:  # the starting model on the real frames
        metrics["paired_start"] = image_metrics(run_stage1(paired_eval[0]), paired_eval[1])

    def make_loader(ds, batch, workers=0):  # fewer frames than a batch (a short paired set): one smaller batch
        # "loader_workers" > 0 (a GPU steps faster than one process crops and normalises): persistent worker
        # processes, each with its own augmentation stream
        workers = int(workers or 0) if isinstance(ds, SimulatedPairDataset) else 0
        return DataLoader(ds, batch_size=max(1, min(batch, len(ds))), shuffle=True, drop_last=True,
                          num_workers=workers, persistent_workers=workers > 0,
                          worker_init_fn=_seed_loader_worker if workers > 0 else None,
                          pin_memory=workers > 0 and dev.type == "cuda")

    def budget_over(stage, t0):
        b = (cfg.get("time_budget_min") or {}).get(stage)
        return b is not None and (time.time() - t0) / 60 > b

    def budget_lr(stage_cfg, stage, t0, epoch):
        return scheduled_lr(stage_cfg, epoch, (cfg.get("time_budget_min") or {}).get(stage),
                            (time.time() - t0) / 60)

    # ---------------- stage 1
    s1 = cfg["stage1"]
    gl = GeneratorLoss(s1["weights"], cfg.get("lpips_weights"), s1["adv_kind"]).to(dev)
    opt_g = torch.optim.Adam(g.parameters(), lr=s1["lr"], betas=tuple(s1["betas"]))
    opt_d = torch.optim.Adam(d.parameters(), lr=s1["d_lr"], betas=tuple(s1["betas"]))
    ck1 = out / "checkpoints" / "stage1.ckpt"
    start = 0
    if resume and ck1.exists():
        st = torch.load(ck1, map_location=dev, weights_only=False)
        g.load_state_dict(st["g"]), d.load_state_dict(st["d"])
        opt_g.load_state_dict(st["opt_g"]), opt_d.load_state_dict(st["opt_d"])
        start = st["epoch"] + 1
    train_ds = SimulatedPairDataset(tr_cache, augment=True, crop=s1["crop"], seed=cfg["seed"],
                                    normalize=tuple(pct)) if simulated_epochs else None
    phases = [("sim", train_ds, s1["epochs"], s1["lr"])] if s1["epochs"] > 0 else []
    if paired is not None:
        phases.append(("paired", paired_ds, cfg["finetune"]["epochs"], cfg["finetune"]["lr"]))
    # GAN training oscillates from epoch to epoch: keep the generator of the best validation epoch
    # (NCC to the clean target on the validation pairs, which training never sees)
    ck1_best = out / "checkpoints" / "stage1_best.pt"
    best = metrics.get("stage1_best") if resume and ck1_best.exists() else None
    if best is None and start_model is not None and s1["epochs"] > 0:
        # more simulated training from a trained model: it must beat that model, not just its own first epoch
        best = {"epoch": -1, "phase": "start", "val": validate(1, -1, False)["stage1"]}
        torch.save({"g": g.state_dict(), "epoch": -1}, ck1_best)
        metrics["stage1_best"] = metrics["stage1_start"] = best
    t0 = time.time()
    epoch = 0
    for phase, ds, n_ep, lr in phases:
        for pg in opt_g.param_groups:
            pg["lr"] = lr
        it = _loop(make_loader(ds, s1["batch"], s1.get("loader_workers")))
        for _ in range(n_ep):
            if epoch < start:
                epoch += 1
                continue
            if budget_over("stage1", t0):
                break
            if phase == "sim":
                lr_now = budget_lr(s1, "stage1", t0, epoch)
                for opt, base in ((opt_g, s1["lr"]), (opt_d, s1["d_lr"])):
                    for pg in opt.param_groups:
                        pg["lr"] = base * lr_now / s1["lr"]
            g.train(), d.train()
            bar = tqdm(range(s1["steps_per_epoch"]), desc=f"stage1 {phase} epoch {epoch}",
                       disable=not progress, mininterval=5)
            run = {}
            for _step in bar:
                if budget_over("stage1", t0):
                    break
                f, t, m = (z.to(dev) for z in next(it))
                has_mask = bool((m >= 0).all())
                pred, logit = g(f)
                # discriminator
                if gl.w["adv"]:
                    d_real, d_fake = d(f, t), d(f, pred.detach())
                    loss_d = 0.5 * (adversarial_loss(d_real, True, s1["adv_kind"])
                                    + adversarial_loss(d_fake, False, s1["adv_kind"]))
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()
                    d_out = d(f, pred)
                else:
                    loss_d, d_out = torch.zeros(()), None
                loss_g, terms = gl(pred, t, logit if has_mask else None, m if has_mask else None, d_out)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                terms["G"], terms["D"] = float(loss_g.detach()), float(loss_d.detach())
                for k, v in terms.items():
                    run[k] = 0.9 * run.get(k, v) + 0.1 * v
                bar.set_postfix({k: f"{v:.3g}" for k, v in run.items()}, refresh=False)
            res = validate(1, epoch, False)
            metrics["history"].append({"stage": 1, "phase": phase, "epoch": epoch, "losses": run,
                                       "val": res, "minutes": (time.time() - t_start) / 60})
            torch.save({"g": g.state_dict(), "d": d.state_dict(), "opt_g": opt_g.state_dict(),
                        "opt_d": opt_d.state_dict(), "epoch": epoch}, ck1)
            # a fine-tuning epoch is always kept: the simulated validation pairs cannot judge real frames
            # (they would prefer the model before it saw them)
            if phase == "paired" or best is None or res["stage1"]["ncc"] > best["val"]["ncc"]:
                best = {"epoch": epoch, "phase": phase, "val": res["stage1"]}
                torch.save({"g": g.state_dict(), "epoch": epoch}, ck1_best)
                metrics["stage1_best"] = best
            metrics_path.write_text(json.dumps(metrics, indent=2))
            if progress:
                print(f"stage1 epoch {epoch}: val {res} (best: epoch {best['epoch']})", flush=True)
            epoch += 1
    metrics["minutes_stage1"] = (time.time() - t0) / 60
    if ck1_best.exists():
        g.load_state_dict(torch.load(ck1_best, map_location=dev, weights_only=False)["g"])

    # ---------------- stage 2 (inputs: stage-1 outputs of the full frames, then cropped)
    s2c = cfg["stage2"]
    n_ep2 = s2c["epochs"]
    stage2_trained = n_ep2 > 0 or bool((cfg.get("init_from") or {}).get("stage2"))
    if stage2_trained:
        t0 = time.time()
        s2_ds = None
        if n_ep2 > 0:
            n_in = min(len(train_ds), int(s2c.get("n_train_inputs") or len(train_ds)))
            frames = torch.stack([train_ds.frames_tensor(i) for i in range(n_in)])
            s1_out = run_stage1(frames.to(dev)).cpu().numpy()[:, 0]
            s2_ds = SimulatedPairDataset(tr_cache, augment=True, crop=s2c["crop"], seed=cfg["seed"] + 1,
                                         normalize=None)
            s2_ds.frames, s2_ds._scale = np.round(s1_out * 65535).astype(np.uint16), (65535.0, 65535.0)
            s2_ds.targets, s2_ds.masks = s2_ds.targets[:n_in], s2_ds.masks[:n_in]
        paired_s2 = None
        if paired_ds is not None:
            items = [paired_ds[i] for i in range(len(paired_ds))]
            paired_s2 = torch.utils.data.TensorDataset(
                run_stage1(torch.stack([it[0] for it in items]).to(dev)).cpu(),
                torch.stack([it[1] for it in items]), torch.stack([it[2] for it in items]))
        gl2 = GeneratorLoss({**s2c["weights"], "adv": 0.0}, cfg.get("lpips_weights")).to(dev)
        opt2 = torch.optim.Adam(s2.parameters(), lr=s2c["lr"], betas=tuple(s2c["betas"]))
        ck2 = out / "checkpoints" / "stage2.ckpt"
        start = 0
        if resume and ck2.exists():
            st = torch.load(ck2, map_location=dev, weights_only=False)
            s2.load_state_dict(st["s2"]), opt2.load_state_dict(st["opt"])
            start = st["epoch"] + 1
        phases = [("sim", s2_ds, n_ep2, s2c["lr"])] if n_ep2 > 0 else []
        if paired_s2 is not None:
            phases.append(("paired", paired_s2, cfg["finetune"]["epochs"], cfg["finetune"]["lr"]))
        epoch = 0
        for phase, ds, n_ep, lr in phases:
            for pg in opt2.param_groups:
                pg["lr"] = lr
            it = _loop(make_loader(ds, s2c["batch"], s2c.get("loader_workers")))
            for _ in range(n_ep):
                if epoch < start:
                    epoch += 1
                    continue
                if budget_over("stage2", t0):
                    break
                if phase == "sim" and s2c.get("lr_schedule_budget_fraction"):
                    for pg in opt2.param_groups:
                        pg["lr"] = budget_lr(s2c, "stage2", t0, epoch)
                s2.train()
                bar = tqdm(range(s2c["steps_per_epoch"]), desc=f"stage2 {phase} epoch {epoch}",
                           disable=not progress, mininterval=5)
                run = {}
                for _step in bar:
                    if budget_over("stage2", t0):
                        break
                    x, t, m = (z.to(dev) for z in next(it))
                    pred = s2(x)
                    has_mask = bool((m >= 0).all())
                    loss, terms = gl2(pred, t, None, m if has_mask else None)
                    opt2.zero_grad(set_to_none=True)
                    loss.backward()
                    opt2.step()
                    terms["total"] = float(loss.detach())
                    for k, v in terms.items():
                        run[k] = 0.9 * run.get(k, v) + 0.1 * v
                    bar.set_postfix({k: f"{v:.3g}" for k, v in run.items()}, refresh=False)
                res = validate(2, epoch, True)
                metrics["history"].append({"stage": 2, "phase": phase, "epoch": epoch, "losses": run,
                                           "val": res, "minutes": (time.time() - t_start) / 60})
                torch.save({"s2": s2.state_dict(), "opt": opt2.state_dict(), "epoch": epoch}, ck2)
                metrics_path.write_text(json.dumps(metrics, indent=2))
                if progress:
                    print(f"stage2 epoch {epoch}: val {res}", flush=True)
                epoch += 1
        metrics["minutes_stage2"] = (time.time() - t0) / 60

    final = validate(None, 0, stage2_trained)
    metrics["final_val"] = {"raw": metrics["raw_val"], **final}
    if paired_eval is not None:
        metrics["final_val"]["paired_raw"] = image_metrics(paired_eval[0], paired_eval[1])
    metrics["minutes_total"] = (time.time() - t_start) / 60
    compute = {"device": str(dev), "torch_threads": torch.get_num_threads(),
               "minutes_total": round(metrics["minutes_total"], 1)}
    if dev.type == "cuda":
        compute["gpu"] = torch.cuda.get_device_name(dev)
        compute["torch"] = torch.__version__
    export_models(out, g, s2, cfg, metrics["final_val"], stage2_trained, compute)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics

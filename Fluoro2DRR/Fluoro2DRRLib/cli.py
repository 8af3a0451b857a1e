"""``fluoro2drr``: the headless command line (simulate, register, evaluate, translate, train, demo).

Every user error ends in one line ``fluoro2drr: error: <file>: <problem>`` and exit code 2; an
interrupted run exits 130 with every finished frame on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _add_simulate(sub):
    p = sub.add_parser("simulate", help="make a knee flexion sequence with ground truth",
                       description="Simulate a knee flexion sequence (frames, calibration, bone models, truth poses) "
                                   "from the procedural phantom (default), a label map, or two meshes.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--frames", type=int, default=20, help="number of frames (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="frame width/height in pixels (default 512; "
                                                        "the field of view stays 280 mm at the detector)")
    p.add_argument("--realism", choices=["none", "fluoro"], default="none",
                   help="none: clean bone DRRs (bone bright); fluoro: simulated fluoroscopy (bone dark)")
    p.add_argument("--max-flexion", type=float, default=60.0, help="flexion at the last frame, degrees")
    p.add_argument("--fluoro-strength", type=float, default=1.0,
                   help="with --realism fluoro: strength of every effect (0 clean .. 1 default .. >1 harsher)")
    p.add_argument("--effects-per", choices=["frame", "sequence"], default="frame",
                   help="with --realism fluoro: draw the effects (exposure, soft tissue, wires, markers, the "
                        "intensifier's field) again for every frame (default, as in the benchmarks so far), or "
                        "once for the sequence with fresh noise per frame (one C-arm setting, as in a real trial)")
    p.add_argument("--fluoro-effect", action="append", default=[], metavar="KEY=VALUE",
                   help="with --realism fluoro: change one effect's range (repeatable), e.g. focal_sigma_px=0.1,0.4 "
                        "(the focal spot's blur, detector pixels), wires_on=off; the keys are FluoroEffects' fields")
    p.add_argument("--labelmap", help="label map (NRRD/NIfTI/...) with femur and tibia labels")
    p.add_argument("--femur-label", type=int, default=5)
    p.add_argument("--tibia-label", type=int, default=6)
    p.add_argument("--femur", help="femur surface mesh (STL/VTK/VTP/PLY/OBJ)")
    p.add_argument("--tibia", help="tibia surface mesh")
    p.add_argument("--mesh-space", choices=["auto", "RAS", "LPS"], default="auto",
                   help="coordinate system of the meshes (auto: the file header, else RAS)")
    p.add_argument("--units", choices=["mm", "m"], default="mm", help="units of the meshes")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args):
    from .simulate import simulate_sequence

    info = simulate_sequence(args.out, n_frames=args.frames, seed=args.seed, realism=args.realism,
                             image_size=args.size, labelmap=args.labelmap, femur_label=args.femur_label,
                             tibia_label=args.tibia_label, femur_mesh=args.femur, tibia_mesh=args.tibia,
                             mesh_coordinate_system=args.mesh_space, mesh_units=args.units,
                             max_flexion_deg=args.max_flexion,
                             fluoro_strength=args.fluoro_strength, fluoro_effects_per=args.effects_per,
                             fluoro_effects=args.fluoro_effect)
    print(f"wrote {info['n_frames']} {info['realism']} frames of {info['subject']} to {args.out} "
          f"in {info['seconds']:.1f} s")


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="compare estimated poses with the truth",
                       description="Per-bone in-plane / out-of-plane translation error of the bone centroid (mm), "
                                   "geodesic rotation error (deg) and success rate (in-plane < 1 mm).")
    p.add_argument("--poses", required=True, help="registration output folder (poses.csv or {bone}.jts) or a CSV")
    p.add_argument("--truth", required=True, help="truth folder (DIR/truth of a simulation)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args):
    from .evaluate import evaluate_files, format_table

    summary = evaluate_files(args.poses, args.truth)
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    else:
        print(format_table(summary))


def add_register_arguments(p):
    p.add_argument("--frames", required=True, help="folder or glob of frames (TIFF/PNG/DICOM), or a multi-frame file")
    p.add_argument("--calibration", required=True,
                   help="C-arm calibration: JointTrack JT_INTCALIB, Autoscoper mayaCam, DICOM, or our JSON")
    p.add_argument("--femur", help="femur surface mesh (STL/VTK/VTP/PLY/OBJ)")
    p.add_argument("--tibia", help="tibia surface mesh")
    p.add_argument("--mesh-space", choices=["auto", "RAS", "LPS"], default="auto",
                   help="coordinate system of the meshes (auto: the file header, else RAS)")
    p.add_argument("--units", choices=["mm", "m"], default="mm", help="units of the meshes")
    p.add_argument("--ct", help="CT volume (HU) for density; with --labels")
    p.add_argument("--labels", help="label map / segmentation volume on the CT grid")
    p.add_argument("--femur-label", type=int, default=None)
    p.add_argument("--tibia-label", type=int, default=None)
    p.add_argument("--init-femur", help="pose file (.jts/.tra/.csv) for the femur: one row starts frame 0, "
                                        "one row per frame starts each frame")
    p.add_argument("--init-tibia", help="pose file for the tibia (as --init-femur)")
    p.add_argument("--translation", default="none", metavar="none|bundled|MODEL_DIR",
                   help="translate frames to DRR-like images first: with the bundled networks, or with a model "
                        "folder written by 'fluoro2drr train' (e.g. fine-tuned on your own paired frames)")
    p.add_argument("--polarity", choices=["auto", "xray", "drr"], default="auto",
                   help="frame polarity: xray = bone dark on bright (raw fluoroscopy), drr = bone bright")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--detector-size", type=int, default=256,
                   help="finest detector size (pixels) used by the registration (default 256)")
    p.add_argument("--smooth-window", type=int, default=1, metavar="FRAMES",
                   help="also write OUT/smoothed/: poses smoothed in time over this many frames (odd; a local "
                        "quadratic, failed frames ignored); OUT keeps the per-frame measurements. 1: off")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the renderer: ~20 %% faster per frame on the CPU after 10-70 s of "
                        "compilation (needs a C++ compiler); pays off on long sequences")
    p.add_argument("--restart-deg", type=float, default=None, metavar="DEG",
                   help="fluoroscopy frames: after each frame, restart from the pose turned this far out of the "
                        "image plane (4 restarts) and keep a clearly better pose; frees a bone stuck a few "
                        "degrees off, roughly doubles the time per frame; 0: off (default: 6)")
    p.add_argument("--wire-width-mm", type=float, default=None, metavar="MM",
                   help="raw fluoroscopy: thin bright curves (EMG wires, leads) up to this wide on the detector are "
                        "filled from their surroundings in the raw frame, so a wire along a bone's edge cannot pull "
                        "the pose onto it; 0: off (default: 7)")
    p.add_argument("--no-fill", action="store_true",
                   help="keep a failed frame's registered pose even when it is far off its good neighbours' "
                        "motion (default: such a bone carries their interpolated pose, still flagged failed, "
                        "noted 'not measured')")
    p.add_argument("--no-motion-check", action="store_true",
                   help="do not flag a frame whose pose is out of line with its neighbours' motion while they are "
                        "in line with theirs (default: such a frame, however well it scored, is flagged failed "
                        "and its raw frame registered again from that motion)")
    p.add_argument("--no-joint-prior", action="store_true",
                   help="let each bone's depth rest on its own outline (default: femur and tibia segmented from "
                        "one scan are kept together along the beam at their joint, where a single view measures "
                        "depth worst; bones that do not meet as loaded get no prior)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pixel-spacing", type=float, default=None,
                   help="detector pixel size (mm) for calibrations that lack it (mayaCam)")


def _add_register(sub):
    p = sub.add_parser("register", help="2D/3D registration of femur and tibia to every frame",
                       description="Register femur and tibia to every frame with DiffDRR: automatic start on the "
                                   "first frame, tracking through the sequence. Writes OUT/poses.csv, "
                                   "OUT/{femur,tibia}.jts, OUT/{femur,tibia}.tra and OUT/report.json.")
    add_register_arguments(p)
    p.set_defaults(func=_run_register)


def _run_register(args):
    from .pipeline import register_command

    register_command(args)


def _add_demo(sub):
    p = sub.add_parser("demo", help="simulate a knee, register it, evaluate it (no data needed)",
                       description="End to end on data made here: simulate a knee flexion sequence, register it "
                                   "from an automatic start, evaluate against the truth, write a kinematics plot.")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--realism", choices=["none", "fluoro"], default="none")
    p.add_argument("--translation", default="none", metavar="none|bundled|MODEL_DIR")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_run_demo)


def _run_demo(args):
    from .pipeline import demo_command

    demo_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluoro2drr", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fluoro2drr {__version__}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: FLUORO2DRR_THREADS or all cores; use 1 when "
                             "other jobs share the CPU: oversubscribed threads are many times slower)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_simulate(sub)
    _add_register(sub)
    _add_evaluate(sub)
    try:
        from .translation.commands import add_train_parser, add_translate_parser
    except ImportError:  # the translation package is optional for the geometry-only commands
        pass
    else:
        add_translate_parser(sub)
        add_train_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import InputError

    threads = args.threads or int(os.environ.get("FLUORO2DRR_THREADS", "0") or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    try:
        args.func(args)
    except InputError as exc:
        print(f"fluoro2drr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fluoro2drr: interrupted; finished frames are on disk (use --resume to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

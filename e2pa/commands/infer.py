"""``e2pa infer``: predict cases with a trained checkpoint; writes predictions, energy maps, pictures.

    e2pa infer --checkpoint RUN/checkpoints/best.pt --input CASE_DIR [CASE_DIR ...] --out DIR
               [--modalities flair,t1ce] [--layout e2pa|flat] [--data dataset.json]
               [--overwrite | --skip-existing] [--maps none|weights|all] [--device auto] [--overlap 0.5]

Inputs: BraTS case folders (or a folder of them), one case's NIfTI files, an nnU-Net ``imagesTs``
folder (``<case>_0000.nii.gz`` ...) or MSD 4-D images; the channels of the last two are named by
the dataset.json beside them (or ``--data``). Each case is written as a whole (a case folder is
built under a temporary name, then renamed); a case that fails is reported and the others still
run (exit status 1 with a summary).
"""

from __future__ import annotations

import argparse
import sys

from e2pa.commands import CommandError, overlap_fraction, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="predict cases; save labels, energy maps and an overview PNG",
        description="Sliding-window inference in each input's own geometry. Inputs: "
        "case folders, folders of case folders, one case's NIfTI files, an "
        "nnU-Net imagesTs folder or MSD 4-D images.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by e2pa train")
    p.add_argument("--input", required=True, nargs="+", help="case folder(s), a folder of cases, or NIfTI files")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per case, or flat: see --layout)")
    p.add_argument(
        "--layout",
        choices=("e2pa", "flat"),
        default="e2pa",
        help="e2pa: OUT/<case>/ with the label map, energy maps and an overview PNG; flat: only "
        "OUT/<case>.nii.gz label maps — nnU-Net's predictions layout and the official BraTS "
        "evaluator's naming (label values: the training data's convention)",
    )
    p.add_argument(
        "--data",
        help="dataset.json naming the channels of nnU-Net channel files or 4-D images "
        "(default: the one beside the input folder)",
    )
    p.add_argument("--modalities", help="comma-separated subset to use, e.g. flair,t1ce (default: all found)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    existing.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep case folders that are already complete (continue an interrupted batch)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--overlap",
        type=overlap_fraction,
        default=None,
        help="sliding-window overlap in [0, 1) (default 0.5: the overlap validation during training uses)",
    )
    p.add_argument("--sw-batch-size", type=positive_int, default=2)
    p.add_argument(
        "--maps",
        choices=("none", "weights", "all"),
        default="weights",
        help="per-modality maps to write: none, the modality weights (default), or weights, "
        "free energies and the fused energy",
    )
    p.add_argument(
        "--maps-dtype",
        choices=("int16", "float32"),
        default="int16",
        help="storage of the maps (default int16, scaled: half the size of float32, read back as floats)",
    )
    p.add_argument("--no-energy-maps", action="store_true", help="same as --maps none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over a case's windows")
    p.set_defaults(func=run, log_file="infer.log")


def run(args: argparse.Namespace) -> int:
    from e2pa.engine.checkpoint import CheckpointError
    from e2pa.engine.inference import SW_OVERLAP, infer, iter_modalities

    try:
        report = infer(
            args.checkpoint,
            args.input,
            args.out,
            modalities=iter_modalities(args.modalities),
            overwrite=args.overwrite,
            skip_existing=args.skip_existing,
            device=args.device,
            overlap=SW_OVERLAP if args.overlap is None else args.overlap,
            sw_batch_size=args.sw_batch_size,
            layout=args.layout,
            dataset_json=args.data,
            maps="none" if args.no_energy_maps else args.maps,
            maps_dtype=args.maps_dtype,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except CheckpointError as error:
        raise CommandError(str(error)) from None
    total = len(report.failures) + len(report.written) + len(report.skipped)
    if report.skipped:
        print(f"e2pa infer: {len(report.skipped)} of {total} case(s) were already complete and kept", file=sys.stderr)
    if report.failures:
        print(
            f"e2pa infer: {len(report.failures)} of {total} case(s) failed: {', '.join(report.failures)}",
            file=sys.stderr,
        )
        return 1
    return 0

"""``e2pa infer``: predict cases with a trained checkpoint; writes predictions, energy maps, pictures.

    e2pa infer --checkpoint RUN/checkpoints/best.pt --input CASE_DIR [CASE_DIR ...] --out DIR
               [--modalities flair,t1ce] [--layout e2pa|flat] [--data dataset.json] [--overwrite]
               [--device auto] [--overlap 0.5]

Inputs: BraTS case folders (or a folder of them), one case's NIfTI files, an nnU-Net ``imagesTs``
folder (``<case>_0000.nii.gz`` ...) or MSD 4-D images; the channels of the last two are named by
the dataset.json beside them (or ``--data``).
"""
from __future__ import annotations

import argparse
import sys

from e2pa.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("infer", help="predict cases; save labels, energy maps and an overview PNG",
                              description="Sliding-window inference in each input's own geometry. Inputs: "
                                          "case folders, folders of case folders, one case's NIfTI files, an "
                                          "nnU-Net imagesTs folder or MSD 4-D images.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by e2pa train")
    p.add_argument("--input", required=True, nargs="+", help="case folder(s), a folder of cases, or NIfTI files")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per case, or flat: see --layout)")
    p.add_argument("--layout", choices=("e2pa", "flat"), default="e2pa",
                   help="e2pa: OUT/<case>/ with the label map, energy maps and an overview PNG; flat: only "
                        "OUT/<case>.nii.gz label maps — nnU-Net's predictions layout and the official BraTS "
                        "evaluator's naming (label values: the training data's convention)")
    p.add_argument("--data", help="dataset.json naming the channels of nnU-Net channel files or 4-D images "
                                  "(default: the one beside the input folder)")
    p.add_argument("--modalities", help="comma-separated subset to use, e.g. flair,t1ce (default: all found)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--device", default="auto")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap (default 0.5: the overlap validation during training uses)")
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--no-energy-maps", action="store_true", help="only the label map and overview")
    p.set_defaults(func=run, log_file="infer.log")


def run(args: argparse.Namespace) -> int:
    from e2pa.engine.checkpoint import CheckpointError
    from e2pa.engine.inference import SW_OVERLAP, infer, iter_modalities

    try:
        report = infer(args.checkpoint, args.input, args.out, modalities=iter_modalities(args.modalities),
                       overwrite=args.overwrite, device=args.device,
                       overlap=SW_OVERLAP if args.overlap is None else args.overlap,
                       sw_batch_size=args.sw_batch_size, energy_maps=not args.no_energy_maps, layout=args.layout,
                       dataset_json=args.data)
    except CheckpointError as error:
        raise CommandError(str(error)) from None
    if report.failures:
        print(f"e2pa infer: {len(report.failures)} of {len(report.failures) + len(report.written)} case(s) failed: "
              f"{', '.join(report.failures)}", file=sys.stderr)
        return 1
    return 0

"""``e2pa score``: score any folder of predicted label maps against a data set's labels.

    e2pa score --pred DIR --data DIR|dataset.json [--convention e2pa|official] [--out DIR]
               [--split all|training|validation|test] [--missing error|skip|penalize] [--labels NAME]
               [--overwrite]

Predictions are matched to cases by id: ``<case>.nii.gz`` (nnU-Net, official BraTS naming),
``<case>_pred.nii.gz`` or ``<case>/<case>_pred.nii.gz`` (``e2pa infer``). Global and lesion-wise
Dice and HD95 per region, per case and on average; ``--convention official`` reproduces the
official BraTS evaluator (see :mod:`e2pa.engine.scoring`).
"""

from __future__ import annotations

import argparse

from e2pa.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="global and lesion-wise Dice/HD95 of a predictions folder (ours, nnU-Net's, anyone's)",
        description="Score predicted label maps against the labels of a data set, matched by case id. Writes "
        "scores_per_case.csv, scores_summary.csv, scores.json and scores.md to --out.",
    )
    p.add_argument("--pred", required=True, help="folder of predicted label maps")
    p.add_argument(
        "--data",
        required=True,
        help="the labelled data: BraTS folder, Decathlon or nnU-Net dataset.json (or its folder, or "
        "nnU-Net's labelsTr), or a folder of label maps <case>.nii.gz / <case>-seg.nii.gz "
        "(then --labels)",
    )
    p.add_argument(
        "--convention",
        choices=("e2pa", "official"),
        default="e2pa",
        help="e2pa (default): finite, mm, every case counts, missed and false-positive lesions "
        "penalised; official: the numbers of the official BraTS evaluator (brats-evaluation "
        "0.0.10): global HD95 in voxels, NaN for regions empty in both, 373/inf penalties",
    )
    p.add_argument("--out", help="folder for the score files (default: print the summary only)")
    p.add_argument(
        "--split",
        choices=("all", "training", "validation", "test"),
        default="all",
        help="which labelled cases must have a prediction (default all)",
    )
    p.add_argument(
        "--missing",
        choices=("error", "skip", "penalize"),
        default="error",
        help="a case without a prediction: error (default), skip it, or penalize it as the official "
        "table does (HD95 373, the rest 0)",
    )
    p.add_argument(
        "--labels",
        help="label convention of a plain folder of label maps (brats2021, brats2023, "
        "brats2024, msd); read from the data set otherwise",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing score files in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from e2pa.engine.scoring import markdown, score_folder, write_report
    from e2pa.io import OutputExistsError

    try:
        report = score_folder(
            args.pred,
            args.data,
            convention=args.convention,
            split=args.split,
            missing=args.missing,
            label_convention=args.labels,
        )
        written = write_report(report, args.out, overwrite=args.overwrite) if args.out else []
    except (OutputExistsError, ValueError) as error:  # DataError is a ValueError; the CLI reports both alike
        raise CommandError(str(error)) from None
    print(markdown(report), end="")
    if written:
        print(f"score files written to {args.out}")
    return 0

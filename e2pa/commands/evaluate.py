"""``e2pa evaluate``: Dice and HD95 per region and case; optionally over all modality subsets.

    e2pa evaluate --checkpoint CKPT --data DIR|dataset.json --out DIR [--split validation]
                  [--missing-modalities] [--max-cases N] [--overwrite] [--include-training]

``--split validation`` scores the cases the run held out (recorded by ``e2pa train`` in the
checkpoint and in ``RUN/split.json``); scoring cases the model was trained on needs
``--include-training``. The output folder is checked before anything is computed.
"""

from __future__ import annotations

import argparse

from e2pa.commands import CommandError, nonnegative_int, overlap_fraction


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Dice/HD95 per region; --missing-modalities for the robustness table",
        description="Evaluate a checkpoint on labelled cases. Empty masks follow the BraTS "
        "convention and are counted, never dropped.",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="BraTS folder, dataset.json or MSD task folder")
    p.add_argument("--out", required=True, help="folder for per_case.csv, summary.csv/.md, robustness.csv/.md")
    p.add_argument(
        "--split",
        choices=("validation", "test", "training", "all"),
        default="validation",
        help="validation (default): the cases the run held out, as it recorded them",
    )
    p.add_argument(
        "--include-training",
        action="store_true",
        help="allow scoring cases the checkpoint was trained on (flagged in the summary)",
    )
    p.add_argument(
        "--labels",
        choices=("auto", "brats2021", "brats2023", "msd"),
        default="auto",
        help="label convention of the label maps (auto: from the file names or dataset.json)",
    )
    p.add_argument(
        "--allow-outside-paths", action="store_true", help="let dataset.json entries point outside the dataset's folder"
    )
    p.add_argument(
        "--missing-modalities",
        action="store_true",
        help="evaluate every non-empty modality subset (2^M - 1) and write the robustness table",
    )
    p.add_argument("--max-cases", type=nonnegative_int, default=0, help="evaluate at most N cases (0: all)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--overlap",
        type=overlap_fraction,
        default=None,
        help="sliding-window overlap in [0, 1) (default 0.5: the overlap validation during training uses)",
    )
    p.set_defaults(func=run, log_file="evaluate.log")


def run(args: argparse.Namespace) -> int:
    from e2pa.engine.checkpoint import CheckpointError
    from e2pa.engine.evaluation import evaluate, markdown_table, summary_rows
    from e2pa.engine.inference import SW_OVERLAP
    from e2pa.io import FolderLock, OutputExistsError

    try:
        with FolderLock(args.out, "e2pa evaluate"):
            result = evaluate(
                args.checkpoint,
                args.data,
                args.out,
                split=args.split,
                missing_modalities=args.missing_modalities,
                max_cases=args.max_cases or None,
                overwrite=args.overwrite,
                device=args.device,
                overlap=SW_OVERLAP if args.overlap is None else args.overlap,
                include_training=args.include_training,
                labels=args.labels,
                allow_outside_paths=args.allow_outside_paths,
            )
    except (CheckpointError, OutputExistsError) as error:
        raise CommandError(str(error)) from None
    print(markdown_table(summary_rows(result.summary)), end="")
    print(f"tables written to {args.out}")
    return 0

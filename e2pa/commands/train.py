"""``e2pa train``: train (or resume) an E2PANet on BraTS-layout data, a dataset.json or an MSD task.

    e2pa train --data DIR|dataset.json --out RUN [--epochs 100] [--batch-size 2] [--roi 96]
               [--features 16 32 64 128] [--fusion energy|mean|concat] [--amp auto|on|off] ...
    e2pa train --out RUN --resume [--epochs N] [--resume-from last|previous|best] [--data MOVED_DATA]

The run folder is self-contained: config.json records the data as an absolute path and the run
folder as itself, so a copied or moved run resumes where it now is (writing only there), from any
working directory. A folder is locked while a process trains in it.

Under torchrun it trains with DistributedDataParallel (NCCL on GPUs, Gloo on CPU); rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from e2pa.commands import (
    CommandError,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval,
)

LABEL_CHOICES = ("auto", "brats2021", "brats2023", "msd")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or resume an E2PANet",
        description="Train an E2PANet; checkpoints are atomic and --resume continues exactly where a run stopped.",
    )
    p.add_argument("--data", help="BraTS folder, dataset.json or MSD task folder (not needed with --resume)")
    p.add_argument("--out", required=True, help="run folder (must be new or empty unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--resume-from",
        choices=("last", "previous", "best"),
        default="last",
        help="with --resume: the checkpoint to continue from (previous: the one before last.pt, "
        "for when last.pt is damaged)",
    )
    p.add_argument(
        "--labels",
        choices=LABEL_CHOICES,
        default="auto",
        help="label convention of the label maps (auto: from the file names or dataset.json)",
    )
    p.add_argument(
        "--allow-outside-paths", action="store_true", help="let dataset.json entries point outside the dataset's folder"
    )
    p.add_argument("--epochs", type=positive_int, help="number of epochs (default 100; with --resume: extend)")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument(
        "--roi",
        type=positive_int,
        nargs="+",
        default=[96],
        metavar="N",
        help="training patch size: one integer (cube) or three (default 96)",
    )
    p.add_argument("--lr", type=positive_float, default=3e-4)
    p.add_argument(
        "--features",
        type=positive_int,
        nargs="+",
        default=[16, 32, 64, 128],
        help="channels per level (its length is the number of levels)",
    )
    p.add_argument("--fusion", choices=("energy", "mean", "concat"), default="energy")
    p.add_argument("--esa-levels", type=int, nargs="*", default=[-1], help="levels with ESA (none: off)")
    p.add_argument("--steps", type=positive_int, default=3, help="energy propagation steps")
    p.add_argument("--beta", type=positive_float, default=1.0)
    p.add_argument("--temperature", type=positive_float, default=1.0, help="free-energy temperature T")
    p.add_argument("--prior-temperature", type=positive_float, default=1.0, help="prior temperature tau")
    p.add_argument("--lambda-ds", type=nonnegative_float, default=0.1, help="weight of the heads' deep supervision")
    p.add_argument("--lambda-ehf", type=nonnegative_float, default=0.01, help="weight of the cohort energy loss")
    p.add_argument("--lambda-esa", type=nonnegative_float, default=0.1, help="weight of the ESA energy")
    p.add_argument(
        "--modality-dropout",
        type=unit_interval,
        default=0.5,
        help="probability that a sample trains on a random non-empty subset of its modalities",
    )
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory)")
    p.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=0,
        metavar="STEPS",
        help="also save last.pt every STEPS steps (0: once per epoch)",
    )
    p.add_argument("--max-steps-per-epoch", type=nonnegative_int, default=0)
    p.add_argument("--val-every", type=positive_int, default=1)
    p.add_argument(
        "--validation-fraction",
        type=_validation_fraction,
        default=0.2,
        help="share of training cases held out when the data has no validation list (default 0.2)",
    )
    p.add_argument(
        "--amp",
        choices=("auto", "on", "off"),
        default="auto",
        help="mixed precision (auto: on for CUDA, bf16 where supported)",
    )
    p.add_argument(
        "--nonfinite",
        choices=("skip", "stop"),
        default="skip",
        help="a NaN/inf loss or gradient: skip the step, or stop with a message (fp16 loss-scale "
        "overflows are the GradScaler's business: skipped and counted, never stopping a run)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, log_file="train.log")


def config_from_args(args: argparse.Namespace):
    from e2pa.engine.training import TrainConfig

    if not args.data:
        raise CommandError("--data is required (unless --resume)")
    roi = tuple(args.roi) * 3 if len(args.roi) == 1 else tuple(args.roi)
    if len(roi) != 3:
        raise CommandError(f"--roi takes one or three integers; got {args.roi}")
    try:
        return TrainConfig(
            data=args.data,
            out=args.out,
            epochs=args.epochs or 100,
            batch_size=args.batch_size,
            roi_size=roi,
            lr=args.lr,
            modality_dropout=args.modality_dropout,
            checkpoint_every=args.checkpoint_every,
            max_steps_per_epoch=args.max_steps_per_epoch,
            val_every=args.val_every,
            num_workers=args.workers,
            amp=args.amp,
            seed=args.seed,
            device=args.device,
            nonfinite=args.nonfinite,
            progress=not args.no_progress,
            labels=args.labels,
            allow_outside_paths=args.allow_outside_paths,
            validation_fraction=args.validation_fraction,
            model=dict(
                features=tuple(args.features),
                fusion=args.fusion,
                esa_levels=tuple(args.esa_levels),
                steps=args.steps,
                beta=args.beta,
                temperature=args.temperature,
                prior_temperature=args.prior_temperature,
                use_checkpointing=args.checkpointing,
            ),
            loss=dict(lambda_ds=args.lambda_ds, lambda_ehf=args.lambda_ehf, lambda_esa=args.lambda_esa),
        )
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None


def resumed_config(args: argparse.Namespace):
    """The configuration of the run in ``--out``: its config.json, with the run folder being ``--out``
    itself (wherever it was first written) and the data as recorded (absolute, or relative to the run
    folder) unless ``--data`` points at where it is now."""
    from e2pa.engine.training import TrainConfig

    run_dir = Path(args.out)
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        saved["out"] = str(run_dir)
        cfg = TrainConfig(**saved)
    except FileNotFoundError:
        raise CommandError(f"--resume: {path} does not exist (is {args.out} a run folder?)") from None
    except (ValueError, TypeError) as error:
        raise CommandError(f"--resume: {path} is not a valid run configuration ({error})") from None
    if args.data:
        cfg.data = os.path.abspath(args.data)
    elif not os.path.isabs(cfg.data):
        # written by an older e2pa relative to where it ran; try the run folder, then here
        candidates = [run_dir / cfg.data, Path(cfg.data)]
        cfg.data = str(next((c for c in candidates if c.exists()), candidates[0]).absolute())
    if not Path(cfg.data).exists():
        raise CommandError(
            f"--resume: the data this run was trained on, {cfg.data} (from {path}), does not exist "
            f"any more; pass --data with its new location"
        )
    if args.epochs:
        cfg.epochs = args.epochs
    cfg.progress = not args.no_progress
    return cfg


def run(args: argparse.Namespace) -> int:
    from e2pa.engine.checkpoint import CheckpointError
    from e2pa.engine.training import TrainingError, train

    if args.resume_from != "last" and not args.resume:
        raise CommandError("--resume-from needs --resume")
    cfg = resumed_config(args) if args.resume else config_from_args(args)
    try:
        final = train(cfg, resume=args.resume, resume_from=args.resume_from)
    except (TrainingError, CheckpointError) as error:
        raise CommandError(str(error)) from None
    dice = final.get("val_dice_mean")
    print(
        f"trained {cfg.epochs} epoch(s); run folder {cfg.out}"
        + (f"; last validation mean Dice {dice:.3f}" if dice is not None else "")
    )
    return 0


def _validation_fraction(text: str) -> float:
    value = unit_interval(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (some cases must remain for training); got {text}")
    return value

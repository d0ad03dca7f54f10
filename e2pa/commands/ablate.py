"""``e2pa ablate``: the paper's ablation (implicit fusion, EHF, ESA, EHF+ESA) or a one-parameter sweep.

    e2pa ablate --out DIR [--data DIR|dataset.json] [--epochs 80] [--minutes 0] [--seeds 2]
                [--variants EHF EHF+ESA ...] [--sweep steps=1,3,5]

Without --data it builds a phantom cohort in DIR/data first.

    e2pa ablate --study 2d --cohort faults|clean --out DIR [--seeds 5] [--steps 300] [--variants ...]
                [--fault-rate 0.5] [--faults all] [--n-test 12] [--report docs/ablation-faults.md]

The fast 2-D study (issue #14; e2pa.engine.study): per-case anatomy, optional per-modality faults,
E2PANet with spatial_dims=2 on axial slices, >= 12 held-out cases, paired comparisons to the masked
mean with bootstrap CIs, and the faulted modality's weight inside vs outside its fault. Resumable:
finished runs (DIR/runs/<cohort>/<variant>/seed<k>.json) are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from e2pa.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ablate",
        help="train and compare the paper's variants, or sweep one energy parameter",
        description="Trains each variant under the same budget and seeds, evaluates each on "
        "the same held-out cases and writes ablation.csv/.md/.png.",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="BraTS folder or dataset.json (default: a phantom cohort built in OUT/data)")
    p.add_argument(
        "--epochs",
        type=int,
        default=80,
        help="training budget per run in epochs (default 80: 400 steps on the phantom cohort, about 4 "
        "min per run on 2 CPU cores; 20-40 epochs leave the runs in the steep part of training)",
    )
    p.add_argument("--minutes", type=float, default=0.0, help="optional wall-clock budget per run")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", nargs="+", help="subset of: implicit-mean implicit-concat EHF ESA EHF+ESA")
    p.add_argument(
        "--sweep", help="vary one parameter of EHF+ESA: temperature|prior_temperature|beta|steps|levels=v1,v2,..."
    )
    p.add_argument("--cases", type=int, default=12, help="phantom cases when no --data (default 12)")
    p.add_argument("--robustness-cases", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    study = p.add_argument_group("2-D fusion study (--study 2d)")
    study.add_argument(
        "--study",
        choices=("3d", "2d"),
        default="3d",
        help="3d: the paper's ablation with the training loop (default); 2d: the fast fusion study",
    )
    study.add_argument("--cohort", choices=("clean", "faults"), default="faults")
    study.add_argument("--steps", type=int, default=400, help="training steps per run (2d; default 400)")
    study.add_argument("--fault-rate", type=float, default=0.5)
    study.add_argument("--faults", default="all", help="fault kinds: all or a comma-separated subset")
    study.add_argument("--n-test", type=int, default=12, help="held-out cases (2d; default 12)")
    study.add_argument("--threads", type=int, default=1, help="torch threads (2d; default 1)")
    study.add_argument("--report", help="write the Markdown report (and .csv/.png beside it) to this path")
    p.set_defaults(func=run, log_file="ablate.log")


def run(args: argparse.Namespace) -> int:
    if args.study == "2d":
        return _run_study(args)
    from e2pa.engine.ablation import PAPER_VARIANTS, AblationConfig, parse_sweep, run_ablation
    from e2pa.io import OutputExistsError

    if args.epochs < 1 or args.seeds < 1 or args.minutes < 0:
        raise CommandError("--epochs and --seeds must be >= 1, --minutes >= 0")
    try:
        sweep = parse_sweep(args.sweep) if args.sweep else None
    except ValueError as error:
        raise CommandError(str(error)) from None
    data = args.data
    if data is None:
        from e2pa.data import write_phantom_cohort

        data = str(
            write_phantom_cohort(
                Path(args.out) / "data",
                args.cases,
                seed=0,
                shape=48,
                validation_fraction=0.25,
                overwrite=args.overwrite,
            )
        )
    try:
        path = run_ablation(
            AblationConfig(
                data=data,
                out=args.out,
                variants=tuple(args.variants or PAPER_VARIANTS),
                sweep=sweep,
                seeds=args.seeds,
                epochs=args.epochs,
                minutes=args.minutes,
                robustness_cases=args.robustness_cases,
                overwrite=args.overwrite,
            )
        )
    except (OutputExistsError, ValueError) as error:
        raise CommandError(str(error)) from None
    print(path.read_text())
    return 0


def _run_study(args: argparse.Namespace) -> int:
    import platform
    import subprocess
    import sys

    import torch

    from e2pa.data.faults import parse_fault_kinds
    from e2pa.engine.ablation import PAPER_VARIANTS, VARIANTS
    from e2pa.engine.study import StudyConfig, run_study, write_report

    if args.seeds < 1 or args.steps < 1 or args.n_test < 1 or args.threads < 1:
        raise CommandError("--seeds, --steps, --n-test and --threads must be >= 1")
    unknown = [v for v in (args.variants or ()) if v not in VARIANTS]
    if unknown:
        raise CommandError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        kinds = parse_fault_kinds(args.faults)
        cfg = StudyConfig(
            out=args.out,
            cohort=args.cohort,
            variants=tuple(args.variants or PAPER_VARIANTS),
            seeds=args.seeds,
            steps=args.steps,
            n_test=args.n_test,
            fault_rate=args.fault_rate,
            fault_kinds=kinds,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    torch.set_num_threads(args.threads)
    run_study(cfg)
    if args.report:
        import os

        commit = os.environ.get("E2PA_COMMIT", "")  # a study run from an exported snapshot names its commit
        if not commit:
            try:
                commit = (
                    subprocess.run(
                        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
                    ).stdout.strip()
                    or "unknown"
                )
            except OSError:
                commit = "unknown"
        import monai

        provenance = (
            f"Code: commit `{commit}`; torch {torch.__version__}, MONAI {monai.__version__}, Python "
            f"{platform.python_version()}; {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch thread(s) on a shared 2-core machine."
        )
        path = write_report(
            args.out, args.cohort, args.report, command="e2pa " + " ".join(sys.argv[1:]), provenance=provenance
        )
        print(path.read_text())
    return 0

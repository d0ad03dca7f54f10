"""``e2pa ablate``: the paper's ablation (implicit fusion, EHF, ESA, EHF+ESA) or a one-parameter sweep.

    e2pa ablate --out DIR [--data DIR|dataset.json] [--epochs 80] [--minutes 0] [--seeds 2]
                [--variants EHF EHF+ESA ...] [--sweep steps=1,3,5]

Without --data it builds a phantom cohort in DIR/data first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e2pa.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ablate", help="train and compare the paper's variants, or sweep one energy parameter",
                              description="Trains each variant under the same budget and seeds, evaluates each on "
                                          "the same held-out cases and writes ablation.csv/.md/.png.")
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="BraTS folder or dataset.json (default: a phantom cohort built in OUT/data)")
    p.add_argument("--epochs", type=int, default=80,
                   help="training budget per run in epochs (default 80: 400 steps on the phantom cohort, about 4 "
                        "min per run on 2 CPU cores; 20-40 epochs leave the runs in the steep part of training)")
    p.add_argument("--minutes", type=float, default=0.0, help="optional wall-clock budget per run")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variants", nargs="+", help="subset of: implicit-mean implicit-concat EHF ESA EHF+ESA")
    p.add_argument("--sweep", help="vary one parameter of EHF+ESA: temperature|prior_temperature|beta|steps|levels"
                                   "=v1,v2,...")
    p.add_argument("--cases", type=int, default=12, help="phantom cases when no --data (default 12)")
    p.add_argument("--robustness-cases", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run, log_file="ablate.log")


def run(args: argparse.Namespace) -> int:
    from e2pa.engine.ablation import VARIANTS, AblationConfig, parse_sweep, run_ablation
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
        data = str(write_phantom_cohort(Path(args.out) / "data", args.cases, seed=0, shape=48, validation_fraction=0.25,
                                        overwrite=args.overwrite))
    try:
        path = run_ablation(AblationConfig(data=data, out=args.out, variants=tuple(args.variants or VARIANTS),
                                           sweep=sweep, seeds=args.seeds, epochs=args.epochs, minutes=args.minutes,
                                           robustness_cases=args.robustness_cases, overwrite=args.overwrite))
    except (OutputExistsError, ValueError) as error:
        raise CommandError(str(error)) from None
    print(path.read_text())
    return 0

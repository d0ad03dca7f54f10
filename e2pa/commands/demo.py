"""``e2pa demo``: the main job on the embedded default (a phantom cohort built offline).

e2pa demo [--out e2pa-demo] [--minutes 3] [--cases 12] [--shape 48] [--overwrite]
"""

from __future__ import annotations

import argparse

from e2pa.commands import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="phantom cohort → train E2PA and SegResNet → infer → evaluate → report",
        description="Build a BraTS-like phantom cohort offline, train a small E2PANet and a "
        "same-size MONAI SegResNet under the same time budget, predict and score "
        "the held-out cases, and write report.md.",
    )
    p.add_argument("--out", default="e2pa-demo", help="output folder (default e2pa-demo)")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per model in minutes (default 3)")
    p.add_argument("--cases", type=int, default=12, help="phantom cases (default 12; a quarter are held out)")
    p.add_argument("--shape", type=int, default=48, help="phantom grid size (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    p.set_defaults(func=run, log_file="demo.log")


def run(args: argparse.Namespace) -> int:
    from e2pa.engine.demo import DemoConfig, run_demo
    from e2pa.io import OutputExistsError

    if args.minutes <= 0 or args.cases < 4 or args.shape < 32:
        raise CommandError("--minutes must be > 0, --cases >= 4 and --shape >= 32")
    try:
        run_demo(
            DemoConfig(
                out=args.out,
                minutes=args.minutes,
                cases=args.cases,
                shape=args.shape,
                seed=args.seed,
                overwrite=args.overwrite,
            )
        )
    except OutputExistsError as error:
        raise CommandError(str(error)) from None
    return 0

"""``e2pa phantom``: write a BraTS-like phantom cohort (offline, from nilearn's MNI152 anatomy).

    e2pa phantom --cases 8 --out phantoms [--seed 0] [--shape 64 | --shape 64 64 48 | --shape full]
                 [--spacing 2.0] [--labels brats2021|brats2023] [--validation-fraction 0.2] [--overwrite]
                 [--vary-anatomy] [--faults all|KIND,KIND... --fault-rate P [--max-faulted 2]]

With --faults each modality of each case is faulted with probability P (one kind drawn from KINDS:
ghosting, void, low_snr, misregistration, coverage, drift); each case folder then also holds
<case>_faultmap.nii.gz (uint8 [X, Y, Z, 4]: the kind code per modality and voxel, 0 = none) and
<case>_faults.json (modality, kind, parameters, voxel count).
"""

from __future__ import annotations

import argparse
import importlib.util
import math

from e2pa.commands import CommandError

LABEL_CONVENTIONS = ("brats2021", "brats2023")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="write a BraTS-like phantom cohort with a dataset.json",
        description="Write N phantom cases (FLAIR, T1, T1ce, T2 and a tumour label map) in BraTS folder "
        "layout plus a Decathlon-style dataset.json. Offline and deterministic for a seed.",
    )
    parser.add_argument("--cases", type=_positive_int, required=True, help="number of cases to write")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default 0); case i depends on (seed, i)")
    parser.add_argument(
        "--shape",
        nargs="+",
        type=_shape_item,
        default=[64],
        metavar="N",
        help="grid size: one integer for a cube, three for X Y Z, or 'full' for the whole "
        "template field of view at --spacing (default 64)",
    )
    parser.add_argument(
        "--spacing",
        type=_finite_float,
        default=2.0,
        metavar="MM",
        help="finest voxel size in mm; grows when the brain does not fit --shape (default 2.0)",
    )
    parser.add_argument(
        "--labels",
        choices=LABEL_CONVENTIONS,
        default="brats2021",
        help="label convention: brats2021 = 1 NCR, 2 ED, 4 ET; brats2023 = 1, 2, 3 (default brats2021)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=_finite_float,
        default=0.2,
        metavar="F",
        help="fraction of cases listed under 'validation' in dataset.json (default 0.2)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing case folders and dataset.json")
    parser.add_argument(
        "--vary-anatomy",
        action="store_true",
        help="deform and scale the template per case (cases differ in anatomy, not only in tumour)",
    )
    parser.add_argument(
        "--faults",
        metavar="KINDS",
        help="per-modality acquisition faults: 'all' or a comma-separated subset of ghosting, void, "
        "low_snr, misregistration, coverage, drift (needs --fault-rate)",
    )
    parser.add_argument(
        "--fault-rate",
        type=_finite_float,
        default=None,
        metavar="P",
        help="probability that a modality of a case is faulted (default 0.5 with --faults)",
    )
    parser.add_argument(
        "--max-faulted",
        type=_positive_int,
        default=2,
        metavar="N",
        help="at most N faulted modalities per case (default 2)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from e2pa.data.phantom import check_phantom_geometry, write_phantom_cohort  # nilearn: import only when run

    if importlib.util.find_spec("nilearn") is None:  # an optional dependency (the "demo" extra)
        raise CommandError("the phantom needs nilearn's bundled MNI152 templates: pip install 'e2pa[demo]'")
    try:
        shape = check_phantom_geometry(_grid(args.shape), args.spacing)
    except ValueError as error:
        raise CommandError(f"invalid --shape/--spacing: {error}") from None
    if not 0 <= args.validation_fraction < 1:
        raise CommandError(f"--validation-fraction must be in [0, 1); got {args.validation_fraction:g}")
    from e2pa.data.faults import parse_fault_kinds

    if args.fault_rate is not None and args.faults is None:
        raise CommandError("--fault-rate needs --faults KINDS (e.g. --faults all)")
    try:
        kinds = parse_fault_kinds(args.faults) if args.faults is not None else ()
    except ValueError as error:
        raise CommandError(f"--faults: {error}") from None
    rate = (0.5 if args.fault_rate is None else args.fault_rate) if kinds else 0.0
    if not 0 <= rate <= 1:
        raise CommandError(f"--fault-rate must be in [0, 1]; got {rate:g}")
    json_path = write_phantom_cohort(
        args.out,
        args.cases,
        args.seed,
        shape=shape,
        spacing_mm=args.spacing,
        label_convention=args.labels,
        validation_fraction=args.validation_fraction,
        overwrite=args.overwrite,
        vary_anatomy=args.vary_anatomy,
        faults=kinds,
        fault_rate=rate,
        max_faulted=args.max_faulted,
    )
    print(f"wrote {args.cases} phantom case(s) to {json_path.parent} ({json_path})")
    return 0


def _grid(items: list[int | str]) -> int | tuple[int, ...] | None:
    """The parsed ``--shape`` words → what :func:`check_phantom_geometry` takes."""
    if items == ["full"]:
        return None
    if "full" in items or len(items) not in (1, 3):
        raise ValueError(f"--shape takes one integer, three integers or 'full'; got {' '.join(map(str, items))!r}")
    return items[0] if len(items) == 1 else tuple(items)


# Type functions: argparse turns their ArgumentTypeError into "argument --x: <message>" (exit 2).
def _parsed(convert, text: str, expected: str):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _parsed(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _parsed(int, text, "an integer in [0, 2**63)")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return value


def _shape_item(text: str) -> int | str:
    return "full" if text.strip().lower() == "full" else _parsed(int, text, "an integer or 'full'")


def _finite_float(text: str) -> float:
    value = _parsed(float, text, "a finite number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value

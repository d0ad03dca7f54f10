"""Freeze the official BraTS evaluator's numbers on the cases of ``_official_cases.py``.

Runs in a venv with ``brats-evaluation==0.0.10`` and ``panoptica==2.1.7`` (see ``_official_cases.py``
for the full command); exactly the official path: ``evaluate_single_exam`` with the bundled
``gli`` config on every prediction/reference pair, then ``parse_seg_results`` for the table. Writes
case id → region → the table's columns, plus the package versions and the command.
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import pandas as pd
from brats_evaluation import config_path, evaluate_single_exam, parse_seg_results
from panoptica import Panoptica_Evaluator

COLUMNS = {
    "dice": "global_dsc",
    "hd95": "global_hd95",
    "lesion_dice": "lesionwise_dsc_mean",
    "lesion_hd95": "lesionwise_hd95_mean",
    "tp": "all_instance_tp",
    "fp": "all_instance_fp",
    "fn": "all_instance_fn",
}
REGIONS = {"TC": "tc", "WT": "wt", "ET": "et", "NETC": "netc", "SNFH": "snfh", "RC": "rc"}


def main(folder: Path, out: Path) -> None:
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    results = {"metrics": [], "missings": []}
    for ref in sorted((folder / "ref").glob("*-seg.nii.gz")):
        case = ref.name[len("BraTS-GLI-") : -len("-seg.nii.gz")]
        pred = folder / "pred" / f"BraTS-GLI-{case}.nii.gz"
        results["metrics"].append(evaluate_single_exam(str(pred), str(ref), case, evaluator))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        raw.write_text(json.dumps(results, default=float))
        table_path = Path(tmp) / "table.csv"
        parse_seg_results(str(raw), str(table_path))
        table = pd.read_csv(table_path)
    frozen = {}
    for _, row in table.iterrows():
        if row["subject_id"] in ("mean", "std", "median"):
            continue
        frozen[str(row["subject_id"])] = {
            ours: {
                metric: (None if pd.isna(row[f"{col}_{theirs}"]) else float(row[f"{col}_{theirs}"]))
                for metric, col in COLUMNS.items()
            }
            for ours, theirs in REGIONS.items()
        }
    payload = {
        "tool": f"brats-evaluation {version('brats-evaluation')}, panoptica {version('panoptica')}, "
        "config gli, evaluate_single_exam + parse_seg_results",
        "command": "see tests/data/_official_cases.py",
        "cases": frozen,
    }
    out.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

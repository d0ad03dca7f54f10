#!/usr/bin/env bash
# The fast 2-D fusion study of issue #14 (docs/ablation-faults.md, docs/ablation-clean.md), in priority order:
# every step resumes (finished runs are skipped), so rerunning this script continues a killed study.
set -euo pipefail
OUT=${1:-/work/fusion-study}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD TRITON_INTERPRET=1 OMP_NUM_THREADS=1
E2PA="python -m e2pa ablate --study 2d --out $OUT --seeds 5 --steps 400 --n-test 12 --threads 1"
export E2PA_COMMIT=${E2PA_COMMIT:-$(git rev-parse --short HEAD)}
echo "commit $E2PA_COMMIT started $(date -u +%FT%TZ)"
$E2PA --cohort faults --variants implicit-mean EHF+ESA --report docs/ablation-faults.md > /dev/null
$E2PA --cohort clean --variants implicit-mean EHF+ESA --report docs/ablation-clean.md > /dev/null
$E2PA --cohort faults --variants implicit-mean implicit-concat EHF ESA EHF+ESA --report docs/ablation-faults.md > /dev/null
$E2PA --cohort faults --variants implicit-mean implicit-concat EHF ESA EHF+ESA EHF+ESA-raw \
    --report docs/ablation-faults.md > /dev/null
$E2PA --cohort clean --variants implicit-mean EHF+ESA EHF+ESA-raw --report docs/ablation-clean.md > /dev/null
echo "finished $(date -u +%FT%TZ)"

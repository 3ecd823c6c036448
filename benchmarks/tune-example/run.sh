#!/usr/bin/env bash
# The README's heatmap: `focalloop tune` on the demo's data (scikit-learn's digits, digit 8 kept
# at 2%: 1,656 8x8 images), every item labeled, in a throwaway embedded deployment. From the
# repository root, with the project installed:  bash benchmarks/tune-example/run.sh [OUT]
set -euo pipefail
out=${1:-docs/tune-example}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export FOCALLOOP_DATA_DIR="$work" FOCALLOOP_DATABASE_URL="sqlite:///$work/state.db"
python - "$work" <<'PY'
import sys

import numpy as np

from services.simulation.demo import digits_with_rare_class

data = digits_with_rare_class()
np.savez(
    f"{sys.argv[1]}/digits.npz",
    images=data.items,
    item_ids=np.array([f"d{i:04d}" for i in range(len(data.labels))]),
    labels=data.labels.astype(str),
)
PY
focalloop db upgrade
focalloop project create digits-tune --labels 0,1,2,3,4,5,6,7,8,9 --modality image \
    --image-size 8 --store "file://$work/store"
focalloop pool add digits-tune --from "$work/digits.npz"
focalloop datasets snapshot digits-tune
focalloop tune digits-tune --in-process --metric f1:8 --repeats 1 --out "$out"

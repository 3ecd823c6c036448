#!/usr/bin/env bash
# The GPU checks and GPU benchmark rows, in one pass, on a CUDA machine with the project's
# dependencies importable (run from the repository root):
#
#     OUT=gpu-output bash benchmarks/gpu/run.sh
#
# Steps, most valuable first, each under its own time limit so that a slow one cannot take the
# others' results: the CUDA tests (tests/gpu), `bench focal-loss --device cuda`, `bench device`,
# then `demo` on the CPU (the headline table under that machine's numpy/torch: how much it moves
# across versions) and on CUDA (the product's cycle with bf16 training). Results land in $OUT.
set -u
OUT=${OUT:-gpu-output}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=160
FOCALLOOP="python3 -m services.cli"
step() { echo "== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import sys, torch, numpy, sklearn; print(sys.version.split()[0], torch.__version__,
    torch.version.cuda, numpy.__version__, sklearn.__version__, torch.cuda.get_device_name())'
nproc

step imports
if ! python3 -c 'import services.cli, services.simulation.run, services.bench.device'; then
    echo "the project does not import here: nothing else can run"
    exit 1
fi

step tests
timeout 120 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider

step bench focal-loss
timeout 90 $FOCALLOOP bench focal-loss --device cuda --repeats 5 --json "$OUT/focal-loss-cuda.json"

step bench device
timeout 100 $FOCALLOOP bench device --device cuda --train-items 4096 --score-items 32768 --json "$OUT/device.json"

step demo on the CPU
FOCALLOOP_DEVICE=cpu timeout 110 $FOCALLOOP demo --out "$OUT/demo-cpu" --workers 14
step demo on CUDA
FOCALLOOP_DEVICE=cuda timeout 130 $FOCALLOOP demo --out "$OUT/demo-cuda" --workers 10
# The plots would exceed what comes back from the machine; results.json holds every figure.
rm -f "$OUT"/demo-*/*.png
step done

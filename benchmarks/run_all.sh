#!/usr/bin/env bash
# Runs every benchmark in sequence, on a quiet machine (one at a time: they time CPU work).
# Each rewrites its own results/*.json and its own section of docs/benchmarks.md.
# trl_vs_ours.py needs TRL 0.28.0 and weave (not in requirements.txt):
#   pip install trl==0.28.0 weave torch==2.13.0   # pin torch to the installed version so pip keeps it
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/t5_vs_pytorch.py "$@"
python benchmarks/online_vs_offline.py
python benchmarks/trl_vs_ours.py
# On a GPU or TPU (issue 9; not run on CPU): t5-large in bfloat16, MFU against the measured matmul peak
#   python benchmarks/accelerator.py

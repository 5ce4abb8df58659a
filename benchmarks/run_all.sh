#!/usr/bin/env bash
# Run every benchmark: tables to stdout, JSON to results/benchmarks/<name>.json.
# About 3 minutes on a 2-core CPU (budget: under 10). Not tests: nothing here asserts on time.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-../.venv/bin/python}"
[ -x "$PY" ] || PY=python
start=$SECONDS
for name in inference training serving; do
  echo "=== benchmarks/$name.py"
  "$PY" -W ignore "$name.py"
  echo
done
echo "all benchmarks: $((SECONDS - start)) s"

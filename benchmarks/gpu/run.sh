#!/usr/bin/env bash
# Every CUDA path cfdeploy has without TensorRT, checked and timed in one call on a GPU machine without network:
#   benchmarks/gpu/run.sh RESULTS_DIR            # on the GPU machine (about 7 minutes at most)
#   benchmarks/gpu/run.sh RESULTS_DIR --dry-run  # the same steps on the CPU at tiny sizes (about 3 CPU-minutes)
# It installs the wheels prepare.sh put in .whl/ into a temporary site directory (only those the machine lacks),
# records the environment, then runs each step under its own time limit. A step that fails or runs out of time is
# recorded (exit code, seconds, the end of its stderr) in RESULTS_DIR/steps.json and the next step runs.
# RESULTS_DIR/NAME.json holds each step's figures; `python benchmarks/gpu_backends.py --render-run RESULTS_DIR`
# prints them as tables.
set -u
if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 RESULTS_DIR [--dry-run]" >&2
    exit 2
fi
results=$(mkdir -p "$1" && cd "$1" && pwd)
dry_run=0
[[ ${2:-} == --dry-run ]] && dry_run=1
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
started=$(date +%s)
total_budget=${GPU_RUN_BUDGET_S:-415}  # under 7 minutes, with room for the install and the summary
dry_budget=${GPU_RUN_DRY_BUDGET_S:-}  # the dry run's limit for every step, where its own are too short (a busy CPU)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$results/logs"
[[ -z ${GPU_RUN_STEPS:-} ]] && : > "$results/steps.jsonl"
touch "$results/steps.jsonl"

# One step: NAME BUDGET_S (GPU run; the dry run gets DRY_BUDGET_S) DRY_BUDGET_S COMMAND...
step() {
    local name=$1 budget=$2 own_dry_budget=$3
    shift 3
    if [[ -n ${GPU_RUN_STEPS:-} && $name != install && " $GPU_RUN_STEPS " != *" $name "* ]]; then
        return 0  # GPU_RUN_STEPS="refine dac" reruns only those steps
    fi
    (( dry_run )) && budget=${dry_budget:-$own_dry_budget}
    local left=$(( total_budget - ($(date +%s) - started) ))
    (( left < 1 )) && left=1
    (( budget > left )) && budget=$left
    echo "== $name (at most ${budget}s)" >&2
    local begin rc
    begin=$(date +%s.%N)
    timeout --kill-after=5 "$budget" "$@" > "$results/logs/$name.out" 2> "$results/logs/$name.err"
    rc=$?
    "$python" - "$results" "$name" "$rc" "$begin" "$(date +%s.%N)" "$budget" <<'PY'
import json, sys
from pathlib import Path

results, name, rc, begin, end, budget = sys.argv[1:]
rc = int(rc)
record = {"step": name, "rc": rc, "ok": rc == 0, "timed_out": rc in (124, 137), "seconds": round(float(end) - float(begin), 2),
          "budget_s": int(budget), "result": f"{name}.json" if (Path(results) / f"{name}.json").is_file() else None}
if rc != 0:
    record["stderr_tail"] = (Path(results) / "logs" / f"{name}.err").read_text(errors="replace")[-3000:]
with open(Path(results) / "steps.jsonl", "a") as steps:
    steps.write(json.dumps(record) + "\n")
print(f"   {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {record['seconds']}s", file=sys.stderr)
PY
}

site="$scratch/site"
export PYTHONPATH="$site:$root:$root/benchmarks:${PYTHONPATH:-}"
export CFDEPLOY_GPU_RUN_DRY=$dry_run
if (( dry_run )); then
    export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU's, even on a machine with a GPU
fi
steps="$root/benchmarks/gpu/steps.py"
device=cuda
if (( dry_run )); then
    device=cpu
    total_budget=${GPU_RUN_BUDGET_S:-900}
fi

step install 30 30 "$python" "$steps" install --results "$results" --wheels "$root/.whl" --site "$site"
step environment 15 20 "$python" "$steps" environment --results "$results"
step pytest_gpu 75 40 "$python" -m pytest "$root/tests/gpu" -m gpu -q -p no:cacheprovider -o addopts="" \
    --junitxml="$results/pytest_gpu.xml"
step backends_256 40 30 "$python" "$steps" backends --results "$results" --size 256 --scratch "$scratch"
step backends_1024 50 30 "$python" "$steps" backends --results "$results" --size 1024 --scratch "$scratch"
step encoder_clip 25 30 "$python" "$steps" encoder-clip --results "$results" --device "$device"
step edit_e2e 35 30 "$python" "$steps" edit --results "$results" --device "$device" --scratch "$scratch"
step refine 25 60 "$python" "$steps" refine --results "$results" --device "$device" --scratch "$scratch"
step train_fp32 45 60 "$python" "$steps" train --results "$results" --device "$device" --precision fp32 --scratch "$scratch"
step train_bf16 30 40 "$python" "$steps" train --results "$results" --device "$device" --precision bf16 --scratch "$scratch"
step dac 60 60 "$python" "$steps" dac --results "$results" --device "$device" --scratch "$scratch"

"$python" "$steps" summary --results "$results" --started "$started"

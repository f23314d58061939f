#!/usr/bin/env bash
# Export every CF-CLIP checkpoint in a folder to engines/<name>/, each with the prompt it was trained
# for precomputed (so that prompt edits without running CLIP).
#
# Usage: export/official_bundles.sh CHECKPOINT_DIR CLIP_WEIGHTS [more `cfdeploy export` options]
# e.g.:  export/official_bundles.sh ~/cf-clip/pretrained ~/clip/ViT-B-32.pt --force
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
checkpoints=$1
clip_weights=$2
shift 2
shopt -s nullglob
found=0
for checkpoint in "$checkpoints"/*.pt; do
  found=1
  prompt=$(cfdeploy inspect "$checkpoint" --json | python3 -c 'import json, sys; print(json.load(sys.stdin).get("trained_description") or "")')
  prompt_args=()
  if [ -n "$prompt" ]; then
    prompt_args=(--text "$prompt")
  fi
  cfdeploy export --checkpoint "$checkpoint" --clip-weights "$clip_weights" \
    --out "engines/$(basename "$checkpoint" .pt)" "${prompt_args[@]}" "$@"
done
if [ "$found" -eq 0 ]; then
  echo "error: $checkpoints: no .pt checkpoints found" >&2
  exit 2
fi

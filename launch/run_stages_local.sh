#!/usr/bin/env bash
# Run the three stages one by one on this machine, as separate commands that hand off by path
# (run_dir/wide/model.pt → imitate → run_dir/imitate/model.pt → finetune).
#   launch/run_stages_local.sh CONFIG [key=value ...]
# Re-running after a crash continues each unfinished stage from its last checkpoint.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [key=value ...]" >&2
  exit 2
fi
config=$1
shift
for stage in wide imitate finetune; do
  python -m gwtn_dist "$stage" "$config" "$@"
done

#!/usr/bin/env bash
# The three stages on this machine, one after the other, as separate commands that hand off by
# path (run_dir/wide/model.pt → imitate → run_dir/imitate/model.pt → finetune):
#   launch/local.sh CONFIG [key=value ...]
#   NPROC=2 launch/local.sh CONFIG ...     2 ranks under torchrun (DeepSpeed engines)
# Re-running after a crash or a stop (kill -USR1 <gwtn launch pid>, or touch RUN_DIR/PREEMPT)
# continues each unfinished stage from its last checkpoint.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: [NPROC=N] $0 CONFIG [key=value ...]" >&2
  exit 2
fi
launcher=(--style local --nproc-per-node "${NPROC:-1}")
for stage in wide imitate finetune; do
  python3 -m gwtn_dist launch "${launcher[@]}" -- "$stage" "$@"
done

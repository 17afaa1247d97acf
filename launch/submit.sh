#!/usr/bin/env bash
# Submit the three stages as three SLURM jobs, each starting when the one before succeeded:
#   launch/submit.sh [--SBATCH-OPTION ...] CONFIG [key=value ...]
#   e.g. launch/submit.sh configs/imagenet_resnet50.yaml run_dir=runs/r50
#        launch/submit.sh --partition=gpu --account=me configs/imagenet_resnet50.yaml
# Prints the job ids. Edit the arrays below; everything else is in launch/sbatch_stage.sh.
# Options before CONFIG go to every sbatch, after (so over) the arrays below.
set -euo pipefail
options=()
while [ $# -gt 0 ] && [[ $1 == --* ]]; do
  options+=("$1")
  shift
done
if [ $# -lt 1 ]; then
  echo "usage: $0 [--SBATCH-OPTION ...] CONFIG [key=value ...]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)

# --- resources of every stage (these override the #SBATCH lines of sbatch_stage.sh)
resources=(--nodes=1 --ntasks-per-node=8 --cpus-per-task=8)
# --- wall time per stage: a stage that runs out checkpoints and requeues itself
declare -A time=([wide]=08:00:00 [imitate]=04:00:00 [finetune]=08:00:00)
# --- preemption: the warning signal must be B:USR1 (see sbatch_stage.sh)
preemption=(--signal=B:USR1@300 --requeue --open-mode=append)
# --- launcher: exported to the jobs (sbatch passes the environment on)
export GWTN_STYLE=${GWTN_STYLE:-srun-torchrun}

dependency=()  # ${a[@]+"${a[@]}"}: an empty array is an error under set -u on bash < 4.4
for stage in wide imitate finetune; do
  id=$(sbatch --parsable --job-name="gwtn-$stage" --time="${time[$stage]}" "${resources[@]}" \
    "${preemption[@]}" --kill-on-invalid-dep=yes ${dependency[@]+"${dependency[@]}"} \
    ${options[@]+"${options[@]}"} \
    "$here/sbatch_stage.sh" "$stage" "$@")
  echo "$stage: job ${id%%;*}"
  dependency=(--dependency="afterok:${id%%;*}")
done

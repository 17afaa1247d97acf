#!/usr/bin/env bash
# One gwtn command as a SLURM batch job: a stage (wide, imitate, finetune) or all of them (run).
#   sbatch launch/sbatch_stage.sh STAGE CONFIG [key=value ...]
#   e.g. sbatch launch/sbatch_stage.sh wide configs/imagenet_resnet50.yaml run_dir=runs/r50
# launch/submit.sh submits the three stages as a chain; options given to sbatch override the
# #SBATCH lines below. Edit them for your cluster (account, partition, GPUs).
#
#SBATCH --job-name=gwtn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8          # ranks per node: one per GPU
#SBATCH --cpus-per-task=8            # data-loader workers + 1 per rank
##SBATCH --gpus-per-node=8           # uncomment on GPU partitions
##SBATCH --partition=gpu             # and name yours
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300          # 5 min before the end SLURM sends USR1 to this script,
#                                    # which makes the ranks checkpoint and requeues the job
#SBATCH --requeue                    # the requeued job resumes where the last one stopped
#SBATCH --open-mode=append           # and appends to the same log
#SBATCH --output=%x-%j.out           # gwtn-<job id>.out; submit.sh: gwtn-<stage>-<job id>.out
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch $0 STAGE CONFIG [key=value ...]" >&2
  exit 2
fi

# --- how the ranks start: gwtn launch --help (styles srun, srun-torchrun, deepspeed-slurm,
#     deepspeed-nossh, deepspeed-hostfile); GWTN_STYLE from the submitting shell wins.
launcher=(--style "${GWTN_STYLE:-srun-torchrun}" --signal USR1)  # the signal of --signal above
# --- the environment of every rank (srun and torchrun pass it on)
environment=(
  "OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"
  # "NCCL_DEBUG=WARN"
  # "DS_ACCELERATOR=cpu"             # DeepSpeed on CPU-only nodes
)
# --- the Python that has gwtn_dist installed: activate your venv or `module load` above
#     these lines, or name it, e.g. python=("$HOME/venvs/gwtn/bin/python")
python=(python3)

# (the length check: "${a[@]}" of an empty array fails under set -u on bash < 4.4)
[ ${#environment[@]} -eq 0 ] || export "${environment[@]}"
echo "job ${SLURM_JOB_ID:-} start $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-?}: $*"
# exec: the launcher replaces this shell, so SLURM's USR1 for the batch shell reaches it.
exec "${python[@]}" -m gwtn_dist launch "${launcher[@]}" -- "$@"

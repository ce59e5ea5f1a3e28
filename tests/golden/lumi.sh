#!/bin/bash
# shellcheck disable=SC2016  # single-quoted values are literal on purpose: nothing in them may expand
# Anvil job script, rendered by submit.py from trainer/launch/templates/slurm.sh.j2; the frozen config is
# config.json beside it. Resubmit it as is, from any directory: `sbatch <path to this file>`. It resumes.
#SBATCH --job-name=run-1
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=7
#SBATCH --gpus-per-node=8
#SBATCH --time=12:00:00
#SBATCH --partition=standard-g
#SBATCH --account=project_465000001
#SBATCH --exclusive
#SBATCH --mem=480G
#SBATCH --chdir=/scratch/project_465000001/anvil
#SBATCH --output=/scratch/project_465000001/anvil/jobs/run-1/logs/%x-%j.out
#SBATCH --error=/scratch/project_465000001/anvil/jobs/run-1/logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@300
#SBATCH --requeue
#SBATCH --wait-all-nodes=1

set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "anvil: this script runs under SLURM: sbatch $0 (or python submit.py with the job's config)" >&2
    exit 2
fi

JOB_DIR=/scratch/project_465000001/anvil/jobs/run-1
CODE_DIR=/scratch/project_465000001/anvil
PYTHON=python
MAX_RESTARTS=3
RETRY_ON_FAILURE=0
PREEMPTED_EXIT=75
PREEMPT_FILE="$JOB_DIR"/PREEMPT
PREEMPTED_FILE="$JOB_DIR"/PREEMPTED
DONE_FILE="$JOB_DIR"/DONE
FAILED_FILE="$JOB_DIR"/FAILED
ERROR_FILE="$JOB_DIR"/ERROR
EVENTS_FILE="$JOB_DIR"/events.jsonl
SECRET_NAMES='TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL|PRIVATE_KEY'
RESTART=${SLURM_RESTART_COUNT:-0}
LOCAL=0
if [ "${ANVIL_EXECUTOR:-slurm}" = local ]; then LOCAL=1; fi
cd "$CODE_DIR"

# event NAME [REASON]: one JSON line per lifecycle event, for status tools (the reason made safe for JSON).
event() {
    local reason
    reason=$(printf '%s' "${2:-}" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')
    printf '{"time": "%s", "event": "%s", "job_id": "%s", "restart": %d, "nodes": "%s", "reason": "%s"}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$SLURM_JOB_ID" "$RESTART" "${SLURM_JOB_NODELIST:-}" "$reason" \
        >>"$EVENTS_FILE"
}

# trainer_error: the first line of the trainer's own reason for stopping, if it wrote one.
trainer_error() {
    if [ -s "$ERROR_FILE" ]; then printf ' (%s)' "$(head -n 1 "$ERROR_FILE" | cut -c1-300)"; fi
}

fail() {
    printf '%s\njob %s, restart %s, %s\n' "$1" "$SLURM_JOB_ID" "$RESTART" "$(date -u)" >"$FAILED_FILE"
    event failed "$1"
    echo "anvil: FAILED: $1" >&2
    exit "${2:-1}"
}

# requeue REASON: run again from the last checkpoint, at most MAX_RESTARTS times per SLURM job.
requeue() {
    if [ "$RESTART" -ge "$MAX_RESTARTS" ]; then
        fail "restart limit reached (job.max_restarts = $MAX_RESTARTS) after: $1"
    fi
    event requeue "$1"
    echo "anvil: requeueing ($1); restart $((RESTART + 1)) of at most $MAX_RESTARTS"
    if [ "$LOCAL" = 1 ]; then
        exit "$PREEMPTED_EXIT" # the local executor runs the script again
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    fail "could not requeue after: $1 (job cancelled, or requeue not allowed); resubmit with: sbatch $JOB_DIR/slurm.sh"
}

report_environment() {
    echo "anvil environment report: job $SLURM_JOB_ID, restart $RESTART, host $(hostname), $(date -u)"
    echo "--- environment (values of secret-looking names redacted)"
    env -0 | LC_ALL=C sort -z | sed -z -E "s/^([^=]*($SECRET_NAMES)[^=]*)=.*/\\1=<redacted>/I" | tr '\0' '\n'
    echo "--- python and torch"
    "${RUN[@]}" "$PYTHON" -c 'import sys; print(sys.version); import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "hip", torch.version.hip, "devices", torch.cuda.device_count())' || true
    if command -v nvidia-smi >/dev/null; then nvidia-smi || true; fi
    if command -v rocm-smi >/dev/null; then rocm-smi --showproductname || true; fi
}

# A new attempt starts clean: markers left by the previous one would mislead the trainer and status.
mkdir -p "$JOB_DIR/logs" "$JOB_DIR/checkpoints"
rm -f "$PREEMPT_FILE" "$PREEMPTED_FILE" "$DONE_FILE" "$FAILED_FILE" "$ERROR_FILE"
echo "$RESTART" >"$JOB_DIR"/RESTARTS
event start
echo "anvil: job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart $RESTART on ${SLURM_JOB_NODELIST:-?} at $(date -u)"

# SLURM sends USR2 job.signal_lead seconds before the time limit (or on `scancel --signal=USR2 --batch`),
# and TERM on cancellation: the trainer polls the trigger every step, checkpoints and exits.
preempt() {
    echo "anvil: $1 received at $(date -u +%H:%M:%S); asking the trainer to checkpoint and stop"
    touch "$PREEMPT_FILE"
}
trap 'preempt USR2' USR2
trap 'preempt TERM' TERM

export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export OMP_NUM_THREADS=7
export WANDB_DIR="$JOB_DIR"
# Compile caches on node-local disk: on Lustre/NFS they race between ranks and exhaust inode quotas.
NODE_LOCAL=/tmp/"anvil-${USER:-user}-$SLURM_JOB_ID"
export TRITON_CACHE_DIR="$NODE_LOCAL/triton" TORCHINDUCTOR_CACHE_DIR="$NODE_LOCAL/inductor"
# MIOpen's SQLite databases fail on shared filesystems (file locking).
export MIOPEN_USER_DB_PATH="$NODE_LOCAL/miopen" MIOPEN_CUSTOM_CACHE_DIR="$NODE_LOCAL/miopen"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3
export NCCL_NET_GDR_LEVEL=PHB
export CXI_FORK_SAFE=1
export CXI_FORK_SAFE_HP=1
export FI_CXI_DISABLE_CQ_HUGETLB=1
export NCCL_DEBUG=WARN

RUN=()
RUN=(singularity exec --bind "$JOB_DIR" --bind "$CODE_DIR" --bind /var/spool/slurmd --bind /opt/cray --bind /usr/lib64/libcxi.so.1 --bind /scratch --bind /project --bind /flash /appl/local/laifs/containers/lumi-multitorch-latest.sif)

report_environment >"$JOB_DIR/logs/env-$SLURM_JOB_ID-$RESTART.txt" 2>&1 || true

# trainer.train.torchrun is torchrun (same arguments) that reports a failed rank in one line, not a traceback.
if [ "$LOCAL" = 1 ]; then
    # Local executor: one node, no SLURM daemons; torchrun starts the ranks on this machine.
    LAUNCH=("${RUN[@]}" "$PYTHON" -m trainer.train.torchrun --standalone --nnodes=1
        --nproc-per-node=8 -m trainer.train "$JOB_DIR")
else
    # Rendezvous on the first node, at a port derived from the job id: fixed ports collide.
    MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_ADDR=$(scontrol show node "$MASTER_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
    export MASTER_ADDR="${MASTER_ADDR:-$MASTER_NODE}"
    export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    # One task per device; the trainer takes its rank from SLURM_PROCID / SLURM_LOCALID.
    LAUNCH=(srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=8
        --cpus-per-task=7
        "--cpu-bind=mask_cpu:0x00fe000000000000,0xfe00000000000000,0x0000000000fe0000,0x00000000fe000000,0x00000000000000fe,0x000000000000fe00,0x000000fe00000000,0x0000fe0000000000"
        "${RUN[@]}" "$PYTHON" -m trainer.train "$JOB_DIR")
fi

echo "anvil: launching: ${LAUNCH[*]}"
# In the background, so that the traps above run while the step is going (bash defers them otherwise).
"${LAUNCH[@]}" &
STEP_PID=$!
while :; do
    STEP_RC=0
    wait "$STEP_PID" || STEP_RC=$?
    # A status over 128 with the step still alive means a trapped signal interrupted `wait`.
    if [ "$STEP_RC" -gt 128 ] && kill -0 "$STEP_PID" 2>/dev/null; then continue; fi
    break
done
echo "anvil: step exited with code $STEP_RC at $(date -u)"

if [ -e "$PREEMPTED_FILE" ] || [ "$STEP_RC" -eq "$PREEMPTED_EXIT" ]; then
    requeue "preempted at step $(cat "$PREEMPTED_FILE" 2>/dev/null || echo '?'), checkpoint saved"
elif [ "$STEP_RC" -eq 0 ]; then
    printf 'job %s, restart %s, %s\n' "$SLURM_JOB_ID" "$RESTART" "$(date -u)" >"$DONE_FILE"
    event "done"
    echo "anvil: DONE"
elif [ "$RETRY_ON_FAILURE" = 1 ]; then
    requeue "trainer exited with code $STEP_RC$(trainer_error)"
else
    fail "trainer exited with code $STEP_RC$(trainer_error); see $JOB_DIR/logs/" "$STEP_RC"
fi

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
    echo "anvil: this script runs under SLURM: sbatch $0 (or "'python submit.py'" with the job's config)" >&2
    exit 2
fi

JOB_DIR=/scratch/project_465000001/anvil/jobs/run-1
CODE_DIR=/scratch/project_465000001/anvil
PYTHON=python
MAX_RESTARTS=3
RETRY_ON_FAILURE=0
REQUEUED_ERRORS=lost # requeued even without job.retry_on_failure
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

# Stop signals (SLURM: TERM on scancel, preemption and the time limit, USR2 before the time limit; the local executor:
# INT for Ctrl-C, TERM, HUP) are noted, never fatal: the trainer is told through the trigger file (rank 0 polls it
# every step; the ranks usually got the signal themselves too), checkpoints and exits, and the end decides what next.
SIGNAL="" SIGNAL_AT=0
note_signal() {
    if [ -z "$SIGNAL" ]; then SIGNAL=$1 SIGNAL_AT=$(date +%s); fi
    echo "anvil: $1 received at $(date -u +%H:%M:%S); asking the trainer to checkpoint and stop" 2>/dev/null || true
    touch "$PREEMPT_FILE" 2>/dev/null || true
}
for sig in USR2 TERM INT HUP; do
    # shellcheck disable=SC2064  # the signal's name goes in now, on purpose
    trap "note_signal $sig" "$sig"
done
cd "$CODE_DIR"

# Every write into the job directory is allowed to fail (a full disk): the job still ends with its reason told.
event() {
    local reason
    reason=$(printf '%s' "${2:-}" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')
    printf '{"time": "%s", "event": "%s", "job_id": "%s", "restart": %d, "nodes": "%s", "reason": "%s"}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$SLURM_JOB_ID" "$RESTART" "${SLURM_JOB_NODELIST:-}" "$reason" \
        >>"$EVENTS_FILE" 2>/dev/null || true
}

# tell REASON: put the job's end where the user looks: the SLURM job's comment (`squeue -o %k`, `scontrol show job`,
# and sweep.py status), which lives in slurmctld, not on the job's own file system.
tell() {
    if [ "$LOCAL" = 0 ]; then
        scontrol update JobId="$SLURM_JOB_ID" Comment="anvil: $(printf '%s' "$1" | tr -d '\000-\037' | cut -c1-1000)" \
            >/dev/null 2>&1 || true
    fi
}

# The trainer's own reason for stopping (its ERROR marker: `<kind>: <message>`), else what its exit code says: sets
# TRAINER_KIND and TRAINER_ERROR (" (<reason>)", or empty). Builtins only, in this shell: when SLURM ends a job on a
# node failure it sends TERM to every process of the job at this very moment, which kills a child process (a `head`,
# a command substitution's subshell) and would leave the reason empty; this shell traps it.
read_trainer_error() {
    local line=""
    if [ -s "$ERROR_FILE" ]; then IFS= read -r line <"$ERROR_FILE" 2>/dev/null || true; fi
    TRAINER_KIND=${line%%:*}
    TRAINER_ERROR=""
    if [ -n "$line" ]; then
        TRAINER_ERROR=" (${line:0:300})"
    elif [ "$1" -gt 128 ]; then
        TRAINER_ERROR=" (killed by SIG$(kill -l $(($1 - 128)) 2>/dev/null || echo "nal $(($1 - 128))"))"
    elif [ "$1" = 74 ]; then
        TRAINER_ERROR=" (disk: out of space or failing where the job writes; the trainer could not record more)"
    fi
    if [ -z "$TRAINER_KIND" ]; then
        case $1 in
        2) TRAINER_KIND=refused ;;
        74) TRAINER_KIND=disk ;;
        76) TRAINER_KIND=lost ;;
        124) TRAINER_KIND=hung ;;
        *) if [ "$1" -gt 128 ]; then TRAINER_KIND=killed; else TRAINER_KIND=crash; fi ;;
        esac
    fi
}

fail() {
    local reason=$1
    if ! printf '%s\njob %s, restart %s, %s\n' "$reason" "$SLURM_JOB_ID" "$RESTART" "$(date -u)" >"$FAILED_FILE" \
        2>/dev/null; then
        local where="in the job's comment: scontrol show job $SLURM_JOB_ID"
        if [ "$LOCAL" = 1 ]; then where="on the terminal of "'python submit.py'; fi
        reason="$reason [$FAILED_FILE could not be written (a full or failing disk); this reason is $where]"
    fi
    event failed "$reason"
    tell "FAILED: $reason"
    echo "anvil: FAILED: $reason" >&2 || true
    exit "${2:-1}"
}

# stopped SIGNAL REASON: checkpoint saved, not run again (scancel, Ctrl-C, a stop signal SLURM did not send to
# requeue). The exit code is a shell's for that signal (130 for INT, 143 for TERM): not 75, which means "run me again".
stopped() {
    event stopped "$2"
    tell "stopped: $2"
    echo "anvil: stopped: $2" || true
    exit $((128 + $(kill -l "$1" 2>/dev/null || echo 15)))
}

# requeued_by_slurm WHAT: SLURM requeued the job itself (a failed node, `scontrol requeue`) and its TERM reached this
# attempt's shell: the end is recorded here (else the next attempt records it), and the shell leaves.
requeued_by_slurm() {
    event requeue "requeued by SLURM$1"
    echo "anvil: SLURM has requeued the job itself" || true
    exit 0
}

# requeue REASON: run again from the last checkpoint, at most MAX_RESTARTS times per SLURM job.
requeue() {
    if [ "$RESTART" -ge "$MAX_RESTARTS" ]; then
        fail "restart limit reached (job.max_restarts = $MAX_RESTARTS) after: $1"
    fi
    event requeue "$1"
    echo "anvil: requeueing ($1); restart $((RESTART + 1)) of at most $MAX_RESTARTS" || true
    if [ "$LOCAL" = 1 ]; then
        exit "$PREEMPTED_EXIT" # the local executor runs the script again
    fi
    local said
    if said=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
        exit 0
    fi
    case "$said $(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)" in
    *"pending execution"* | *PENDING | *REQUEUED | *REQUEUE_HOLD | *REQUEUE_FED)
        echo "anvil: SLURM has requeued the job itself (a failed node: srun reported it)" || true
        exit 0
        ;;
    esac
    fail "could not requeue after: $1 ($said: the job was cancelled, or requeue is not allowed); resubmit with: sbatch $JOB_DIR/slurm.sh"
}

# What SLURM is doing with this job, when a stop signal ended the step: preempted (SLURM requeues a preempted job only
# if it is still running when the grace time ends, so the script requeues it), requeued (SLURM has already requeued
# it itself: a node of the job failed, and its TERM is what reached this shell), timeout (the time limit's TERM: the
# USR2 warning came too late), cancelled; nothing while the job simply runs on (a signal sent by someone else).
slurm_ending() {
    local info
    info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) || return 0
    if [[ "$info" =~ PreemptTime=([^ ]+) ]] && [ "${BASH_REMATCH[1]}" != None ]; then
        echo preempted
    elif [[ "$info" =~ Restarts=([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -gt "$RESTART" ]; then
        echo requeued
    elif [[ "$info" =~ JobState=(RUNNING|SUSPENDED|CONFIGURING)\  ]]; then
        return 0
    elif [ -n "$END_AT" ] && [ "$(date +%s)" -ge $((END_AT - 5)) ]; then
        echo timeout
    else
        echo cancelled
    fi
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

# An attempt SLURM ended before its script could say how (a node failure requeues a job and kills the batch shell
# at once) gets its end recorded now, with the reason its trainer left.
if [ "$RESTART" -gt 0 ] && tail -n 1 "$EVENTS_FILE" 2>/dev/null | grep -q "\"event\": \"start\", \"job_id\": \"$SLURM_JOB_ID\""; then
    read_trainer_error 0
    RESTART=$((RESTART - 1)) event requeue "requeued by SLURM$TRAINER_ERROR"
fi
# A new attempt starts clean: markers left by the previous one would mislead the trainer and status.
mkdir -p "$JOB_DIR/logs" "$JOB_DIR/checkpoints" 2>/dev/null || true
rm -f "$PREEMPT_FILE" "$PREEMPTED_FILE" "$DONE_FILE" "$FAILED_FILE" "$ERROR_FILE" 2>/dev/null || true
if [ -n "$SIGNAL" ]; then touch "$PREEMPT_FILE" 2>/dev/null || true; fi
echo "$RESTART" >"$JOB_DIR"/RESTARTS 2>/dev/null || true
event start
echo "anvil: job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart $RESTART on ${SLURM_JOB_NODELIST:-?} at $(date -u)" || true
END_AT=""
if [ "$LOCAL" = 0 ]; then
    END_AT=$(date -d "$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)" +%s 2>/dev/null) || END_AT=""
fi

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

if [ -n "$SIGNAL" ]; then # stopped before the step started: there is nothing to save
    if [ "$SIGNAL" = USR2 ]; then requeue "$SIGNAL before the step started"; fi
    stopped "$SIGNAL" "$SIGNAL before the step started; nothing to save"
fi
echo "anvil: launching: ${LAUNCH[*]}" || true
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
echo "anvil: step exited with code $STEP_RC at $(date -u)" || true

STOPPED_AT="" CAUSE=""
if [ -s "$PREEMPTED_FILE" ]; then read -r STOPPED_AT CAUSE <"$PREEMPTED_FILE" || true; fi
if [ -n "$STOPPED_AT" ] || [ "$STEP_RC" -eq "$PREEMPTED_EXIT" ]; then
    # Checkpoint saved. The signal the shell got and the one the ranks agreed on: a stop (TERM, INT, HUP) outranks a
    # requeue (USR2, the trigger).
    AT="step ${STOPPED_AT:-?}, checkpoint saved"
    BY=${SIGNAL:-${CAUSE#SIG}}
    case "$SIGNAL ${CAUSE#SIG}" in *TERM*) BY=TERM ;; *INT*) BY=INT ;; *HUP*) BY=HUP ;; esac
    if [ "$BY" = USR2 ]; then
        requeue "preempted at $AT (USR2: the time limit is near)"
    elif [ "$BY" = trigger ] || [ -z "$BY" ]; then
        requeue "preempted at $AT (the PREEMPT trigger)"
    fi
    RESUME="resume with: sbatch $JOB_DIR/slurm.sh"
    if [ "$LOCAL" = 1 ]; then
        stopped "$BY" "stopped by SIG$BY at $AT; run the same command again to resume"
    fi
    case $(slurm_ending) in
    preempted) requeue "preempted by SLURM (SIG$BY) at $AT" ;;
    requeued) requeued_by_slurm " (SIG$BY) at $AT" ;;
    timeout) requeue "time limit reached (SIG$BY) at $AT; raise job.signal_lead if the USR2 warning came too late" ;;
    cancelled) stopped "$BY" "cancelled (SIG$BY, scancel) at $AT; $RESUME" ;;
    *) stopped "$BY" "stopped by SIG$BY at $AT (a signal to the job's processes, not SLURM ending the job); $RESUME" ;;
    esac
elif [ -n "$SIGNAL" ] && [ "$SIGNAL" != USR2 ] && [ "$STEP_RC" -gt 128 ]; then
    # Asked to stop, then killed before the checkpoint was written: the newest whole checkpoint is where it resumes.
    if [ "$LOCAL" = 0 ] && [ "$(slurm_ending)" = requeued ]; then
        read_trainer_error "$STEP_RC"
        requeued_by_slurm "$TRAINER_ERROR"
    fi
    AFTER=$(($(date +%s) - SIGNAL_AT))
    if [ "$LOCAL" = 0 ] && [ "$AFTER" -le 5 ]; then
        WHY="srun killed the step as SIG$SIGNAL reached it (scancel --full signals srun too, and srun answers TERM and HUP by killing its tasks at once), so this step's checkpoint could not be written"
    else
        WHY="the step was killed $AFTER s after SIG$SIGNAL, before its checkpoint was done (SLURM's KillWait ran out, or a second Ctrl-C)"
    fi
    if [ "$LOCAL" = 1 ]; then
        stopped "$SIGNAL" "$WHY; run the same command again: it resumes from the newest whole checkpoint"
    fi
    stopped "$SIGNAL" "$WHY; resume with: sbatch $JOB_DIR/slurm.sh (from the newest whole checkpoint)"
elif [ "$STEP_RC" -eq 0 ]; then
    printf 'job %s, restart %s, %s\n' "$SLURM_JOB_ID" "$RESTART" "$(date -u)" >"$DONE_FILE" 2>/dev/null || true
    event "done"
    echo "anvil: DONE" || true
else
    read_trainer_error "$STEP_RC"
    KIND=$TRAINER_KIND
    REASON="trainer exited with code $STEP_RC$TRAINER_ERROR"
    case " $REQUEUED_ERRORS " in *" $KIND "*) requeue "$REASON" ;; esac
    if [ "$RETRY_ON_FAILURE" = 1 ]; then
        requeue "$REASON"
    fi
    fail "$REASON; see $JOB_DIR/logs/" "$STEP_RC"
fi

#!/usr/bin/env bash
# Bring up a single-node SLURM on this machine (slurmctld + slurmd + munge; needs root and apt) and run the
# srun-native template on it with 2 CPU tasks: a real sbatch → srun → 2 ranks → DeepSpeed ZeRO-2 job.
#   bash scripts/slurm_local.sh            # set up (once), submit, wait, print the job's log, stop the daemons
# Output: runs/slurm-local/ (summary.json, adapters) and logs/folora-slurm-<jobid>.out.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then echo "scripts/slurm_local.sh: needs root (it starts slurmctld/slurmd)" >&2; exit 2; fi
command -v slurmctld >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >/dev/null
HOST=$(hostname -s)
CPUS=$(nproc)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/munge logs
MARK="# written by folora_ds scripts/slurm_local.sh"
if [[ -f /etc/slurm/slurm.conf ]] && ! grep -q "$MARK" /etc/slurm/slurm.conf; then
    echo "scripts/slurm_local.sh: /etc/slurm/slurm.conf exists and is not ours; not touching a real SLURM" >&2
    exit 2
fi
STARTED=()
cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
[[ -f /etc/munge/munge.key ]] || /usr/sbin/mungekey --create 2>/dev/null || true
chown -R munge:munge /run/munge /etc/munge 2>/dev/null || true
pgrep -x munged >/dev/null || { su -s /bin/sh munge -c /usr/sbin/munged; STARTED+=(munged); }
pgrep -x slurmctld >/dev/null || { slurmctld; STARTED+=(slurmctld); }
pgrep -x slurmd >/dev/null || { slurmd; STARTED+=(slurmd); }
for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix" && break; sleep 1; done
sinfo

# The shipped template, resized for this machine from the command line (2 tasks on 1 node, no GPUs).
JOB=$(sbatch --parsable --job-name folora-slurm --nodes 1 --ntasks-per-node 2 --cpus-per-task 1 --gpus-per-node 0 \
    --export ALL,FOLORA_VENV=.venv,DS_ACCELERATOR=cpu launch/slurm/srun_native.sbatch \
    --deepspeed ds_configs/zero2.json --steps 6 --calibration-steps 1 --no-progress --no-baseline \
    --set proxy.num_sequences=8 --set proxy.seq_len=24 --set lora_rank=4 \
    --output-dir runs/slurm-local --overwrite)
echo "submitted job $JOB"
while squeue -h -j "$JOB" 2>/dev/null | grep -q .; do sleep 2; done
sacct -j "$JOB" -o JobID,State,ExitCode 2>/dev/null || true
cat "logs/folora-slurm-$JOB.out"
STATE=$(scontrol show job "$JOB" 2>/dev/null | grep -o "JobState=[A-Z]*" | cut -d= -f2 || true)
if [[ "${KEEP_SLURM:-0}" != 1 ]]; then  # stop only the daemons this script started
    for daemon in slurmd slurmctld munged; do
        [[ " ${STARTED[*]} " == *" $daemon "* ]] && pkill -x "$daemon" || true
    done
fi
grep -q "gated steps per rank \[\[6\], \[6\]\]" "logs/folora-slurm-$JOB.out"
echo "SLURM job $JOB ($STATE): 2 srun tasks trained FoLoRA under DeepSpeed ZeRO-2"

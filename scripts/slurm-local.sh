#!/usr/bin/env bash
# Start a throwaway one-node SLURM cluster (munged, slurmctld, slurmd on this host) for the cluster tests:
#   eval "$(bash scripts/slurm-local.sh start DIR)"   # exports SLURM_CONF; DIR holds its state and logs
#   bash scripts/slurm-local.sh stop DIR
# Needs root and Debian's slurm-wlm and munge packages (.ci/run installs them).
set -euo pipefail
action=${1:?start or stop}
dir=${2:?a folder for the cluster\'s state}
host=$(hostname -s)
if [ "$action" = stop ]; then
  for pidfile in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done  # let it save its state
  done
  exit 0
fi
mkdir -p "$dir"/state "$dir"/spool "$dir"/munge
chown munge:munge "$dir"/munge 2>/dev/null || true
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
cat > "$dir"/slurm.conf <<CONF
ClusterName=sslab
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=defer
SlurmctldPort=16817
SlurmdPort=16818
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
KillWait=30
MinJobAge=60
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
CONF
munged --force --socket="$dir"/munge/munge.socket --pid-file="$dir"/munged.pid \
  --log-file="$dir"/munged.log --seed-file="$dir"/munge/seed
export SLURM_CONF="$dir"/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^idle'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "slurm did not come up; see $dir/*.log" >&2
exit 1

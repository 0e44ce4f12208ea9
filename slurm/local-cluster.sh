#!/usr/bin/env bash
# A one-machine Slurm cluster on loopback (slurmctld + slurmd, Debian's slurm-wlm, no systemd,
# no munge): for trying the sbatch scripts and for the tests.
#   slurm/local-cluster.sh start [DIR]   # writes DIR/slurm.conf, starts both daemons
#   slurm/local-cluster.sh env [DIR]     # prints the export line clients need
#   slurm/local-cluster.sh stop [DIR]    # stops both daemons by their PID files
set -euo pipefail
cmd=${1:?usage: local-cluster.sh start|stop|env [DIR]}
dir=$(realpath -m "${2:-${MTRAIN_SLURM_DIR:-/tmp/mtrain-slurm}}")
conf=$dir/slurm.conf

write_conf() {
  local host cpus mem port
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  port=${MTRAIN_SLURM_PORT:-$(( 20000 + RANDOM % 20000 ))}
  mkdir -p "$dir/state" "$dir/spool"
  cat > "$conf" <<CONF
ClusterName=mtrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
# Loopback only, one machine: no munge and no credentials to sign.
AuthType=auth/none
CredType=cred/none
# A requeued job is held for the credential lifetime (120 s by default) so that its old
# credential has expired everywhere before it starts again; on one machine 10 s is plenty.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Without it an oversized request is accepted and pends forever.
EnforcePartLimits=ALL
ReturnToService=2
# No accounting database: final job states go to a text file that sacct -c reads.
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
MinJobAge=3600
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

case $cmd in
  start)
    command -v slurmctld >/dev/null || {
      echo "slurmctld not found: apt-get install -y --no-install-recommends slurm-wlm" >&2; exit 1; }
    write_conf
    slurmctld -f "$conf"
    slurmd -f "$conf"
    export SLURM_CONF=$conf
    for _ in $(seq 100); do
      if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$conf"; exit 0
      fi
      sleep 0.2
    done
    echo "the local Slurm cluster did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    exit 1 ;;
  env)
    echo "export SLURM_CONF=$conf" ;;
  stop)
    for daemon in slurmd slurmctld; do
      pidfile=$dir/$daemon.pid
      if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
      fi
    done ;;
  *)
    echo "usage: local-cluster.sh start|stop|env [DIR]" >&2; exit 2 ;;
esac

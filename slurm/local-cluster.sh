#!/usr/bin/env bash
# A one-machine Slurm cluster on loopback (slurmctld + slurmd, Debian's slurm-wlm, no systemd,
# no munge): for trying the sbatch scripts and for the tests.
#   slurm/local-cluster.sh start [DIR]   # writes DIR/slurm.conf, starts both daemons
#   slurm/local-cluster.sh env [DIR]     # prints the export line clients need
#   slurm/local-cluster.sh stop [DIR]    # stops both daemons by their PID files
# MTRAIN_SLURM_NODES=2 adds a second node, "node2": a slurmd in its own network namespace
# joined to this host by a veth pair (10.77.0.1 <-> 10.77.0.2, both ends named mtrain0, so
# GLOO_SOCKET_IFNAME=mtrain0 holds on either node). Needs root and iproute2.
# MTRAIN_SLURM_GPUS=8 MTRAIN_SLURM_CPUS=64 make each node declare 8 GPUs and 64 CPUs whatever
# the machine has: Slurm schedules them (a GPU job's request, its environment), but the GPUs
# are placeholders (links to /dev/null) and the CPUs the machine's own.
set -euo pipefail
cmd=${1:?usage: local-cluster.sh start|stop|env [DIR]}
dir=$(realpath -m "${2:-${MTRAIN_SLURM_DIR:-/tmp/mtrain-slurm}}")
conf=$dir/slurm.conf

write_conf() {
  local host cpus mem port gres=""
  host=$(hostname -s)
  cpus=${MTRAIN_SLURM_CPUS:-$(nproc)}
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  port=${MTRAIN_SLURM_PORT:-$(( 20000 + RANDOM % 20000 ))}
  mkdir -p "$dir/state"
  local gpus=${MTRAIN_SLURM_GPUS:-0} extra=""
  if [ "$gpus" -gt 0 ]; then
    for i in $(seq 0 $((gpus - 1))); do ln -sfn /dev/null "$dir/gpu$i"; done
    echo "Name=gpu File=$dir/gpu[0-$((gpus - 1))]" > "$dir/gres.conf"
    gres=" Gres=gpu:$gpus"
    extra="GresTypes=gpu"
  fi
  if [ "$gpus" -gt 0 ] || [ -n "${MTRAIN_SLURM_CPUS:-}" ]; then
    # What the node declares, not what slurmd finds on it (which would mark the node INVALID).
    extra="$extra
SlurmdParameters=config_overrides"
  fi
  ctld_addr=127.0.0.1 nodes=$host
  node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN"
  if [ "$nodes_wanted" = 2 ]; then
    ctld_addr=$HOST_ADDR nodes="$host,node2"
    node_lines="NodeName=$host NodeAddr=$HOST_ADDR CPUs=$cpus RealMemory=$((mem / 2))$gres State=UNKNOWN
NodeName=node2 NodeAddr=$NODE2_ADDR CPUs=$cpus RealMemory=$((mem / 2))$gres State=UNKNOWN"
  fi
  cat > "$conf" <<CONF
ClusterName=mtrain-local
SlurmctldHost=$host($ctld_addr)
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
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
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
$extra
$node_lines
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP
CONF
}

HOST_ADDR=10.77.0.1 NODE2_ADDR=10.77.0.2
nodes_wanted=${MTRAIN_SLURM_NODES:-1}
netns=mtrain-node2

add_second_node() {
  ip netns add "$netns"
  ip link add mtrain0 type veth peer name mtrain0n
  ip link set mtrain0n netns "$netns"
  ip netns exec "$netns" ip link set mtrain0n name mtrain0
  ip addr add "$HOST_ADDR/24" dev mtrain0
  ip link set mtrain0 up
  ip netns exec "$netns" ip addr add "$NODE2_ADDR/24" dev mtrain0
  ip netns exec "$netns" ip link set mtrain0 up
  ip netns exec "$netns" ip link set lo up
}

remove_second_node() {
  ip netns del "$netns" 2>/dev/null || true
  ip link del mtrain0 2>/dev/null || true
}

case $cmd in
  start)
    command -v slurmctld >/dev/null || {
      echo "slurmctld not found: apt-get install -y --no-install-recommends slurm-wlm" >&2; exit 1; }
    write_conf
    slurmctld -f "$conf"
    slurmd -f "$conf"
    if [ "$nodes_wanted" = 2 ]; then
      add_second_node
      mkdir -p "$dir/spool-node2"
      # nsenter, not ip netns exec: only the network is the second node's own; ip netns exec
      # would also mount a fresh /sys without the cgroups slurmd probes at start.
      nsenter --net="/var/run/netns/$netns" slurmd -f "$conf" -N node2
    fi
    export SLURM_CONF=$conf
    for _ in $(seq 100); do
      if [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cx idle)" = "$nodes_wanted" ]; then
        echo "export SLURM_CONF=$conf"; exit 0
      fi
      sleep 0.2
    done
    echo "the local Slurm cluster did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    exit 1 ;;
  env)
    echo "export SLURM_CONF=$conf" ;;
  stop)
    for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid"; do
      if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
      fi
    done
    if ip netns list 2>/dev/null | grep -q "^$netns"; then remove_second_node; fi ;;
  *)
    echo "usage: local-cluster.sh start|stop|env [DIR]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine (for the `slurm` tests).
#
#   scripts/slurm-up.sh [--no-install]
#
# Installs Debian's slurm-wlm and munge when they are missing (root + apt-get
# only; --no-install skips that), writes a one-node slurm.conf for this
# machine's CPUs and memory (no cgroups, so it works in a container), starts
# munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle.
# Exit status 0: the cluster is up. Anything else: it is not, and the last
# line printed says why. Running it again while the cluster is up does nothing.
set -uo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARK="# written by vaultsh scripts/slurm-up.sh"
INSTALL=1
[ "${1:-}" = "--no-install" ] && INSTALL=0

say() { echo "slurm-up: $*"; }
fail() { say "$*"; exit 1; }

node_state() { timeout 10 sinfo -h -o %T 2>/dev/null | head -n1; }

if command -v sinfo >/dev/null 2>&1 && [ "$(node_state)" = "idle" ]; then
  say "already up ($(sinfo -h -o '%N %c CPUs %m MB' | head -n1))"
  exit 0
fi

install_packages() {
  [ "$(id -u)" = 0 ] || fail "slurmctld not installed and not root: install slurm-wlm and munge"
  command -v apt-get >/dev/null 2>&1 || fail "slurmctld not installed and no apt-get here"
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed"
  apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || fail "apt-get install slurm-wlm munge failed"
}

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  [ "$INSTALL" = 1 ] || fail "Slurm is not installed (run scripts/slurm-up.sh without --no-install, as root)"
  install_packages
fi
[ "$(id -u)" = 0 ] || fail "starting slurmctld/slurmd/munged needs root"

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.5; done
    fail "munged started but munge -n | unmunge fails"
  fi
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "keeping the existing $CONF (not ours)"
    return 0
  fi
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$CONF" <<EOF
$MARK: one node, no cgroups, no accounting database
ClusterName=vaultsh
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  say "wrote $CONF ($host: $cpus CPUs, $mem MB)"
}

start_daemons() {
  pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
  pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"
}

start_munge
write_conf
start_daemons
for _ in $(seq 60); do
  state=$(node_state)
  case "$state" in
    idle) say "up: $(sinfo -h -o '%N %c CPUs %m MB, partition %P' | head -n1)"; exit 0 ;;
    down*|drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 ;;
  esac
  sleep 1
done
fail "the node did not become idle within 60 s (sinfo says: ${state:-nothing}; see /var/log/slurm/)"

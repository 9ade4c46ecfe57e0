#!/usr/bin/env bash
# Install what tests/slurm/cluster.sh runs: Debian's slurmctld, slurmd, slurm-client and munge.
# Nothing is started: apt would start munge and the slurm daemons as services on a machine without
# a policy-rc.d that forbids it, and those would hold the ports the test cluster needs; so one that
# exits 101 (no service starts) is put in place for the install and removed after, unless it was
# there before.
set -euo pipefail
packages="slurmctld slurmd slurm-client munge"
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    exit 0
fi
policy=/usr/sbin/policy-rc.d
made=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# no service starts during the install (tests/slurm/install.sh)\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    made=1
fi
rc=0
{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $packages; } || rc=$?
[ -z "$made" ] || rm -f "$policy"
exit $rc

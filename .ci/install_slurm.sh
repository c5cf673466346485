#!/usr/bin/env bash
# Install a single-node Slurm (Debian's slurmctld, slurmd, munge) and shellcheck for the `cluster` tests.
# Idempotent: does nothing when the binaries are already there. Needs root (CI containers run as root).
# The daemons are started by tests/cluster/conftest.py through .ci/start_slurm.sh, never by systemd.
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch munged shellcheck; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "install_slurm: slurm, munge and shellcheck already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: missing ${need[*]}; run as root (apt-get) or install them yourself" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge shellcheck >/dev/null
echo "install_slurm: installed $(sbatch --version 2>/dev/null || echo slurm), $(shellcheck --version | sed -n 2p)"

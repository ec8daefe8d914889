#!/usr/bin/env bash
# Install what megakv's local Slurm test cluster needs (Debian/Ubuntu): slurmctld, slurmd, the client tools and munge.
# Idempotent and quick: does nothing when the daemons are already installed; otherwise ~8 small packages (~3.5 MB).
# Needs root (CI runs as root). Set SKIP_APT_UPDATE=1 to reuse the current package lists.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin   # where the daemons live; a non-login root shell may lack them

need=()
for cmd in slurmctld slurmd sbatch munged mungekey; do
    command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: missing ${need[*]}; installing them needs root (apt-get)." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: missing ${need[*]} and no apt-get here; install slurmctld, slurmd, slurm-client, munge." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
[ -n "${SKIP_APT_UPDATE:-}" ] || apt-get update -qq
# --no-install-recommends: slurm's recommends pull in ~40 packages (hdf5, rrd, ipmi) the test cluster never uses.
# The packages' postinst scripts try to start the services; without an init system that fails harmlessly.
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "install_slurm.sh: installed $(slurmctld -V 2>/dev/null || echo slurm) and munge"

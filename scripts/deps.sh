#!/usr/bin/env bash
# Installs the system packages ferrolb's builds, labs and tests need (Debian 12), idempotently:
# only missing packages are installed, and apt-get update runs only when something is missing.
set -euo pipefail
PACKAGES=(
  clang-19 libbpf-dev          # eBPF datapath (C programs built by build.rs)
  iproute2 nftables ethtool    # namespaces, veth links, fault injection
  procps util-linux kmod       # sysctl, nsenter/mount, module probing
  iputils-ping iperf3          # lab traffic
  frr bird2                    # ToR routers and interop peers
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# No systemd on these machines: nothing starts at boot, and FRR's run directory may be missing.
if id frr >/dev/null 2>&1 && [ ! -d /run/frr ]; then install -d -o frr -g frr -m 755 /run/frr; fi
echo "deps: ok"

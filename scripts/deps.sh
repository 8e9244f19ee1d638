#!/usr/bin/env bash
# Installs the system packages ferrolb's builds, labs and tests need (Debian 12), idempotently:
# only missing packages are installed, and apt-get update runs only when something is missing.
#   scripts/deps.sh           what builds and tests need
#   scripts/deps.sh --bench   also what the benchmarks need (nginx; keepalived, conntrackd)
set -euo pipefail
PACKAGES=(
  clang-19 libbpf-dev          # eBPF datapath (C programs built by build.rs)
  iproute2 nftables ethtool    # namespaces, veth links, fault injection
  procps util-linux kmod       # sysctl, nsenter/mount, module probing
  iputils-ping iperf3 wrk      # lab traffic
  frr bird2                    # ToR routers and interop peers
  curl python3 openssl         # REST calls, the lab's servers and probes, test certificates
  prometheus                   # promtool and a real Prometheus for the observability test
  python3-venv                 # the REST fuzzer's virtualenv (below)
)
if [ "${1:-}" = "--bench" ]; then
  PACKAGES+=(nginx-light keepalived conntrackd conntrack)   # + the HA baseline
fi
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
  # Packages with daemons (nginx, frr) must not start them on the host: policy-rc.d says no.
  guard=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}" || { [ $guard = 1 ] && rm -f /usr/sbin/policy-rc.d; exit 1; }
  if [ $guard = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# No systemd on these machines: nothing starts at boot, and FRR's run directory may be missing.
if id frr >/dev/null 2>&1 && [ ! -d /run/frr ]; then install -d -o frr -g frr -m 755 /run/frr; fi
# The schema-driven REST fuzzer (agent/tests/api_fuzz.rs), from PyPI, pinned, in its own venv.
FUZZ_VENV=/opt/ferrolb-venv
SCHEMATHESIS=4.32.5
if ! "$FUZZ_VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS"; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: schemathesis missing in $FUZZ_VENV; run as root to install it" >&2
    exit 1
  fi
  echo "deps: installing schemathesis $SCHEMATHESIS into $FUZZ_VENV"
  python3 -m venv "$FUZZ_VENV"
  "$FUZZ_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS"
fi
echo "deps: ok"

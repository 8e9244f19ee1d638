#!/usr/bin/env bash
# The main job, for now: bring up the bgp-ecmp lab (FRR ToR, two LB nodes advertising a VIP,
# three backends, a client), show the ToR's BGP table and ECMP route, ping the VIP from the
# client, and tear the lab down (also on failure or Ctrl-C). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/ferrolb-target}"
cargo build --quiet -p ferrolb-lab --bin ferrolab
FERROLAB="$CARGO_TARGET_DIR/debug/ferrolab"
TOPO=containerlab/bgp-ecmp/bgp-ecmp.clab.yml
LABDIR="$(mktemp -d /tmp/ferrolb-demo.XXXXXX)"
VIP=203.0.113.10
cleanup() { "$FERROLAB" down "$TOPO" >/dev/null || true; rm -rf "$LABDIR"; }
trap cleanup EXIT INT TERM
"$FERROLAB" up --strict --lab-dir "$LABDIR" "$TOPO" | sed -n '/is up/,$p'
echo
echo "== waiting for the ToR to learn the VIP from both LB nodes (ECMP)"
for _ in $(seq 1 60); do
  n=$("$FERROLAB" exec "$TOPO" tor -- ip route show "$VIP" | grep -c 'nexthop via' || true)
  [ "$n" -ge 2 ] && break
  sleep 0.5
done
echo "== ToR: show bgp ipv4 unicast"
"$FERROLAB" exec "$TOPO" tor -- vtysh -c 'show bgp ipv4 unicast'
echo "== ToR: kernel route to the VIP"
"$FERROLAB" exec "$TOPO" tor -- ip route show "$VIP"
echo "== client: ping the VIP across the ToR"
"$FERROLAB" exec "$TOPO" client -- ping -c 3 -W 1 "$VIP"
[ "$n" -ge 2 ] || { echo "demo: the ToR has $n nexthops for $VIP, expected 2" >&2; exit 1; }
echo "== demo ok; tearing down"

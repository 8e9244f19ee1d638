#!/usr/bin/env bash
# The main job: a single-node load-balancing demo on the lb-single lab (a client, one ferrolb
# node, three backends with real servers). Brings the lab up, creates a rule with ferroctl,
# sends requests through the VIP and shows which backend answered each, shows the counters and
# the connection table with ferroctl, and tears the lab down (also on failure or Ctrl-C).
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/ferrolb-target}"
cargo build --quiet -p ferrolb-lab -p ferrolb-agent --bins
BIN="$CARGO_TARGET_DIR/debug"
FERROLAB="$BIN/ferrolab"
TOPO=containerlab/lb-single/lb-single.clab.yml
LABDIR="$(mktemp -d /tmp/ferrolb-demo.XXXXXX)"
VIP=203.0.113.10
API=http://198.51.100.1:11111
lab() { "$FERROLAB" exec "$TOPO" "$@"; }
cleanup() { "$FERROLAB" down "$TOPO" >/dev/null 2>&1 || true; rm -rf "$LABDIR"; }
trap cleanup EXIT INT TERM

"$FERROLAB" up --strict --lab-dir "$LABDIR" --var "FERROLB=$BIN/ferrolb" "$TOPO" | sed -n '/is up/,$p'
echo
echo "== waiting for the agent on lb1 and the backends"
for _ in $(seq 1 100); do
  lab client -- curl -sf -m 1 "$API/netlox/v1" >/dev/null 2>&1 && break
  sleep 0.2
done
for be in 10.10.10.11 10.10.10.12 10.10.10.13; do
  for _ in $(seq 1 100); do
    lab lb1 -- curl -sf -m 1 "http://$be:8080/" >/dev/null 2>&1 && break
    sleep 0.2
  done
done
echo "== client: ferroctl create lb $VIP --tcp=80:8080 (round robin, DNAT) over the REST API"
lab client -- "$BIN/ferroctl" --url "$API" create lb "$VIP" --tcp=80:8080 \
  --endpoints=10.10.10.11:1,10.10.10.12:1,10.10.10.13:1 --name demo_web:llb-inst0
echo "== client: 6 HTTP requests to http://$VIP/ (each backend says who it is and whom it saw)"
seen=""
for i in $(seq 1 6); do
  reply=$(lab client -- curl -s -m 2 "http://$VIP/")
  echo "   $i: $reply"
  seen="$seen $(echo "$reply" | sed -n 's/.*"backend": "\([a-z0-9]*\)".*/\1/p')"
done
echo "== client: ferroctl get lb (packets:bytes per endpoint, both directions)"
lab client -- "$BIN/ferroctl" --url "$API" get lb
echo "== client: ferroctl get ct"
lab client -- "$BIN/ferroctl" --url "$API" get ct | head -8
n=$(echo "$seen" | tr ' ' '\n' | grep -c . | tr -d ' ')
distinct=$(echo "$seen" | tr ' ' '\n' | grep . | sort -u | wc -l)
if [ "$n" -ne 6 ] || [ "$distinct" -ne 3 ]; then
  echo "demo: expected 6 answers from 3 backends, got $n from $distinct" >&2
  exit 1
fi
echo "== demo ok: 6 requests spread over 3 backends; tearing down"

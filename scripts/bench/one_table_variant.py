#!/usr/bin/env python3
"""The one-table prototype of the datapath, for `cargo bench -p ferrolb-bpf --bench cycles`
and `scripts/bench_cps_ab.py` (a measurement, not a datapath anyone should run).

Writes into OUTDIR a copy of bpf/c/ in which every flow lives in `conntrack` from its first
packet: every use of `ct_new` becomes `conntrack`, a lookup is one lookup, and the
confirmation of a flow (`ct_promote`) clears its half-open flags in place instead of moving
both entries between tables. What it measures is the cost floor of a design with one table
(decision 0007, "Measured: one table"): the handshake without the move.

With --ring SLOTS, half-open flows are bounded as decision 0007 proposes: each flow made
unconfirmed takes the next slot of a ring (a global atomic cursor), and the slot's previous
flow, if still unconfirmed, is evicted (claimed, both entries removed); confirmation clears
`CTF_NEW` in place and gives the packet up if an evictor holds the flow. A small ring wraps at
once, so every new flow pays the steady state's cost (the slot's previous flow looked up).
With --gate as well, the slot's previous flow is looked at only while SLOTS or more flows are
unconfirmed (a global count: +1 when a flow is made unconfirmed, -1 when it is confirmed or
evicted; a real build would have the collector correct it from its census): a soft bound of
2 x SLOTS, and a new flow pays an atomic add instead of a cold lookup while under it.

    python3 scripts/bench/one_table_variant.py [--gate] [--ring SLOTS] /tmp/one-table
    clang-19 $(cat bpf/c/clang-flags) -I/tmp/one-table -c /tmp/one-table/lb.bpf.c \
        -o /tmp/one-table/lb.o
    FLB_OBJECT=/tmp/one-table/lb.o cargo bench -p ferrolb-bpf --bench cycles
"""

import argparse
import pathlib
import shutil
import sys

SRC = pathlib.Path(__file__).resolve().parents[2] / "bpf" / "c"

LOOKUP = """	struct flb_ct *e = bpf_map_lookup_elem(&conntrack, k);
	if (!e)
		e = bpf_map_lookup_elem(&conntrack, k);
	return e;"""
NEAR = """	struct flb_ct *pe = bpf_map_lookup_elem(&conntrack, k);
	if (!pe)
		pe = bpf_map_lookup_elem(&conntrack, k);
	return pe;"""
DELETE = """	if (bpf_map_delete_elem(&conntrack, k) != 0)
		bpf_map_delete_elem(&conntrack, k);"""
PROMOTE = """{
	struct flb_ct_key pk;
	ct_peer_key(&pk, key, e);
	struct flb_ct *pe = seen ? seen : bpf_map_lookup_elem(&conntrack, &pk);
	if (pe && !ct_points_to(pe, key))
		pe = 0;
	e->flags &= ~(FLB_CTF_NEW | FLB_CTF_REPLIED);
	if (pe)
		pe->flags &= ~(FLB_CTF_NEW | FLB_CTF_REPLIED);
	count(FLB_CNT_CT_PROMOTED);
	emit(FLB_EV_ESTABLISHED, key, e);
	return e;
}
"""


RING_MAPS = """
/* Prototype (scripts/bench/one_table_variant.py --ring): the half-open bound. */
struct flb_ho_slot {
	struct flb_ct_key key;
	__u64 created_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_ho_slot);
	__uint(max_entries, FLB_HO_SLOTS);
} ho_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} ho_cursor SEC(".maps");
"""

RING_TRACK = """/* Prototype: the flow made unconfirmed at k takes the next slot; the slot's previous flow, if
 * still unconfirmed, is evicted (claimed first, judged under the claim). */
__noinline int ho_track(const struct flb_ct_key *k, __u64 created)
{
	if (!k)
		return 0;
	__u32 z = 0;
	__u64 *cur = bpf_map_lookup_elem(&ho_cursor, &z);
	if (!cur)
		return 0;
	__u32 i = (__u32)(__sync_fetch_and_add(cur, 1) % FLB_HO_SLOTS);
	struct flb_ho_slot *s = bpf_map_lookup_elem(&ho_ring, &i);
	if (!s)
		return 0;
	__u32 one = 1;
	__u64 *cnt = 0, n = 0;
	if (FLB_HO_GATE) {
		cnt = bpf_map_lookup_elem(&ho_cursor, &one);
		n = cnt ? __sync_fetch_and_add(cnt, 1) : 0;
	}
	if (s->created_ns && (!FLB_HO_GATE || n >= FLB_HO_SLOTS)) {
		struct flb_ct_key ok = s->key;
		struct flb_ct *occ = bpf_map_lookup_elem(&conntrack, &ok);
		if (occ && occ->created_ns == s->created_ns && (occ->flags & FLB_CTF_NEW) &&
		    ct_claim(occ)) {
			if (occ->flags & FLB_CTF_NEW) {
				struct flb_ct_key pk;
				ct_peer_key(&pk, &ok, occ);
				struct flb_ct *pe = bpf_map_lookup_elem(&conntrack, &pk);
				if (ct_claim_peer(&ok, occ, &pe)) {
					ct_remove_flow(&ok, occ, &pk, pe);
					if (cnt)
						__sync_fetch_and_add(cnt, -1);
				} else
					ct_unclaim(occ);
			} else {
				ct_unclaim(occ);
			}
		}
	}
	s->key = *k;
	s->created_ns = created;
	return 0;
}

"""


# With the ring: an evictor that claimed the flow before this CPU cleared the flag removes it;
# the gate's count goes down.
PROMOTE_RING = PROMOTE.replace("""	count(FLB_CNT_CT_PROMOTED);""", """	/* An evictor that claimed the flow before this CPU cleared the flag removes it. */
	if (__sync_fetch_and_or(&e->fin, 0) & FLB_FIN_CLAIMED)
		return 0;
	if (FLB_HO_GATE) {
		__u32 one = 1;
		__u64 *cnt = bpf_map_lookup_elem(&ho_cursor, &one);
		if (cnt)
			__sync_fetch_and_add(cnt, -1);
	}
	count(FLB_CNT_CT_PROMOTED);""")


def fail(what: str) -> int:
    print(f"one_table_variant: the source changed; not found: {what}", file=sys.stderr)
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ring", type=int, default=0, metavar="SLOTS",
                    help="bound unconfirmed flows with a ring of SLOTS slots")
    ap.add_argument("--gate", action="store_true",
                    help="with --ring: look at a slot's previous flow only at the bound")
    ap.add_argument("outdir")
    a = ap.parse_args()
    if a.gate and a.ring <= 0:
        ap.error("--gate needs --ring SLOTS")
    out = pathlib.Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for f in SRC.iterdir():
        if f.suffix in (".c", ".h"):
            shutil.copy(f, out / f.name)
    p = out / "lb.bpf.c"
    s = p.read_text()
    s = s.replace("(&ct_new,", "(&conntrack,")
    for old, new in [
        (LOOKUP, "\treturn bpf_map_lookup_elem(&conntrack, k);"),
        (NEAR, "\treturn bpf_map_lookup_elem(&conntrack, k);"),
        (DELETE, "\tbpf_map_delete_elem(&conntrack, k);"),
    ]:
        if old not in s:
            return fail(old)
        s = s.replace(old, new)
    i = s.find("static __always_inline struct flb_ct *ct_promote(")
    if i < 0:
        return fail("ct_promote")
    j = s.index("{", i)
    k = s.index("\n}\n", j) + 3
    s = s[:j] + (PROMOTE_RING if a.ring else PROMOTE) + s[k:]
    if a.ring:
        maps_after = '} ct_new SEC(".maps");\n'
        track_before = "/* May a new flow take the key k that `occ` holds?"
        made = "\t\t\tcount(FLB_CNT_CT_CREATED);\n"
        if maps_after not in s or track_before not in s or made not in s:
            return fail("the ct_new map, ct_take_over's comment or ct_create's count")
        defs = "#define FLB_HO_SLOTS %d\n#define FLB_HO_GATE %d\n" % (a.ring, int(a.gate))
        s = s.replace(maps_after, maps_after + defs + RING_MAPS, 1)
        s = s.replace(track_before, RING_TRACK + track_before, 1)
        # The flow's original entry is in: it takes its slot (ct_create; ct_reopen's flows are
        # confirmed from the start).
        i = s.index(made, s.index("int ct_create("))
        s = (s[: i + len(made)] + "\t\t\tif (o->flags & FLB_CTF_NEW)\n\t\t\t\tho_track(okey, o->created_ns);\n"
             + s[i + len(made):])
    p.write_text(s)
    print(f"one_table_variant: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

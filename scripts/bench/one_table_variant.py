#!/usr/bin/env python3
"""The one-table prototype of the datapath, for `cargo bench -p ferrolb-bpf --bench cycles`
(a measurement, not a datapath anyone should run: it has no bound on half-open flows).

Writes into OUTDIR a copy of bpf/c/ in which every flow lives in `conntrack` from its first
packet: every use of `ct_new` becomes `conntrack`, a lookup is one lookup, and the
confirmation of a flow (`ct_promote`) clears its half-open flags in place instead of moving
both entries between tables. What it measures is the cost floor of a design with one table
(decision 0007, "Measured: one table"): the handshake without the move.

    python3 scripts/bench/one_table_variant.py /tmp/one-table
    clang-19 $(cat bpf/c/clang-flags) -I/tmp/one-table -c /tmp/one-table/lb.bpf.c \
        -o /tmp/one-table/lb.o
    FLB_OBJECT=/tmp/one-table/lb.o cargo bench -p ferrolb-bpf --bench cycles
"""

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


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = pathlib.Path(sys.argv[1])
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
            print(f"one_table_variant: the source changed; not found:\n{old}", file=sys.stderr)
            return 1
        s = s.replace(old, new)
    head = "static __always_inline struct flb_ct *ct_promote("
    i = s.find(head)
    if i < 0:
        print("one_table_variant: ct_promote not found", file=sys.stderr)
        return 1
    j = s.index("{", i)
    k = s.index("\n}\n", j) + 3
    s = s[:j] + PROMOTE + s[k:]
    p.write_text(s)
    print(f"one_table_variant: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

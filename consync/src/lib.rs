//! `ferrolb-consync` — connection-tracking state sync between LB nodes.
//!
//! It will own the gRPC service (tonic, TCP 22222) that streams locally created conntrack
//! entries to every peer in `--cluster`: bulk snapshot on (re)connect, live deltas with
//! (epoch, sequence) resume, gap detection that forces a resync, batching bounded by count and
//! time, and optional mutual TLS. It knows nothing of the agent's roles.
//!
//! Nothing is implemented yet: the HA pair issue fills this crate.

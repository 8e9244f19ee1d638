#![no_main]
//! Any bytes as what a BGP neighbour sends: the speaker's framing, then each whole message
//! decoded in 4- and 2-byte AS mode and read as the speaker reads it. An error, never a panic;
//! a decoded message re-encodes without one.
use ferrolb_bgp::wire;
use netgauze_bgp_pkt::BgpMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while let Ok(Some(len)) = wire::frame_len(buf) {
        let Some(frame) = buf.get(..len) else { return };
        for asn4 in [true, false] {
            if let Ok(d) = wire::decode(frame, asn4) {
                match &d.message {
                    BgpMessage::Open(o) => {
                        let _ = wire::peer_open(o);
                    }
                    BgpMessage::Update(u) => {
                        let _ = wire::update_counts(u);
                    }
                    _ => {}
                }
                let _ = wire::encode(&d.message);
            }
        }
        buf = &buf[len..];
    }
});

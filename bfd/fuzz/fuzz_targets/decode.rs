#![no_main]
//! Any bytes as a received BFD control packet: a packet or a DecodeError, never a panic; a
//! decoded packet re-encodes to bytes that decode to the same packet.
use ferrolb_bfd::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        let again = Packet::decode(&p.encode()).expect("re-encoded packet decodes");
        assert_eq!(again, p);
    }
});

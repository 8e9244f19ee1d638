#![no_main]
//! Any bytes as a peer's packed flow records: records or errors, never a panic; a decoded
//! record re-encodes to the same record.
use ferrolb_consync::flow::{RECORD, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(records) = decode(data) else {
        assert!(data.len() % RECORD != 0);
        return;
    };
    for c in records.flatten() {
        let mut again = Vec::new();
        encode(&c, &mut again);
        let back = decode(&again)
            .expect("one whole record")
            .next()
            .expect("one record")
            .expect("re-encoded record decodes");
        assert_eq!(back, c);
    }
});

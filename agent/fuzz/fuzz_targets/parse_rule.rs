#![no_main]
//! Any bytes as a POST /config/loadbalancer body: Ok or a field error, never a panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferrolb_agent::api::models::parse_rule(data);
});

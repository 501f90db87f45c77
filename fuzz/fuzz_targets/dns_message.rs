#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_agent::fuzzing::dns_message(data));

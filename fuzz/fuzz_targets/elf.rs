#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvcd_fuzz::elf(data));

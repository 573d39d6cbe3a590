//! Fuzzes the TFTP codec with arbitrary datagrams: no panics, and whatever decodes re-encodes
//! to something that decodes.
#![no_main]

use keelson_provisioner::tftp::packet::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        assert!(
            Packet::decode(&p.encode()).is_ok(),
            "re-encoded packet does not decode"
        );
    }
});

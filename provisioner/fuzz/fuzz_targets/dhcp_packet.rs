//! Fuzzes the DHCP codec and both server modes with arbitrary datagrams: no panics, whatever
//! decodes re-encodes to something that decodes, and proxyDHCP never hands out an address.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use keelson_provisioner::boot::BootFiles;
use keelson_provisioner::dhcp::packet::Packet;
use keelson_provisioner::dhcp::{DhcpServer, Port};
use keelson_provisioner::inventory::Inventory;
use libfuzzer_sys::fuzz_target;

const INVENTORY: &str = r#"
default_profile = "worker"
[dhcp]
pool_start = "192.0.2.100"
pool_end = "192.0.2.110"
prefix_len = 24
[profiles.worker]
kernel = "vmlinuz"
[[machines]]
name = "node-1"
mac = "52:54:00:12:34:56"
ip = "192.0.2.10"
"#;

fn inventory() -> Arc<Inventory> {
    static INV: OnceLock<Arc<Inventory>> = OnceLock::new();
    INV.get_or_init(|| Arc::new(Inventory::parse(INVENTORY, Path::new("fuzz")).expect("inventory")))
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Packet::decode(data) else {
        return;
    };
    assert!(
        Packet::decode(&packet.encode()).is_ok(),
        "re-encoded packet does not decode"
    );
    let server_ip = Ipv4Addr::new(192, 0, 2, 1);
    let boot = BootFiles::debian("http://192.0.2.1:8080");
    let src: SocketAddr = "0.0.0.0:68".parse().expect("address");
    let mut full = DhcpServer::full(server_ip, boot.clone(), inventory(), None).expect("server");
    let mut proxy = DhcpServer::proxy(server_ip, boot, inventory());
    for port in [Port::Dhcp, Port::Pxe] {
        let _ = full.handle(&packet, port, src, 1_000);
        if let Some((reply, _)) = proxy.handle(&packet, port, src, 1_000) {
            assert!(
                reply.yiaddr.is_unspecified(),
                "proxyDHCP offered an address"
            );
        }
    }
});

//! Network tests with real clients, as root, inside network namespaces created per test:
//! `dhclient` against the full DHCP server, a PXE client against proxyDHCP, `tftp` (tftp-hpa)
//! and `curl` against TFTP and HTTP, and the `keelson-provisioner serve` binary end to end.

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keelson_provisioner::boot::BootFiles;
use keelson_provisioner::dhcp::packet::{MessageType, Packet, opt};
use keelson_provisioner::dhcp::{DhcpServer, Sockets};
use keelson_provisioner::http::{self, HttpConfig};
use keelson_provisioner::inventory::Inventory;
use keelson_provisioner::net;
use keelson_provisioner::tftp::packet::Packet as Tftp;
use keelson_provisioner::tftp::{TftpConfig, TftpServer};
use support::*;

const IPXE_DIR: &str = "/usr/lib/ipxe";
const HTTP_BASE: &str = "http://192.0.2.1:8080";

fn inventory() -> Arc<Inventory> {
    Arc::new(Inventory::parse(INVENTORY, Path::new("test-inventory.toml")).expect("test inventory"))
}

fn require_ipxe() {
    for f in ["undionly.kpxe", "ipxe.efi"] {
        assert!(
            Path::new(IPXE_DIR).join(f).is_file(),
            "{IPXE_DIR}/{f} missing: install the Debian package `ipxe`"
        );
    }
}

fn start_dhcp(lab: &Lab, server: DhcpServer, proxy: bool) -> Running {
    let iface = lab.server_if.clone();
    Running::start(&lab.server_ns, move |shutdown| {
        let any = Ipv4Addr::UNSPECIFIED;
        let dhcp =
            net::udp(SocketAddr::from((any, 67)), Some(&iface), true).map_err(|e| e.to_string())?;
        let pxe = if proxy {
            Some(
                net::udp(SocketAddr::from((any, 4011)), Some(&iface), true)
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        Ok(Box::pin(async move {
            server
                .serve(Sockets { dhcp, pxe }, shutdown)
                .await
                .map_err(|e| e.to_string())
        }))
    })
}

/// Runs dhclient once in the client namespace with extra `dhclient.conf` lines; returns the
/// lease file's content once it holds a lease.
fn dhclient_lease(lab: &Lab, dir: &Path, name: &str, conf: &str) -> String {
    let conf_path = dir.join(format!("{name}.conf"));
    let lease_path = dir.join(format!("{name}.leases"));
    std::fs::write(&conf_path, conf).unwrap();
    let mut client = ChildGuard::spawn(lab.client_cmd("dhclient").args([
        "-d",
        "-1",
        "-v",
        "-sf",
        "/bin/true",
        "-cf",
        conf_path.to_str().unwrap(),
        "-lf",
        lease_path.to_str().unwrap(),
        "-pf",
        dir.join(format!("{name}.pid")).to_str().unwrap(),
        &lab.client_if,
    ]));
    let lease = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&lease_path).ok()?;
        text.contains("fixed-address").then_some(text)
    });
    let output = client.0.take().map(|mut c| {
        let _ = c.kill();
        c.wait_with_output().ok()
    });
    match lease {
        Some(l) => l,
        None => panic!(
            "dhclient ({name}) got no lease within 20 s; its output: {:?}",
            output
                .flatten()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        ),
    }
}

const PXE_BIOS_CONF: &str = r#"
option pxe-arch code 93 = unsigned integer 16;
send vendor-class-identifier "PXEClient:Arch:00000:UNDI:002001";
send pxe-arch 0;
request subnet-mask, domain-name-servers, host-name;
timeout 20;
"#;

#[test]
fn dhclient_gets_reserved_lease_with_pxe_boot_file_then_ipxe_gets_script() {
    require_root_and(&[("dhclient", "isc-dhcp-client"), ("ip", "iproute2")]);
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new("dh", false);
    let lease_file = dir.path().join("server-leases.json");
    let server = DhcpServer::full(
        SERVER_IP.parse().unwrap(),
        BootFiles::debian(HTTP_BASE),
        inventory(),
        Some(&lease_file),
    )
    .unwrap();
    let running = start_dhcp(&lab, server, false);

    // Firmware PXE on BIOS: the reserved address and undionly.kpxe over TFTP.
    let lease = dhclient_lease(&lab, dir.path(), "bios", PXE_BIOS_CONF);
    assert!(lease.contains("fixed-address 192.0.2.10;"), "{lease}");
    assert!(lease.contains("filename \"undionly.kpxe\";"), "{lease}");
    assert!(
        lease.contains("option vendor-class-identifier \"PXEClient\";"),
        "{lease}"
    );
    assert!(
        lease.contains("option dhcp-server-identifier 192.0.2.1;"),
        "{lease}"
    );
    assert!(
        lease.contains("option subnet-mask 255.255.255.0;"),
        "{lease}"
    );
    assert!(lease.contains("option host-name \"node-1\";"), "{lease}");

    // iPXE (user class "iPXE") on UEFI: the HTTP script, not iPXE again.
    let ipxe_conf = PXE_BIOS_CONF.replace(
        "send pxe-arch 0;",
        "send pxe-arch 7;\nsend user-class \"iPXE\";",
    );
    let lease = dhclient_lease(&lab, dir.path(), "ipxe", &ipxe_conf);
    assert!(lease.contains("fixed-address 192.0.2.10;"), "{lease}");
    assert!(
        lease.contains("filename \"http://192.0.2.1:8080/ipxe/525400123456\";"),
        "{lease}"
    );

    running.stop().expect("DHCP server stopped cleanly");
    let persisted = std::fs::read_to_string(&lease_file).expect("lease file written");
    assert!(
        persisted.contains("192.0.2.10") && persisted.contains(CLIENT_MAC),
        "{persisted}"
    );
}

#[test]
fn dhclient_without_reservation_gets_pool_address_and_restart_keeps_it() {
    require_root_and(&[("dhclient", "isc-dhcp-client"), ("ip", "iproute2")]);
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new("pl", false);
    // An inventory without the reservation: the client is unknown and gets the pool.
    let text = INVENTORY
        .replace("ip = \"192.0.2.10\"\n", "")
        .replace("mac = \"52:54:00:12:34:56\"", "mac = \"52:54:00:aa:aa:aa\"");
    let inv = Arc::new(Inventory::parse(&text, Path::new("t")).unwrap());
    let lease_file = dir.path().join("server-leases.json");
    // Another client already holds the first pool address in the persisted lease file.
    let far_future = 4_000_000_000u64;
    std::fs::write(
        &lease_file,
        format!(r#"{{"leases":[{{"ip":"192.0.2.100","mac":"52:54:00:00:00:99","expires":{far_future}}}]}}"#),
    )
    .unwrap();
    let server = DhcpServer::full(
        SERVER_IP.parse().unwrap(),
        BootFiles::debian(HTTP_BASE),
        inv.clone(),
        Some(&lease_file),
    )
    .unwrap();
    let running = start_dhcp(&lab, server, false);
    let plain = "request subnet-mask;\ntimeout 20;\n";
    let lease = dhclient_lease(&lab, dir.path(), "plain", plain);
    assert!(
        lease.contains("fixed-address 192.0.2.101;"),
        "leased .100 handed out twice? {lease}"
    );
    assert!(
        !lease.contains("filename"),
        "non-PXE client got a boot file: {lease}"
    );
    running.stop().unwrap();

    // A restarted server (same lease file) gives the client the same address again.
    let server = DhcpServer::full(
        SERVER_IP.parse().unwrap(),
        BootFiles::debian(HTTP_BASE),
        inv,
        Some(&lease_file),
    )
    .unwrap();
    let running = start_dhcp(&lab, server, false);
    let lease = dhclient_lease(&lab, dir.path(), "again", plain);
    assert!(lease.contains("fixed-address 192.0.2.101;"), "{lease}");
    running.stop().unwrap();
}

/// Sends `req` from the client namespace and returns the first reply, if any.
fn pxe_exchange(lab: &Lab, bind: SocketAddr, to: SocketAddr, req: &Packet) -> Option<Packet> {
    let iface = lab.client_if.clone();
    let wire = req.encode();
    in_netns(&lab.client_ns, move || {
        let sock = net::udp(bind, Some(&iface), true).expect("client socket");
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        sock.send_to(&wire, to).expect("sending");
        let mut buf = [0u8; 1500];
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        Packet::decode(buf.get(..n)?).ok()
    })
}

#[test]
fn proxy_dhcp_answers_pxe_clients_only_on_67_and_4011() {
    require_root_and(&[("ip", "iproute2")]);
    let lab = Lab::new("px", true);
    let server = DhcpServer::proxy(
        SERVER_IP.parse().unwrap(),
        BootFiles::debian(HTTP_BASE),
        inventory(),
    );
    let running = start_dhcp(&lab, server, true);
    let mac = CLIENT_MAC.parse().unwrap();
    let bcast: SocketAddr = "255.255.255.255:67".parse().unwrap();
    let any68: SocketAddr = "0.0.0.0:68".parse().unwrap();

    let mut discover = Packet::request(MessageType::Discover, mac, 0x4242);
    discover.set(
        opt::VENDOR_CLASS,
        b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
    );
    discover.set(opt::CLIENT_ARCH, 7u16.to_be_bytes());
    let offer = pxe_exchange(&lab, any68, bcast, &discover).expect("proxyDHCP offer");
    assert_eq!(offer.message_type(), Some(MessageType::Offer));
    assert_eq!(offer.xid, 0x4242);
    assert_eq!(
        offer.yiaddr,
        Ipv4Addr::UNSPECIFIED,
        "proxyDHCP must not offer an address"
    );
    assert_eq!(offer.file, b"ipxe.efi");
    assert_eq!(offer.siaddr, SERVER_IP.parse::<Ipv4Addr>().unwrap());
    assert_eq!(offer.vendor_class(), Some(&b"PXEClient"[..]));
    assert_eq!(
        offer.options.get(&opt::VENDOR_SPECIFIC).map(Vec::as_slice),
        Some(&[6u8, 1, 8, 255][..])
    );

    // A plain DHCP client gets nothing from the proxy.
    let plain = Packet::request(MessageType::Discover, mac, 0x4343);
    assert!(
        pxe_exchange(&lab, any68, bcast, &plain).is_none(),
        "proxy answered a non-PXE client"
    );

    // The PXE request to port 4011 gets an ACK back to the client's address.
    let mut request = discover.clone();
    request.set(opt::MESSAGE_TYPE, [MessageType::Request.as_u8()]);
    request.ciaddr = CLIENT_IP.parse().unwrap();
    request.flags = 0;
    let from: SocketAddr = format!("{CLIENT_IP}:68").parse().unwrap();
    let to: SocketAddr = format!("{SERVER_IP}:4011").parse().unwrap();
    let ack = pxe_exchange(&lab, from, to, &request).expect("ACK on 4011");
    assert_eq!(ack.message_type(), Some(MessageType::Ack));
    assert_eq!(ack.file, b"ipxe.efi");
    assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
    running.stop().expect("proxy stopped cleanly");
}

fn tftp_root() -> (tempfile::TempDir, tempfile::TempDir) {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"not for TFTP clients").unwrap();
    let root = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.path().join("big.bin"), &big).unwrap();
    std::fs::create_dir(root.path().join("sub")).unwrap();
    std::fs::write(root.path().join("sub/exact512.bin"), vec![0x5a; 1024]).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("escape")).unwrap();
    (outside, root)
}

fn start_tftp(lab: &Lab, root: PathBuf) -> Running {
    let iface = lab.server_if.clone();
    Running::start(&lab.server_ns, move |shutdown| {
        let mut cfg = TftpConfig::ipxe(Path::new(IPXE_DIR), Some(root));
        cfg.interface = Some(iface.clone());
        cfg.timeout = Duration::from_millis(500);
        let sock = net::udp(
            format!("{SERVER_IP}:69").parse().unwrap(),
            Some(&iface),
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(Box::pin(async move {
            TftpServer::new(cfg)
                .serve(sock, shutdown)
                .await
                .map_err(|e| e.to_string())
        }))
    })
}

fn tftp_get(lab: &Lab, remote: &str, local: &Path, verbose: bool) -> String {
    let mut cmd = lab.client_cmd("tftp");
    if verbose {
        cmd.arg("-v");
    }
    cmd.args([
        "-m",
        "binary",
        SERVER_IP,
        "-c",
        "get",
        remote,
        local.to_str().unwrap(),
    ]);
    let out = cmd.output().expect("running tftp");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn tftp_hpa_downloads_ipxe_byte_identical_and_traversal_is_refused() {
    require_root_and(&[("tftp", "tftp-hpa"), ("ip", "iproute2")]);
    require_ipxe();
    let (_outside, root) = tftp_root();
    let lab = Lab::new("tf", true);
    let running = start_tftp(&lab, root.path().to_path_buf());
    let dl = tempfile::tempdir().unwrap();

    for (remote, original) in [
        (
            "undionly.kpxe",
            PathBuf::from(IPXE_DIR).join("undionly.kpxe"),
        ),
        ("ipxe.efi", PathBuf::from(IPXE_DIR).join("ipxe.efi")),
        ("big.bin", root.path().join("big.bin")),
        // A multiple of 512: the transfer ends with an empty DATA block.
        ("/sub/exact512.bin", root.path().join("sub/exact512.bin")),
    ] {
        let local = dl
            .path()
            .join(remote.trim_start_matches('/').replace('/', "_"));
        let log = tftp_get(&lab, remote, &local, true);
        let got = std::fs::read(&local).unwrap_or_default();
        let want = std::fs::read(&original).unwrap();
        assert!(
            got == want,
            "{remote}: {} bytes received, {} expected; tftp said: {log}",
            got.len(),
            want.len()
        );
    }

    for (remote, expect) in [
        ("../../../../etc/passwd", "Access violation"),
        ("sub/../../etc/passwd", "Access violation"),
        ("escape", "Access violation"),
        ("sub", "Access violation"),
        ("missing.bin", "File not found"),
    ] {
        let local = dl.path().join("refused");
        let log = tftp_get(&lab, remote, &local, false);
        assert!(
            log.contains(expect),
            "{remote}: expected {expect:?}, tftp said: {log}"
        );
        let got = std::fs::read(&local).unwrap_or_default();
        assert!(
            !got.starts_with(b"root:") && !got.starts_with(b"not for"),
            "{remote} leaked content"
        );
    }

    // Writes are refused.
    let src = dl.path().join("upload");
    std::fs::write(&src, b"x").unwrap();
    let out = lab
        .client_cmd("tftp")
        .args([
            "-m",
            "binary",
            SERVER_IP,
            "-c",
            "put",
            src.to_str().unwrap(),
            "upload",
        ])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("Error code 2"), "put: {log}");
    assert!(!root.path().join("upload").exists());
    running.stop().expect("TFTP stopped cleanly");
}

/// A minimal blocking TFTP client speaking the options, to check the OACK exactly and to run a
/// transfer long enough for the block number to roll over.
fn raw_tftp_get(file: &str, options: &[(&str, &str)]) -> (Vec<(String, String)>, Vec<u8>) {
    let sock = UdpSocket::bind(format!("{CLIENT_IP}:0")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let rrq = Tftp::Rrq(keelson_provisioner::tftp::packet::Request {
        filename: file.into(),
        mode: "octet".into(),
        options: options
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    });
    sock.send_to(&rrq.encode(), format!("{SERVER_IP}:69"))
        .unwrap();
    let mut buf = vec![0u8; 70_000];
    let (n, peer) = sock.recv_from(&mut buf).expect("first reply");
    sock.connect(peer).unwrap();
    let mut oack = Vec::new();
    let mut data = Vec::new();
    let mut pkt = Tftp::decode(&buf[..n]).unwrap();
    let mut expected: u16 = 1;
    loop {
        match pkt {
            Tftp::Oack(o) => {
                oack = o;
                sock.send(&Tftp::Ack(0).encode()).unwrap();
            }
            Tftp::Data { block, data: d } => {
                assert_eq!(block, expected, "block order");
                sock.send(&Tftp::Ack(block).encode()).unwrap();
                let blksize = oack
                    .iter()
                    .find(|(k, _)| k == "blksize")
                    .map_or(512, |(_, v)| v.parse::<usize>().unwrap());
                let last = d.len() < blksize;
                data.extend_from_slice(&d);
                if last {
                    return (oack, data);
                }
                expected = expected.wrapping_add(1);
            }
            other => panic!("unexpected {other:?}"),
        }
        let n = sock.recv(&mut buf).expect("next packet");
        pkt = Tftp::decode(&buf[..n]).unwrap();
    }
}

#[test]
fn tftp_options_blksize_tsize_timeout_and_block_rollover() {
    require_root_and(&[("curl", "curl"), ("ip", "iproute2")]);
    require_ipxe();
    let (_outside, root) = tftp_root();
    // 8-byte blocks over 600 000 bytes: 75 000 blocks, so the block number wraps past 65535.
    let rollover: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(root.path().join("rollover.bin"), &rollover).unwrap();
    let lab = Lab::new("to", true);
    let running = start_tftp(&lab, root.path().to_path_buf());

    let efi_len = std::fs::metadata(Path::new(IPXE_DIR).join("ipxe.efi"))
        .unwrap()
        .len();
    let (oack, data) = in_netns(&lab.client_ns, || {
        raw_tftp_get(
            "ipxe.efi",
            &[
                ("blksize", "1468"),
                ("tsize", "0"),
                ("timeout", "2"),
                ("windowsize", "4"),
            ],
        )
    });
    assert_eq!(
        oack,
        vec![
            ("blksize".to_string(), "1468".to_string()),
            ("tsize".to_string(), efi_len.to_string()),
            ("timeout".to_string(), "2".to_string()),
        ],
        "unknown options are left out of the OACK"
    );
    assert_eq!(
        data,
        std::fs::read(Path::new(IPXE_DIR).join("ipxe.efi")).unwrap()
    );

    let (_, data) = in_netns(&lab.client_ns, || {
        raw_tftp_get("rollover.bin", &[("blksize", "8")])
    });
    assert!(
        data == rollover,
        "rollover transfer differs ({} bytes)",
        data.len()
    );

    // curl's TFTP client negotiates blksize and tsize.
    let dl = tempfile::tempdir().unwrap();
    let out_path = dl.path().join("undionly.kpxe");
    let out = lab
        .client_cmd("curl")
        .args([
            "-sS",
            "--tftp-blksize",
            "1024",
            "-o",
            out_path.to_str().unwrap(),
        ])
        .arg(format!("tftp://{SERVER_IP}/undionly.kpxe"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl tftp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        std::fs::read(Path::new(IPXE_DIR).join("undionly.kpxe")).unwrap()
    );
    running.stop().expect("TFTP stopped cleanly");
}

fn curl(lab: &Lab, args: &[&str]) -> (u16, Vec<u8>) {
    let out = lab
        .client_cmd("curl")
        .args(["-sS", "--path-as-is", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = out.stdout;
    let split = body.iter().rposition(|&b| b == b'\n').unwrap();
    let code = String::from_utf8_lossy(&body[split + 1..])
        .trim()
        .parse()
        .unwrap();
    (code, body[..split].to_vec())
}

fn get_text(lab: &Lab, path: &str) -> (u16, String) {
    let (code, body) = curl(lab, &[&format!("{HTTP_BASE}{path}")]);
    (code, String::from_utf8(body).unwrap())
}

#[test]
fn http_serves_ipxe_script_nocloud_seed_and_confined_assets() {
    require_root_and(&[("curl", "curl"), ("ip", "iproute2")]);
    require_ipxe();
    let (_outside, assets) = tftp_root();
    std::fs::write(assets.path().join("vmlinuz"), b"kernel bytes").unwrap();
    let lab = Lab::new("ht", true);
    let cfg = HttpConfig {
        http_base: HTTP_BASE.into(),
        inventory: inventory().into(),
        assets: Some(assets.path().to_path_buf()),
        boot_files: BTreeMap::from([(
            "ipxe.efi".to_string(),
            PathBuf::from(IPXE_DIR).join("ipxe.efi"),
        )]),
        max_requests: 16,
    };
    let iface = lab.server_if.clone();
    let running = Running::start(&lab.server_ns, move |shutdown| {
        let l = net::tcp_listener(format!("{SERVER_IP}:8080").parse().unwrap(), Some(&iface))
            .map_err(|e| e.to_string())?;
        Ok(Box::pin(async move {
            http::serve(l, cfg, shutdown)
                .await
                .map_err(|e| e.to_string())
        }))
    });

    let (code, script) = get_text(&lab, "/ipxe/525400123456");
    assert_eq!(code, 200);
    assert_eq!(
        script,
        "#!ipxe\necho Keelson: booting node-1 (profile worker)\n\
         kernel http://192.0.2.1:8080/assets/vmlinuz initrd=initrd.img console=ttyS0 quiet \
         ds=nocloud;s=http://192.0.2.1:8080/nocloud/node-1/\n\
         initrd http://192.0.2.1:8080/assets/initrd.img\nboot\n"
    );
    // The colon form works too; an unknown MAC gets the default profile under its MAC id.
    assert_eq!(get_text(&lab, "/ipxe/52:54:00:12:34:56").1, script);
    let (code, other) = get_text(&lab, "/ipxe/52-54-00-00-00-07");
    assert_eq!(code, 200);
    assert!(
        other.contains("ds=nocloud;s=http://192.0.2.1:8080/nocloud/mac-525400000007/"),
        "{other}"
    );
    assert_eq!(get_text(&lab, "/ipxe/not-a-mac").0, 400);

    assert_eq!(
        get_text(&lab, "/nocloud/node-1/meta-data"),
        (200, "instance-id: node-1\nlocal-hostname: node-1\n".into())
    );
    let (code, ud) = get_text(&lab, "/nocloud/node-1/user-data");
    assert_eq!(code, 200);
    assert!(ud.starts_with("#cloud-config\n"), "{ud}");
    for needle in [
        "hostname: node-1",
        "packages:",
        "curl",
        "ssh_authorized_keys:",
        "runcmd:",
    ] {
        assert!(ud.contains(needle), "user-data lacks {needle:?}: {ud}");
    }
    assert_eq!(
        get_text(&lab, "/nocloud/node-1/vendor-data"),
        (200, String::new())
    );
    let (code, nc) = get_text(&lab, "/nocloud/node-1/network-config");
    assert_eq!(code, 200);
    assert!(
        nc.contains("version: 2") && nc.contains("52:54:00:12:34:56") && nc.contains("dhcp4: true"),
        "{nc}"
    );
    assert_eq!(
        get_text(&lab, "/nocloud/mac-525400000007/meta-data").1,
        "instance-id: mac-525400000007\nlocal-hostname: mac-525400000007\n"
    );
    assert_eq!(get_text(&lab, "/nocloud/nobody/meta-data").0, 404);
    assert_eq!(get_text(&lab, "/nocloud/node-1/secrets").0, 404);

    // Assets, confined; boot binaries for UEFI HTTP boot.
    assert_eq!(
        curl(&lab, &[&format!("{HTTP_BASE}/assets/vmlinuz")]),
        (200, b"kernel bytes".to_vec())
    );
    assert_eq!(
        curl(&lab, &[&format!("{HTTP_BASE}/assets/big.bin")]).1,
        std::fs::read(assets.path().join("big.bin")).unwrap()
    );
    for bad in [
        "/assets/../../../etc/passwd",
        "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/assets/sub/..%2f..%2fescape",
        "/assets/escape",
    ] {
        let (code, body) = curl(&lab, &[&format!("{HTTP_BASE}{bad}")]);
        assert!(code == 403 || code == 404, "{bad}: HTTP {code}");
        assert!(
            !body.starts_with(b"root:") && !body.starts_with(b"not for"),
            "{bad} leaked content"
        );
    }
    assert_eq!(curl(&lab, &[&format!("{HTTP_BASE}/assets/escape")]).0, 403);
    let (code, efi) = curl(&lab, &[&format!("{HTTP_BASE}/boot/ipxe.efi")]);
    assert_eq!(code, 200);
    assert!(
        efi == std::fs::read(Path::new(IPXE_DIR).join("ipxe.efi")).unwrap(),
        "ipxe.efi differs"
    );
    assert_eq!(curl(&lab, &[&format!("{HTTP_BASE}/boot/passwd")]).0, 404);
    running.stop().expect("HTTP stopped cleanly");
}

#[test]
fn binary_serves_dhcp_tftp_and_http_and_stops_on_sigterm() {
    require_root_and(&[
        ("dhclient", "isc-dhcp-client"),
        ("tftp", "tftp-hpa"),
        ("curl", "curl"),
        ("ip", "iproute2"),
    ]);
    require_ipxe();
    let dir = tempfile::tempdir().unwrap();
    let inv_path = dir.path().join("inventory.toml");
    std::fs::write(&inv_path, INVENTORY).unwrap();
    let assets = dir.path().join("assets");
    std::fs::create_dir(&assets).unwrap();
    std::fs::write(assets.join("vmlinuz"), b"kernel").unwrap();
    let lease_file = dir.path().join("state/leases.json");
    let lab = Lab::new("bin", true);

    let check = Command::new(env!("CARGO_BIN_EXE_keelson-provisioner"))
        .args(["check", "--inventory", inv_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .contains("node-1\t52:54:00:12:34:56\t-\t192.0.2.10\tworker")
    );

    let server = ChildGuard::spawn(
        lab.server_cmd(env!("CARGO_BIN_EXE_keelson-provisioner"))
            .args([
                "serve",
                "--inventory",
                inv_path.to_str().unwrap(),
                "--interface",
                &lab.server_if,
                "--listen",
                SERVER_IP,
                "--lease-file",
                lease_file.to_str().unwrap(),
                "--assets",
                assets.to_str().unwrap(),
            ]),
    );
    let up = wait_for(Duration::from_secs(10), || {
        let out = lab
            .client_cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{HTTP_BASE}/ipxe/525400123456"),
            ])
            .output()
            .ok()?;
        (out.stdout == b"200").then_some(())
    });
    if up.is_none() {
        let out = server.terminate(Duration::from_secs(2));
        panic!(
            "provisioner did not come up: {:?}",
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
    }

    let lease = dhclient_lease(&lab, dir.path(), "bin", PXE_BIOS_CONF);
    assert!(
        lease.contains("fixed-address 192.0.2.10;")
            && lease.contains("filename \"undionly.kpxe\";"),
        "{lease}"
    );
    let local = dir.path().join("undionly.kpxe");
    let log = tftp_get(&lab, "undionly.kpxe", &local, false);
    assert_eq!(
        std::fs::read(&local).unwrap_or_default(),
        std::fs::read(Path::new(IPXE_DIR).join("undionly.kpxe")).unwrap(),
        "tftp: {log}"
    );
    let (code, script) = get_text(&lab, "/ipxe/525400123456");
    assert_eq!(code, 200);
    assert!(
        script.starts_with("#!ipxe\n")
            && script.contains("ds=nocloud;s=http://192.0.2.1:8080/nocloud/node-1/")
    );
    assert_eq!(
        curl(&lab, &[&format!("{HTTP_BASE}/assets/vmlinuz")]),
        (200, b"kernel".to_vec())
    );

    let out = server
        .terminate(Duration::from_secs(5))
        .expect("provisioner output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "provisioner exit {}: {stderr}",
        out.status
    );
    for server in ["dhcp", "tftp", "http"] {
        assert!(
            stderr.contains(&format!("server=\"{server}\""))
                || stderr.contains(&format!("server={server}")),
            "{server} did not stop cleanly: {stderr}"
        );
    }
    assert!(
        std::fs::read_to_string(&lease_file)
            .unwrap()
            .contains("192.0.2.10")
    );
}

#[test]
fn generated_user_data_passes_cloud_init_schema() {
    require_tools(&[("cloud-init", "cloud-init")]);
    let inv = inventory();
    let target = inv.target(CLIENT_MAC.parse().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "user-data",
            keelson_provisioner::nocloud::user_data(&target).unwrap(),
        ),
        (
            "join-user-data",
            keelson_provisioner::nocloud::join_user_data(
                &target,
                &keelson_provisioner::live::JoinInfo {
                    server: "https://192.0.2.1:6443".into(),
                    ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
                    token: "abcdef.0123456789abcdef".into(),
                },
            )
            .unwrap(),
        ),
        ("empty", "#cloud-config\n{}\n".to_string()),
        // The example for installed servers that `cargo xtask node-image` writes out.
        (
            "server-user-data",
            include_str!("../../xtask/src/node_image/server-user-data.yaml").to_string(),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &text).unwrap();
        let out = Command::new("cloud-init")
            .args(["schema", "--config-file", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cloud-init schema rejected {name}:\n{text}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The check discriminates: a wrong type is rejected.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "#cloud-config\npackages: 3\n").unwrap();
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "cloud-init schema accepted a broken config"
    );
}

#[test]
fn binary_in_proxy_dhcp_mode_answers_pxe_without_addresses() {
    require_root_and(&[("curl", "curl"), ("ip", "iproute2")]);
    require_ipxe();
    let dir = tempfile::tempdir().unwrap();
    // proxyDHCP needs no [dhcp] section: the existing DHCP server owns the addresses.
    let text = INVENTORY.replace("[dhcp]\npool_start = \"192.0.2.100\"\npool_end = \"192.0.2.110\"\nprefix_len = 24\ndns = [\"192.0.2.1\"]\nlease_secs = 600\n", "");
    assert!(!text.contains("[dhcp]"));
    let inv_path = dir.path().join("inventory.toml");
    std::fs::write(&inv_path, text).unwrap();
    let lab = Lab::new("bpx", true);
    let server = ChildGuard::spawn(
        lab.server_cmd(env!("CARGO_BIN_EXE_keelson-provisioner"))
            .args([
                "serve",
                "--inventory",
                inv_path.to_str().unwrap(),
                "--interface",
                &lab.server_if,
                "--listen",
                SERVER_IP,
                "--proxy-dhcp",
            ]),
    );
    let up = wait_for(Duration::from_secs(10), || {
        let out = lab
            .client_cmd("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{HTTP_BASE}/ipxe/525400123456"),
            ])
            .output()
            .ok()?;
        (out.stdout == b"200").then_some(())
    });
    if up.is_none() {
        let out = server.terminate(Duration::from_secs(2));
        panic!(
            "provisioner did not come up: {:?}",
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        );
    }
    let mut discover = Packet::request(MessageType::Discover, CLIENT_MAC.parse().unwrap(), 77);
    discover.set(
        opt::VENDOR_CLASS,
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    );
    discover.set(opt::CLIENT_ARCH, 0u16.to_be_bytes());
    discover.set(opt::USER_CLASS, b"iPXE".to_vec());
    let offer = pxe_exchange(
        &lab,
        "0.0.0.0:68".parse().unwrap(),
        "255.255.255.255:67".parse().unwrap(),
        &discover,
    )
    .expect("proxyDHCP offer from the binary");
    assert_eq!(offer.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(offer.file, b"http://192.0.2.1:8080/ipxe/525400123456");
    let out = server
        .terminate(Duration::from_secs(5))
        .expect("provisioner output");
    assert!(
        out.status.success(),
        "provisioner exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with a tap device for a qemu VM (no veth, no route out).
struct TapLab {
    ns: String,
    tap: String,
}

impl TapLab {
    fn new(tag: &str) -> TapLab {
        let pid = std::process::id();
        let lab = TapLab {
            ns: format!("kprov-{tag}-{pid}"),
            tap: format!("kp{tag}{}t", pid % 100_000),
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &lab.ns])
            .stderr(std::process::Stdio::null())
            .status();
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?} failed");
        };
        ip(&["netns", "add", &lab.ns]);
        ip(&[
            "-n", &lab.ns, "tuntap", "add", "dev", &lab.tap, "mode", "tap",
        ]);
        ip(&[
            "-n",
            &lab.ns,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            &lab.tap,
        ]);
        ip(&["-n", &lab.ns, "link", "set", &lab.tap, "up"]);
        ip(&["-n", &lab.ns, "link", "set", "lo", "up"]);
        lab
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

impl Drop for TapLab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Boots a qemu VM (TCG) whose NIC network-boots against `keelson-provisioner serve`, and
/// waits until the server's log shows every line of `wanted` (in order); returns the log.
fn qemu_pxe(tag: &str, firmware: &[&str], nic_extra: &str, wanted: &[&str]) -> String {
    require_root_and(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("ip", "iproute2"),
    ]);
    require_ipxe();
    let dir = tempfile::tempdir().unwrap();
    let inv_path = dir.path().join("inventory.toml");
    std::fs::write(&inv_path, INVENTORY).unwrap();
    let assets = dir.path().join("assets");
    std::fs::create_dir(&assets).unwrap();
    // Not a real kernel: the test ends when iPXE has fetched what the script names.
    std::fs::write(assets.join("vmlinuz"), b"not a kernel").unwrap();
    std::fs::write(assets.join("initrd.img"), b"not an initrd").unwrap();
    let log_path = dir.path().join("server.log");
    let lab = TapLab::new(tag);
    let mut serve = lab.cmd(env!("CARGO_BIN_EXE_keelson-provisioner"));
    serve
        .args([
            "serve",
            "--inventory",
            inv_path.to_str().unwrap(),
            "--interface",
            &lab.tap,
            "--listen",
            SERVER_IP,
        ])
        .args([
            "--lease-file",
            dir.path().join("leases.json").to_str().unwrap(),
            "--assets",
            assets.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let _server = ChildGuard(Some(serve.spawn().expect("starting the provisioner")));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(10), || log()
            .contains("HTTP server running")
            .then_some(()))
        .is_some(),
        "{}",
        log()
    );
    let mut qemu = lab.cmd("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg",
        "-m",
        "256",
        "-display",
        "none",
        "-no-reboot",
        "-boot",
        "n",
    ])
    .args(firmware)
    .args([
        "-netdev",
        &format!("tap,id=n0,ifname={},script=no,downscript=no", lab.tap),
    ])
    .args([
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={CLIENT_MAC}{nic_extra}"),
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let _vm = ChildGuard(Some(qemu.spawn().expect("starting qemu")));
    let in_order = |text: &str| {
        let mut rest = text;
        for w in wanted {
            match rest.find(w) {
                Some(i) => rest = &rest[i + w.len()..],
                None => return false,
            }
        }
        true
    };
    match wait_for(Duration::from_secs(100), || {
        let l = log();
        in_order(&l).then_some(l)
    }) {
        Some(l) => l,
        None => panic!(
            "the VM did not get through {wanted:?}; server log:\n{}",
            log()
        ),
    }
}

#[test]
fn qemu_bios_ipxe_rom_gets_script_kernel_and_initrd() {
    // The virtio NIC's boot ROM (Debian's ipxe-qemu) is iPXE: it says so in its user class
    // and goes straight to the HTTP script.
    let log = qemu_pxe(
        "qb",
        &[],
        "",
        &[
            "boot client mac=52:54:00:12:34:56 machine=node-1 client=Ipxe",
            "lease granted mac=52:54:00:12:34:56 ip=192.0.2.10",
            "serving iPXE script mac=52:54:00:12:34:56 machine=node-1",
            "file=vmlinuz",
            "file=initrd.img",
        ],
    );
    assert!(!log.contains("client=PxeBios"), "{log}");
}

#[test]
fn qemu_uefi_pxe_chain_loads_ipxe_over_tftp_once_then_gets_script() {
    require_root_and(&[("qemu-system-x86_64", "qemu-system-x86")]);
    let ovmf = "/usr/share/qemu/OVMF.fd";
    assert!(
        Path::new(ovmf).exists(),
        "{ovmf} missing: install the Debian package `ovmf`"
    );
    let efi_len = std::fs::metadata(Path::new(IPXE_DIR).join("ipxe.efi"))
        .unwrap()
        .len();
    let done = format!("file=ipxe.efi bytes={efi_len}");
    // `romfile=` leaves the NIC without iPXE: OVMF's own PXE (arch 7) boots.
    let log = qemu_pxe(
        "qu",
        &["-bios", ovmf],
        ",romfile=",
        &[
            "client=PxeUefi file=ipxe.efi",
            "lease granted mac=52:54:00:12:34:56 ip=192.0.2.10",
            &done,
            "client=Ipxe",
            "serving iPXE script mac=52:54:00:12:34:56 machine=node-1",
            "file=vmlinuz",
        ],
    );
    // No loop: once iPXE runs, nobody is sent the iPXE binary again.
    let after_ipxe = &log[log.find("client=Ipxe").unwrap()..];
    assert!(!after_ipxe.contains("client=PxeUefi"), "{log}");
    assert_eq!(log.matches(&done).count(), 1, "{log}");
}

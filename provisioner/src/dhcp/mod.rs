//! The DHCP server, in one of two modes (enum dispatch, [`Mode`]):
//! - **full**: addresses from a pool plus reservations by MAC, leases persisted by
//!   [`leases::LeaseStore`], and PXE boot information for network-boot clients;
//! - **proxyDHCP**: beside an existing DHCP server, answers only PXE clients, on port 67
//!   (DHCPOFFER without an address) and port 4011 (DHCPACK to the client's request), and
//!   offers no address.
//!
//! Boot information comes from [`crate::boot`]: BIOS and UEFI firmware get iPXE over TFTP,
//! UEFI HTTP boot gets iPXE over HTTP, and iPXE itself gets its HTTP script.

pub mod leases;
pub mod packet;

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::boot::{BootFiles, Client, NotBootable};
use crate::inventory::DhcpSettings;
use crate::live::{InventoryHandle, Sighting};
use crate::mac::Mac;
use leases::{LeaseError, LeaseStore, Pool};
use packet::{MessageType, Packet, opt};

/// DHCP server port.
pub const SERVER_PORT: u16 = 67;
/// DHCP client port.
pub const CLIENT_PORT: u16 = 68;
/// PXE boot server (proxyDHCP request) port.
pub const PXE_PORT: u16 = 4011;
/// How long a declined address is set aside.
const DECLINE_SECS: u32 = 600;

/// Errors of the DHCP server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lease store failed.
    #[error(transparent)]
    Leases(#[from] LeaseError),
    /// Full mode needs the inventory's `[dhcp]` section.
    #[error("full DHCP mode needs a [dhcp] section in the inventory (pool, prefix_len…)")]
    NoSettings,
    /// The server address is not in the configured subnet.
    #[error(
        "server address {server} is not in the DHCP subnet of the pool {pool_start}/{prefix_len}"
    )]
    ServerOutsideSubnet {
        /// Server address.
        server: Ipv4Addr,
        /// Pool start.
        pool_start: Ipv4Addr,
        /// Prefix length.
        prefix_len: u8,
    },
    /// Receiving on a socket failed.
    #[error("receiving on the DHCP socket {port}: {source}")]
    Recv {
        /// Local port.
        port: u16,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `std` socket could not be registered with tokio.
    #[error("registering the DHCP socket with the runtime: {0}")]
    Register(std::io::Error),
}

/// Local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The full-server state.
#[derive(Debug)]
pub struct Full {
    settings: DhcpSettings,
    leases: LeaseStore,
}

/// The server's mode.
#[derive(Debug)]
pub enum Mode {
    /// Full DHCP server.
    Full(Box<Full>),
    /// proxyDHCP: PXE boot information only.
    Proxy,
}

/// On which port a request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67.
    Dhcp,
    /// 4011 (proxyDHCP requests).
    Pxe,
}

/// The sockets the server serves.
#[derive(Debug)]
pub struct Sockets {
    /// Bound to port 67 (with broadcast enabled).
    pub dhcp: std::net::UdpSocket,
    /// Bound to port 4011 (proxy mode).
    pub pxe: Option<std::net::UdpSocket>,
}

/// A DHCP or proxyDHCP server.
#[derive(Debug)]
pub struct DhcpServer {
    server_ip: Ipv4Addr,
    boot: BootFiles,
    inventory: InventoryHandle,
    mode: Mode,
    /// The SMBIOS UUID each MAC last sent.
    uuids: HashMap<Mac, Uuid>,
}

/// How many MAC → UUID pairs the server remembers.
const MAX_REMEMBERED_UUIDS: usize = 4096;

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn in_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

/// Boot decision for one request.
struct BootInfo {
    client: Client,
    file: String,
}

impl DhcpServer {
    /// A full DHCP server on `server_ip` using the inventory's `[dhcp]` settings and
    /// reservations, with leases in `lease_file` (or in memory when `None`).
    ///
    /// # Errors
    /// [`Error::NoSettings`], [`Error::ServerOutsideSubnet`], or a lease file error.
    pub fn full(
        server_ip: Ipv4Addr,
        boot: BootFiles,
        inventory: impl Into<InventoryHandle>,
        lease_file: Option<&std::path::Path>,
    ) -> Result<Self> {
        let inventory = inventory.into();
        let settings = inventory
            .current()
            .dhcp()
            .cloned()
            .ok_or(Error::NoSettings)?;
        if !in_subnet(server_ip, settings.pool_start, settings.prefix_len)
            || !in_subnet(server_ip, settings.pool_end, settings.prefix_len)
        {
            return Err(Error::ServerOutsideSubnet {
                server: server_ip,
                pool_start: settings.pool_start,
                prefix_len: settings.prefix_len,
            });
        }
        let pool = Pool {
            start: settings.pool_start,
            end: settings.pool_end,
            reservations: inventory.current().reservations(),
            excluded: std::iter::once(server_ip).chain(settings.router).collect(),
        };
        let leases = match lease_file {
            Some(p) => LeaseStore::open(p, pool)?,
            None => LeaseStore::in_memory(pool),
        };
        Ok(DhcpServer {
            server_ip,
            boot,
            inventory,
            mode: Mode::Full(Box::new(Full { settings, leases })),
            uuids: HashMap::new(),
        })
    }

    /// A proxyDHCP server on `server_ip`.
    pub fn proxy(
        server_ip: Ipv4Addr,
        boot: BootFiles,
        inventory: impl Into<InventoryHandle>,
    ) -> Self {
        DhcpServer {
            server_ip,
            boot,
            inventory: inventory.into(),
            mode: Mode::Proxy,
            uuids: HashMap::new(),
        }
    }

    /// Serves until `shutdown` completes. Malformed packets and send failures are logged and
    /// skipped.
    ///
    /// # Errors
    /// [`Error::Register`] or [`Error::Recv`] when a socket fails.
    pub async fn serve(
        mut self,
        sockets: Sockets,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let dhcp = UdpSocket::from_std(sockets.dhcp).map_err(Error::Register)?;
        let pxe = sockets
            .pxe
            .map(UdpSocket::from_std)
            .transpose()
            .map_err(Error::Register)?;
        let mode = match self.mode {
            Mode::Full(_) => "full",
            Mode::Proxy => "proxyDHCP",
        };
        info!(server = %self.server_ip, mode, "DHCP server running");
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; 4096];
        let mut buf_pxe = vec![0u8; 4096];
        loop {
            let pxe_recv = async {
                match &pxe {
                    Some(s) => s.recv_from(&mut buf_pxe).await,
                    None => std::future::pending().await,
                }
            };
            let (n, src, port, data) = tokio::select! {
                () = &mut shutdown => break,
                r = dhcp.recv_from(&mut buf) => {
                    let (n, src) = r.map_err(|source| Error::Recv { port: SERVER_PORT, source })?;
                    (n, src, Port::Dhcp, buf.get(..n).unwrap_or_default().to_vec())
                }
                r = pxe_recv => {
                    let (n, src) = r.map_err(|source| Error::Recv { port: PXE_PORT, source })?;
                    (n, src, Port::Pxe, buf_pxe.get(..n).unwrap_or_default().to_vec())
                }
            };
            let req = match Packet::decode(&data) {
                Ok(p) => p,
                Err(e) => {
                    debug!(%src, bytes = n, error = %e, "ignoring malformed DHCP packet");
                    continue;
                }
            };
            let Some((reply, dest)) = self.handle(&req, port, src, unix_now()) else {
                continue;
            };
            let socket = match (port, &pxe) {
                (Port::Pxe, Some(s)) => s,
                _ => &dhcp,
            };
            if let Err(e) = socket.send_to(&reply.encode(), dest).await {
                warn!(%dest, error = %e, "sending DHCP reply failed");
            }
        }
        info!("DHCP server stopped");
        Ok(())
    }

    /// The SMBIOS UUID of the client: the one it sends, or the one it sent before from this
    /// MAC — the OS's DHCP client after network boot does not send option 97, and must still
    /// be the same machine (same reservation, same host name).
    fn client_uuid(&mut self, req: &Packet, mac: Mac) -> Option<Uuid> {
        match req.client_uuid() {
            Some(u) => {
                if self.uuids.len() >= MAX_REMEMBERED_UUIDS && !self.uuids.contains_key(&mac) {
                    // Bounded against floods of made-up MACs; real machines send it again
                    // when they network-boot.
                    self.uuids.clear();
                }
                self.uuids.insert(mac, u);
                Some(u)
            }
            None => self.uuids.get(&mac).copied(),
        }
    }

    fn boot_info(&self, req: &Packet, mac: Mac, uuid: Option<Uuid>) -> Option<BootInfo> {
        let client = match Client::classify(
            req.vendor_class(),
            req.client_arch(),
            req.user_class_is_ipxe(),
        ) {
            Ok(c) => c,
            Err(NotBootable::NotPxe) => return None,
            Err(NotBootable::UnsupportedArch(a)) => {
                warn!(%mac, arch = a, "PXE client architecture not served");
                return None;
            }
        };
        let inventory = self.inventory.current();
        let Some(target) = inventory.target_for(mac, uuid.as_ref()) else {
            info!(%mac, ?uuid, "boot request from a machine without a profile; not answering boot options");
            return None;
        };
        let file = client.boot_file(&self.boot, mac, uuid.as_ref());
        info!(%mac, machine = %target.id, ?client, %file, "boot client");
        Some(BootInfo { client, file })
    }

    fn apply_boot(&self, req: &Packet, reply: &mut Packet, boot: &BootInfo) {
        let requested = req
            .options
            .get(&opt::PARAMETER_REQUEST_LIST)
            .is_some_and(|l| l.contains(&opt::BOOTFILE_NAME));
        if boot.file.len() < 128 {
            reply.file = boot.file.clone().into_bytes();
        }
        if requested || boot.file.len() >= 128 {
            reply.set(opt::BOOTFILE_NAME, boot.file.clone().into_bytes());
        }
        if boot.client.uses_tftp() {
            reply.siaddr = self.server_ip;
            reply.sname = self.server_ip.to_string().into_bytes();
            reply.set(
                opt::TFTP_SERVER_NAME,
                self.server_ip.to_string().into_bytes(),
            );
        }
        // Firmware needs option 60 echoed to accept the boot file. iPXE takes an offer that
        // says "PXEClient" for a ProxyDHCP offer too and then asks port 4011, which a full
        // server does not answer; instead, tell it not to wait for ProxyDHCP at all
        // (iPXE option 175.176 `no-pxedhcp`).
        let ipxe_on_full =
            matches!(boot.client, Client::Ipxe { .. }) && matches!(self.mode, Mode::Full(_));
        if ipxe_on_full {
            reply.set(opt::IPXE_ENCAP, [176, 1, 1]);
        }
        if req.vendor_class().is_some() && !ipxe_on_full {
            reply.set(
                opt::VENDOR_CLASS,
                boot.client.vendor_class().as_bytes().to_vec(),
            );
        }
        if matches!(boot.client, Client::PxeBios | Client::PxeUefi) {
            // PXE_DISCOVERY_CONTROL = 8: boot the file named here, no boot-server discovery.
            reply.set(opt::VENDOR_SPECIFIC, [6, 1, 8, opt::END]);
        }
        if let Some(uuid) = req.options.get(&opt::CLIENT_MACHINE_ID) {
            reply.set(opt::CLIENT_MACHINE_ID, uuid.clone());
        }
    }

    /// Answers one request: the reply and where to send it, or `None` to stay silent.
    /// `now` is seconds since the Unix epoch.
    pub fn handle(
        &mut self,
        req: &Packet,
        port: Port,
        src: SocketAddr,
        now: u64,
    ) -> Option<(Packet, SocketAddr)> {
        if req.op != packet::BOOTREQUEST {
            return None;
        }
        let mac = req.mac()?;
        let kind = req.message_type()?;
        debug!(%mac, ?kind, ?port, %src, "DHCP request");
        let uuid = self.client_uuid(req, mac);
        self.inventory.saw(Sighting::Dhcp(mac, uuid));
        let boot = self.boot_info(req, mac, uuid);
        match self.mode {
            Mode::Proxy => self.handle_proxy(req, kind, port, src, boot),
            Mode::Full(_) if port == Port::Pxe => None,
            Mode::Full(_) => self.handle_full(req, kind, mac, uuid, boot, now),
        }
    }

    fn handle_proxy(
        &self,
        req: &Packet,
        kind: MessageType,
        port: Port,
        src: SocketAddr,
        boot: Option<BootInfo>,
    ) -> Option<(Packet, SocketAddr)> {
        let boot = boot?;
        let (reply_kind, dest) = match (port, kind) {
            (Port::Dhcp, MessageType::Discover) => {
                (MessageType::Offer, Self::default_dest(req, false))
            }
            (Port::Pxe, MessageType::Request | MessageType::Inform) => (MessageType::Ack, src),
            _ => return None,
        };
        let mut reply = req.reply(reply_kind);
        reply.set(opt::SERVER_ID, self.server_ip.octets());
        self.apply_boot(req, &mut reply, &boot);
        Some((reply, dest))
    }

    /// Where replies go without a relay: broadcast for clients without an address, unicast
    /// to `ciaddr` otherwise (RFC 2131 4.1).
    fn default_dest(req: &Packet, nak: bool) -> SocketAddr {
        if !req.giaddr.is_unspecified() {
            return SocketAddr::V4(SocketAddrV4::new(req.giaddr, SERVER_PORT));
        }
        if !nak && !req.ciaddr.is_unspecified() {
            return SocketAddr::V4(SocketAddrV4::new(req.ciaddr, CLIENT_PORT));
        }
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT))
    }

    fn network_options(&self, settings: &DhcpSettings, reply: &mut Packet, lease: bool) {
        reply.set(opt::SERVER_ID, self.server_ip.octets());
        reply.set(opt::SUBNET_MASK, settings.netmask().octets());
        if let Some(r) = settings.router {
            reply.set(opt::ROUTER, r.octets());
        }
        if !settings.dns.is_empty() {
            reply.set(
                opt::DNS,
                settings
                    .dns
                    .iter()
                    .flat_map(|a| a.octets())
                    .collect::<Vec<u8>>(),
            );
        }
        if let Some(d) = &settings.domain {
            reply.set(opt::DOMAIN_NAME, d.as_bytes().to_vec());
        }
        if lease {
            let secs = settings.lease_secs;
            reply.set(opt::LEASE_TIME, secs.to_be_bytes());
            reply.set(opt::RENEWAL_TIME, (secs / 2).to_be_bytes());
            reply.set(opt::REBINDING_TIME, (secs / 8 * 7).to_be_bytes());
        }
    }

    fn handle_full(
        &mut self,
        req: &Packet,
        kind: MessageType,
        mac: Mac,
        uuid: Option<Uuid>,
        boot: Option<BootInfo>,
        now: u64,
    ) -> Option<(Packet, SocketAddr)> {
        let server_ip = self.server_ip;
        let Mode::Full(full) = &mut self.mode else {
            return None;
        };
        let lease_secs = full.settings.lease_secs;
        // Reservations follow the inventory as it is now (Machines change in API mode); a
        // machine known only by its UUID has its address for the MAC it asks from.
        let inventory = self.inventory.current();
        let mut reservations = inventory.reservations();
        if let Some(m) = inventory.known(&mac, uuid.as_ref())
            && let Some(ip) = m.ip
        {
            reservations.retain(|_, r| *r != ip);
            reservations.insert(mac, ip);
        }
        full.leases.set_reservations(reservations);
        if !req.giaddr.is_unspecified()
            && !in_subnet(
                req.giaddr,
                full.settings.pool_start,
                full.settings.prefix_len,
            )
        {
            debug!(%mac, giaddr = %req.giaddr, "relayed request from a subnet we do not serve");
            return None;
        }
        let (reply_kind, yiaddr) = match kind {
            MessageType::Discover => {
                let Some(ip) = full
                    .leases
                    .offer(mac, req.ip_option(opt::REQUESTED_IP), now)
                else {
                    warn!(%mac, "no address available to offer (pool exhausted or reservation in use)");
                    return None;
                };
                (MessageType::Offer, ip)
            }
            MessageType::Request => {
                if let Some(sid) = req.ip_option(opt::SERVER_ID)
                    && sid != server_ip
                {
                    debug!(%mac, %sid, "client chose another server");
                    return None;
                }
                let wanted = req
                    .ip_option(opt::REQUESTED_IP)
                    .or_else(|| (!req.ciaddr.is_unspecified()).then_some(req.ciaddr))?;
                if full.leases.may_have(mac, wanted, now) {
                    match full.leases.commit(mac, wanted, now, lease_secs) {
                        Ok(()) => (MessageType::Ack, wanted),
                        Err(e) => {
                            warn!(%mac, ip = %wanted, error = %e, "cannot persist lease; refusing it");
                            (MessageType::Nak, Ipv4Addr::UNSPECIFIED)
                        }
                    }
                } else {
                    info!(%mac, ip = %wanted, "refusing requested address");
                    (MessageType::Nak, Ipv4Addr::UNSPECIFIED)
                }
            }
            MessageType::Decline => {
                if let Some(ip) = req.ip_option(opt::REQUESTED_IP) {
                    warn!(%mac, %ip, "client declined address (in use?)");
                    if let Err(e) = full.leases.decline(mac, ip, now, DECLINE_SECS) {
                        warn!(error = %e, "recording declined address failed");
                    }
                }
                return None;
            }
            MessageType::Release => {
                if let Err(e) = full.leases.release(mac, req.ciaddr, now) {
                    warn!(error = %e, "recording release failed");
                }
                return None;
            }
            MessageType::Inform => (MessageType::Ack, Ipv4Addr::UNSPECIFIED),
            _ => return None,
        };
        let mut reply = req.reply(reply_kind);
        if reply_kind == MessageType::Nak {
            reply.set(opt::SERVER_ID, server_ip.octets());
            return Some((reply, Self::default_dest(req, true)));
        }
        reply.yiaddr = yiaddr;
        let settings = full.settings.clone();
        self.network_options(&settings, &mut reply, kind != MessageType::Inform);
        // Known machines get their host name whether or not they network-boot.
        if let Some(m) = inventory.known(&mac, uuid.as_ref()) {
            let name = m.hostname.as_deref().unwrap_or(&m.name);
            reply.set(opt::HOSTNAME, name.as_bytes().to_vec());
        }
        if let Some(b) = &boot {
            self.apply_boot(req, &mut reply, b);
        }
        if reply_kind == MessageType::Ack && kind == MessageType::Request {
            info!(%mac, ip = %yiaddr, "lease granted");
        }
        Some((reply, Self::default_dest(req, false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn inventory() -> Arc<Inventory> {
        Arc::new(
            Inventory::parse(crate::inventory::tests_sample(), std::path::Path::new("t")).unwrap(),
        )
    }

    fn files() -> BootFiles {
        BootFiles::debian("http://192.0.2.1:8080")
    }

    fn src() -> SocketAddr {
        "0.0.0.0:68".parse().unwrap()
    }

    fn pxe_discover(mac: &str, arch: u16) -> Packet {
        let mut p = Packet::request(MessageType::Discover, mac.parse().unwrap(), 7);
        p.set(
            opt::VENDOR_CLASS,
            b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
        );
        p.set(opt::CLIENT_ARCH, arch.to_be_bytes());
        p.set(opt::CLIENT_MACHINE_ID, vec![0; 17]);
        p
    }

    #[test]
    fn full_mode_dora_with_reservation_and_pxe() {
        let mut s = DhcpServer::full(SERVER, files(), inventory(), None).unwrap();
        let d = pxe_discover("52:54:00:12:34:56", 0);
        let (offer, dest) = s.handle(&d, Port::Dhcp, src(), 1000).unwrap();
        assert_eq!(dest, "255.255.255.255:68".parse::<SocketAddr>().unwrap());
        assert_eq!(offer.message_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 0, 2, 10), "reservation");
        assert_eq!(offer.file, b"undionly.kpxe");
        assert_eq!(offer.siaddr, SERVER);
        assert_eq!(offer.vendor_class(), Some(&b"PXEClient"[..]));
        assert_eq!(
            offer.options.get(&opt::CLIENT_MACHINE_ID),
            Some(&vec![0; 17])
        );
        assert_eq!(
            offer.options.get(&opt::HOSTNAME).map(Vec::as_slice),
            Some(&b"node-1"[..])
        );
        let mut r = d.clone();
        r.set(opt::MESSAGE_TYPE, [MessageType::Request.as_u8()]);
        r.set(opt::SERVER_ID, SERVER.octets());
        r.set(opt::REQUESTED_IP, offer.yiaddr.octets());
        let (ack, _) = s.handle(&r, Port::Dhcp, src(), 1001).unwrap();
        assert_eq!(ack.message_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr, offer.yiaddr);
        // A request for another server's offer is ignored.
        r.set(opt::SERVER_ID, [192, 0, 2, 99]);
        assert!(s.handle(&r, Port::Dhcp, src(), 1002).is_none());
        // Requesting an address reserved for someone else gets a NAK.
        let mut other = Packet::request(
            MessageType::Request,
            "52:54:00:00:00:01".parse().unwrap(),
            9,
        );
        other.set(opt::REQUESTED_IP, [192, 0, 2, 10]);
        let (nak, dest) = s.handle(&other, Port::Dhcp, src(), 1003).unwrap();
        assert_eq!(nak.message_type(), Some(MessageType::Nak));
        assert_eq!(dest, "255.255.255.255:68".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn full_mode_non_pxe_client_gets_address_without_boot_file() {
        let mut s = DhcpServer::full(SERVER, files(), inventory(), None).unwrap();
        let d = Packet::request(
            MessageType::Discover,
            "52:54:00:00:00:02".parse().unwrap(),
            1,
        );
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 0, 2, 100));
        assert!(offer.file.is_empty());
        assert_eq!(offer.siaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            offer.ip_option(opt::SUBNET_MASK),
            Some(Ipv4Addr::new(255, 255, 255, 0))
        );
        assert_eq!(offer.ip_option(opt::ROUTER), Some(SERVER));
    }

    #[test]
    fn known_machine_gets_its_host_name_without_pxe() {
        let mut s = DhcpServer::full(SERVER, files(), inventory(), None).unwrap();
        let d = Packet::request(
            MessageType::Discover,
            "52:54:00:12:34:56".parse().unwrap(),
            1,
        );
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(
            offer.options.get(&opt::HOSTNAME).map(Vec::as_slice),
            Some(&b"node-1"[..])
        );
        assert!(offer.file.is_empty());
    }

    #[test]
    fn a_machine_known_by_uuid_gets_its_address_name_and_script() {
        let uuid: uuid::Uuid = "4c4c4544-0043-3010-8052-b4c04f4e4d32".parse().unwrap();
        let text = format!(
            "{}\n[[machines]]\nname = \"by-uuid\"\nuuid = \"{uuid}\"\nip = \"192.0.2.20\"\n",
            crate::inventory::tests_sample()
        );
        let inv = Inventory::parse(&text, std::path::Path::new("t")).unwrap();
        let mut s = DhcpServer::full(SERVER, files(), inv, None).unwrap();
        // Firmware that sends the UUID in SMBIOS byte order still matches.
        let mut d = pxe_discover("52:54:00:00:00:77", 7);
        let mut id = vec![0];
        id.extend(crate::smbios::swapped(&uuid).as_bytes());
        d.set(opt::CLIENT_MACHINE_ID, id.clone());
        d.set(opt::USER_CLASS, b"iPXE".to_vec());
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 0, 2, 20));
        assert_eq!(
            offer.options.get(&opt::HOSTNAME).map(Vec::as_slice),
            Some(&b"by-uuid"[..])
        );
        let file = String::from_utf8(offer.file.clone()).unwrap();
        assert_eq!(
            file,
            format!(
                "http://192.0.2.1:8080/ipxe/525400000077?uuid={}",
                crate::smbios::swapped(&uuid)
            )
        );
        // The OS's DHCP client after boot sends no UUID: the same MAC is still that machine.
        let after_boot = Packet::request(
            MessageType::Discover,
            "52:54:00:00:00:77".parse().unwrap(),
            3,
        );
        let (offer, _) = s.handle(&after_boot, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 0, 2, 20));
        // Another MAC without the UUID is an unknown machine, from the pool.
        let plain = Packet::request(
            MessageType::Discover,
            "52:54:00:00:00:78".parse().unwrap(),
            2,
        );
        let (offer, _) = s.handle(&plain, Port::Dhcp, src(), 0).unwrap();
        assert!(
            (100..=110).contains(&offer.yiaddr.octets()[3]),
            "{}",
            offer.yiaddr
        );
        assert!(!offer.options.contains_key(&opt::HOSTNAME));
    }

    #[test]
    fn reservations_follow_the_inventory() {
        let handle = crate::live::InventoryHandle::from(inventory());
        let mut s = DhcpServer::full(SERVER, files(), handle.clone(), None).unwrap();
        let mac = "52:54:00:00:00:42".parse().unwrap();
        let d = Packet::request(MessageType::Discover, mac, 1);
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert!((100..=110).contains(&offer.yiaddr.octets()[3]));
        // A machine for that MAC with an address appears (a Machine created in API mode).
        let added = crate::inventory::Machine {
            name: "late".into(),
            mac: Some(mac),
            uuid: None,
            ip: Some(Ipv4Addr::new(192, 0, 2, 30)),
            hostname: None,
            profile: Some("worker".into()),
        };
        handle.replace(inventory().with_machines(vec![added]));
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 1).unwrap();
        assert_eq!(offer.yiaddr, Ipv4Addr::new(192, 0, 2, 30));
    }

    #[test]
    fn ipxe_gets_the_script_not_the_binary_again() {
        let mut s = DhcpServer::full(SERVER, files(), inventory(), None).unwrap();
        let mut d = pxe_discover("52:54:00:12:34:56", 7);
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.file, b"ipxe.efi");
        d.set(opt::USER_CLASS, b"iPXE".to_vec());
        d.set(opt::PARAMETER_REQUEST_LIST, vec![1, 3, 67]);
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.file, b"http://192.0.2.1:8080/ipxe/525400123456");
        assert_eq!(offer.options.get(&opt::BOOTFILE_NAME), Some(&offer.file));
        assert!(!offer.options.contains_key(&opt::VENDOR_SPECIFIC));
        assert!(!offer.options.contains_key(&opt::VENDOR_CLASS));
        assert_eq!(
            offer.options.get(&opt::IPXE_ENCAP).map(Vec::as_slice),
            Some(&[176u8, 1, 1][..])
        );
    }

    #[test]
    fn uefi_http_boot_gets_an_url_and_httpclient() {
        let mut s = DhcpServer::full(SERVER, files(), inventory(), None).unwrap();
        let mut d = pxe_discover("52:54:00:12:34:56", 16);
        d.set(
            opt::VENDOR_CLASS,
            b"HTTPClient:Arch:00016:UNDI:003001".to_vec(),
        );
        let (offer, _) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.file, b"http://192.0.2.1:8080/boot/ipxe.efi");
        assert_eq!(offer.vendor_class(), Some(&b"HTTPClient"[..]));
    }

    #[test]
    fn proxy_mode_answers_only_pxe_and_offers_no_address() {
        let mut s = DhcpServer::proxy(SERVER, files(), inventory());
        let plain = Packet::request(
            MessageType::Discover,
            "52:54:00:00:00:03".parse().unwrap(),
            1,
        );
        assert!(s.handle(&plain, Port::Dhcp, src(), 0).is_none());
        let d = pxe_discover("52:54:00:00:00:03", 9);
        let (offer, dest) = s.handle(&d, Port::Dhcp, src(), 0).unwrap();
        assert_eq!(offer.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(offer.file, b"ipxe.efi");
        assert_eq!(offer.ip_option(opt::SERVER_ID), Some(SERVER));
        assert!(!offer.options.contains_key(&opt::LEASE_TIME));
        assert_eq!(dest, "255.255.255.255:68".parse::<SocketAddr>().unwrap());
        // Requests on 67 belong to the real DHCP server.
        let mut r = d.clone();
        r.set(opt::MESSAGE_TYPE, [MessageType::Request.as_u8()]);
        assert!(s.handle(&r, Port::Dhcp, src(), 0).is_none());
        // On 4011 the request gets an ACK, unicast back to where it came from.
        let from: SocketAddr = "192.0.2.50:68".parse().unwrap();
        let (ack, dest) = s.handle(&r, Port::Pxe, from, 0).unwrap();
        assert_eq!(ack.message_type(), Some(MessageType::Ack));
        assert_eq!(dest, from);
        assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn ignore_policy_gives_unknown_pxe_clients_no_boot() {
        let text = crate::inventory::tests_sample()
            .replace("unknown = \"default\"", "unknown = \"ignore\"");
        let inv = Arc::new(Inventory::parse(&text, std::path::Path::new("t")).unwrap());
        let mut s = DhcpServer::proxy(SERVER, files(), inv);
        assert!(
            s.handle(&pxe_discover("52:54:00:00:00:04", 0), Port::Dhcp, src(), 0)
                .is_none()
        );
        assert!(
            s.handle(&pxe_discover("52:54:00:12:34:56", 0), Port::Dhcp, src(), 0)
                .is_some()
        );
    }

    #[test]
    fn a_decline_from_another_client_does_not_free_a_lease() {
        let mut s = DhcpServer::full(SERVER, files(), inventory(), None).unwrap();
        let request = |mac: u8, kind: MessageType| {
            let mut p = Packet::request(kind, Mac([2, 0, 0, 0, 0, mac]), 1);
            p.set(opt::REQUESTED_IP, [192, 0, 2, 100]);
            p
        };
        let (ack, _) = s
            .handle(&request(1, MessageType::Request), Port::Dhcp, src(), 1000)
            .unwrap();
        assert_eq!(
            (ack.message_type(), ack.yiaddr),
            (Some(MessageType::Ack), Ipv4Addr::new(192, 0, 2, 100))
        );
        assert!(
            s.handle(&request(2, MessageType::Decline), Port::Dhcp, src(), 1001)
                .is_none()
        );
        let (nak, _) = s
            .handle(
                &request(3, MessageType::Request),
                Port::Dhcp,
                src(),
                1001 + 700,
            )
            .unwrap();
        assert_eq!(nak.message_type(), Some(MessageType::Nak));
    }

    /// One generated client message.
    #[derive(Debug, Clone)]
    struct Step {
        kind: u8,
        mac: u8,
        arch: Option<u16>,
        pxe: bool,
        ipxe: bool,
        requested: Option<u8>,
        server_id: Option<u8>,
        ciaddr: Option<u8>,
        on_4011: bool,
        extra: Vec<(u8, Vec<u8>)>,
        /// Seconds passing before this message.
        dt: u64,
    }

    fn step() -> impl Strategy<Value = Step> {
        // Mostly the messages that change state, sometimes anything.
        let kind = prop_oneof![3 => Just(1u8), 5 => Just(3), 2 => Just(4), 2 => Just(7), 1 => Just(8), 1 => 0u8..12];
        let client = (
            kind,
            0u8..4,
            proptest::option::of(0u16..20),
            any::<bool>(),
            any::<bool>(),
        );
        let addrs = (
            proptest::option::weighted(0.9, 99u8..104),
            proptest::option::weighted(0.5, prop_oneof![4 => Just(1u8), 1 => 0u8..3]),
            proptest::option::weighted(0.3, 99u8..104),
            any::<bool>(),
        );
        let extra = proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..6)),
            0..4,
        );
        let dt = prop_oneof![3 => Just(0u64), 1 => Just(1), 1 => Just(700), 1 => Just(4000)];
        (client, addrs, extra, dt).prop_map(|(c, a, extra, dt)| Step {
            kind: c.0,
            mac: c.1,
            arch: c.2,
            pxe: c.3,
            ipxe: c.4,
            requested: a.0,
            server_id: a.1,
            ciaddr: a.2,
            on_4011: a.3,
            extra,
            dt,
        })
    }

    fn packet(s: &Step) -> Packet {
        // MAC 0 is the reserved node-1.
        let mac = if s.mac == 0 {
            "52:54:00:12:34:56".parse().unwrap()
        } else {
            Mac([2, 0, 0, 0, 0, s.mac])
        };
        let mut p = Packet::request(MessageType::Discover, mac, u32::from(s.mac));
        for (code, value) in &s.extra {
            p.set(*code, value.clone());
        }
        p.set(opt::MESSAGE_TYPE, [s.kind]);
        if let Some(a) = s.arch {
            p.set(opt::CLIENT_ARCH, a.to_be_bytes());
        }
        if s.pxe {
            p.set(opt::VENDOR_CLASS, b"PXEClient:Arch:00000".to_vec());
        }
        if s.ipxe {
            p.set(opt::USER_CLASS, b"iPXE".to_vec());
        }
        if let Some(r) = s.requested {
            p.set(opt::REQUESTED_IP, [192, 0, 2, r]);
        }
        if let Some(sid) = s.server_id {
            p.set(opt::SERVER_ID, [192, 0, 2, sid]);
        }
        if let Some(c) = s.ciaddr {
            p.ciaddr = Ipv4Addr::new(192, 0, 2, c);
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Random conversations never panic, proxyDHCP never offers an address, and the full
        /// server never acknowledges an address to a second client while the first one's lease
        /// runs.
        #[test]
        fn conversations_keep_invariants(steps in proptest::collection::vec(step(), 1..40)) {
            let mut full = DhcpServer::full(SERVER, files(), inventory(), None).unwrap();
            let mut proxy = DhcpServer::proxy(SERVER, files(), inventory());
            let lease_secs = u64::from(inventory().dhcp().unwrap().lease_secs);
            // Who holds which address until when, as acknowledged.
            let mut holder: HashMap<Ipv4Addr, (Mac, u64)> = HashMap::new();
            let mut now = 1000;
            for s in &steps {
                now += s.dt;
                let req = packet(s);
                let mac = req.mac().unwrap();
                let port = if s.on_4011 { Port::Pxe } else { Port::Dhcp };
                if let Some((reply, _)) = proxy.handle(&req, port, src(), now) {
                    prop_assert_eq!(reply.yiaddr, Ipv4Addr::UNSPECIFIED);
                    prop_assert!(!reply.options.contains_key(&opt::LEASE_TIME));
                    prop_assert!(!reply.file.is_empty());
                }
                let declined = req.ip_option(opt::REQUESTED_IP);
                match req.message_type() {
                    Some(MessageType::Release) => holder.retain(|ip, (m, _)| !(*m == mac && *ip == req.ciaddr)),
                    Some(MessageType::Decline) => holder.retain(|ip, (m, _)| !(*m == mac && Some(*ip) == declined)),
                    _ => {}
                }
                let Some((reply, _)) = full.handle(&req, port, src(), now) else { continue };
                let ip = reply.yiaddr;
                if ip.is_unspecified() {
                    continue;
                }
                let last = ip.octets()[3];
                prop_assert!((100..=110).contains(&last) || (last == 10 && s.mac == 0), "{} given to {}", ip, mac);
                if reply.message_type() == Some(MessageType::Ack) {
                    if let Some((other, until)) = holder.get(&ip)
                        && *until > now
                    {
                        prop_assert_eq!(*other, mac, "{} acknowledged to two clients", ip);
                    }
                    holder.retain(|_, (m, _)| *m != mac);
                    holder.insert(ip, (mac, now + lease_secs));
                }
            }
        }
    }
}

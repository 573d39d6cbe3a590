//! A read-only TFTP server (RFC 1350) with the blksize (RFC 2348), timeout and tsize
//! (RFC 2349) options negotiated through OACK (RFC 2347).
//!
//! Files come from explicitly configured names (e.g. `undionly.kpxe` → the Debian `ipxe`
//! package's file, which may be a symlink elsewhere) or from a root directory, confined by
//! [`crate::confine`]: no `..`, no symlink escapes. Write requests are refused. Each transfer
//! runs on its own socket (a new transfer ID), connected to the client so that stray packets
//! from other ports are dropped by the kernel.

pub mod packet;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::confine::{self, ConfineError};
use packet::{Packet, Request, code};

/// Default block size (RFC 1350).
pub const DEFAULT_BLKSIZE: usize = 512;
/// Largest block size of RFC 2348.
pub const MAX_BLKSIZE: usize = 65464;

/// Errors of the TFTP server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Receiving on the listening socket failed.
    #[error("receiving on the TFTP socket: {0}")]
    Recv(std::io::Error),
    /// A `std` socket could not be registered with tokio.
    #[error("registering the TFTP socket with the runtime: {0}")]
    Register(std::io::Error),
    /// The listening socket has no local address.
    #[error("TFTP socket has no local address: {0}")]
    LocalAddr(std::io::Error),
}

/// Local result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the server serves and how.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// Directory served (confined); `None` serves only `files`.
    pub root: Option<PathBuf>,
    /// Explicit names → files (trusted configuration, symlinks followed).
    pub files: BTreeMap<String, PathBuf>,
    /// Interface the per-transfer sockets bind to (as the listening socket).
    pub interface: Option<String>,
    /// Retransmission timeout when the client sets none.
    pub timeout: Duration,
    /// Retransmissions before a transfer is abandoned.
    pub retries: u32,
    /// Concurrent transfers; more get "server busy".
    pub max_transfers: usize,
}

impl TftpConfig {
    /// Serves the Debian `ipxe` binaries (`undionly.kpxe`, `ipxe.efi`) from `ipxe_dir` and,
    /// optionally, a root directory.
    pub fn ipxe(ipxe_dir: &std::path::Path, root: Option<PathBuf>) -> Self {
        let files = ["undionly.kpxe", "ipxe.efi"]
            .into_iter()
            .map(|n| (n.to_string(), ipxe_dir.join(n)))
            .collect();
        TftpConfig {
            root,
            files,
            interface: None,
            timeout: Duration::from_secs(2),
            retries: 5,
            max_transfers: 64,
        }
    }
}

/// The TFTP server.
#[derive(Debug, Clone)]
pub struct TftpServer {
    config: Arc<TftpConfig>,
}

/// Why a transfer ended early.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("client did not answer after {0} retransmissions")]
    Timeout(u32),
    #[error("client sent error {code}: {message}")]
    ClientError { code: u16, message: String },
    #[error("refused: {0}")]
    Refused(String),
}

/// Negotiated transfer parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    blksize: usize,
    timeout: Duration,
}

/// Negotiates options: returns the parameters and the options to acknowledge (empty: no
/// OACK). Invalid or unknown options are ignored, as RFC 2347 allows.
fn negotiate(
    req: &Request,
    size: Option<u64>,
    default_timeout: Duration,
) -> (Params, Vec<(String, String)>) {
    let mut p = Params {
        blksize: DEFAULT_BLKSIZE,
        timeout: default_timeout,
    };
    let mut ack = Vec::new();
    for (name, value) in &req.options {
        match name.as_str() {
            "blksize" => {
                if let Ok(v) = value.parse::<usize>()
                    && v >= 8
                {
                    p.blksize = v.min(MAX_BLKSIZE);
                    ack.push((name.clone(), p.blksize.to_string()));
                }
            }
            "timeout" => {
                if let Ok(v) = value.parse::<u64>()
                    && (1..=255).contains(&v)
                {
                    p.timeout = Duration::from_secs(v);
                    ack.push((name.clone(), v.to_string()));
                }
            }
            "tsize" => {
                if let Some(size) = size {
                    ack.push((name.clone(), size.to_string()));
                }
            }
            _ => {}
        }
    }
    (p, ack)
}

/// The bytes of a file in the transfer mode: as-is (`octet`) or with `netascii` line ends
/// (LF → CR LF, CR → CR NUL).
struct Source {
    file: tokio::fs::File,
    netascii: bool,
    pending: VecDeque<u8>,
    eof: bool,
}

impl Source {
    async fn next_block(&mut self, size: usize) -> std::io::Result<Vec<u8>> {
        let mut chunk = vec![0u8; size.max(512)];
        while self.pending.len() < size && !self.eof {
            let n = self.file.read(&mut chunk).await?;
            if n == 0 {
                self.eof = true;
            }
            for &b in chunk.get(..n).unwrap_or_default() {
                match (self.netascii, b) {
                    (true, b'\n') => self.pending.extend([b'\r', b'\n']),
                    (true, b'\r') => self.pending.extend([b'\r', 0]),
                    _ => self.pending.push_back(b),
                }
            }
        }
        let n = size.min(self.pending.len());
        Ok(self.pending.drain(..n).collect())
    }
}

impl TftpServer {
    /// A server with this configuration.
    pub fn new(config: TftpConfig) -> Self {
        TftpServer {
            config: Arc::new(config),
        }
    }

    /// Serves requests arriving on `socket` until `shutdown` completes; running transfers are
    /// then aborted.
    ///
    /// # Errors
    /// [`Error::Register`], [`Error::LocalAddr`] or [`Error::Recv`] when the socket fails.
    pub async fn serve(
        self,
        socket: std::net::UdpSocket,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let socket = UdpSocket::from_std(socket).map_err(Error::Register)?;
        let local = socket.local_addr().map_err(Error::LocalAddr)?;
        info!(%local, root = ?self.config.root, files = ?self.config.files.keys().collect::<Vec<_>>(), "TFTP server running");
        let permits = Arc::new(Semaphore::new(self.config.max_transfers));
        let mut transfers = JoinSet::new();
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, peer) = tokio::select! {
                () = &mut shutdown => break,
                Some(_) = transfers.join_next(), if !transfers.is_empty() => continue,
                r = socket.recv_from(&mut buf) => r.map_err(Error::Recv)?,
            };
            let pkt = match Packet::decode(buf.get(..n).unwrap_or_default()) {
                Ok(p) => p,
                Err(e) => {
                    debug!(%peer, error = %e, "ignoring malformed TFTP packet");
                    continue;
                }
            };
            let (req, write) = match pkt {
                Packet::Rrq(r) => (r, false),
                Packet::Wrq(r) => (r, true),
                other => {
                    debug!(%peer, packet = ?other, "ignoring non-request on the TFTP port");
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                warn!(%peer, "too many TFTP transfers; refusing");
                let busy = Packet::Error {
                    code: code::UNDEFINED,
                    message: "server busy".into(),
                };
                let _ = socket.send_to(&busy.encode(), peer).await;
                continue;
            };
            let config = self.config.clone();
            let bind = SocketAddr::new(local.ip(), 0);
            transfers.spawn(async move {
                let _permit = permit;
                let file = req.filename.clone();
                match transfer(&config, bind, peer, req, write).await {
                    Ok(bytes) => info!(%peer, %file, bytes, "TFTP transfer done"),
                    Err(e) => warn!(%peer, %file, error = %e, "TFTP transfer failed"),
                }
            });
        }
        transfers.shutdown().await;
        info!("TFTP server stopped");
        Ok(())
    }
}

fn open(config: &TftpConfig, name: &str) -> Result<(std::fs::File, u64), ConfineError> {
    let key = name.trim_start_matches(['/', '\\']);
    if let Some(path) = config.files.get(key) {
        return confine::open_configured(path);
    }
    match &config.root {
        Some(root) => confine::open(root, name),
        None => Err(ConfineError::NotFound(name.to_string())),
    }
}

async fn send_error(sock: &UdpSocket, code: u16, message: &str) {
    let pkt = Packet::Error {
        code,
        message: message.to_string(),
    };
    let _ = sock.send(&pkt.encode()).await;
}

/// Sends `pkt` and waits for the ACK of `block`, retransmitting on timeout. Duplicate or old
/// ACKs are ignored (no retransmission on them: the Sorcerer's Apprentice bug).
async fn send_and_wait(
    sock: &UdpSocket,
    pkt: &[u8],
    block: u16,
    params: Params,
    retries: u32,
) -> Result<(), TransferError> {
    let mut buf = vec![0u8; 1024];
    for _ in 0..=retries {
        sock.send(pkt).await?;
        let deadline = tokio::time::Instant::now() + params.timeout;
        loop {
            let r = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await;
            let n = match r {
                Err(_) => break,
                // ICMP port unreachable from a gone client.
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(n)) => n,
            };
            match Packet::decode(buf.get(..n).unwrap_or_default()) {
                Ok(Packet::Ack(b)) if b == block => return Ok(()),
                Ok(Packet::Error { code, message }) => {
                    return Err(TransferError::ClientError { code, message });
                }
                _ => {}
            }
        }
    }
    Err(TransferError::Timeout(retries))
}

async fn transfer(
    config: &TftpConfig,
    bind: SocketAddr,
    peer: SocketAddr,
    req: Request,
    write: bool,
) -> Result<u64, TransferError> {
    let std_sock = crate::net::udp(bind, config.interface.as_deref(), false)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let sock = UdpSocket::from_std(std_sock)?;
    sock.connect(peer).await?;
    if write {
        send_error(&sock, code::ACCESS, "read-only server").await;
        return Err(TransferError::Refused("write request".into()));
    }
    let netascii = match req.mode.as_str() {
        "octet" => false,
        "netascii" => true,
        other => {
            send_error(&sock, code::ILLEGAL, "unsupported mode").await;
            return Err(TransferError::Refused(format!("mode {other}")));
        }
    };
    let (file, size) = match open(config, &req.filename) {
        Ok(f) => f,
        Err(e) => {
            let (code, msg) = match &e {
                ConfineError::NotFound(_) => (code::NOT_FOUND, "File not found"),
                ConfineError::BadName(_) | ConfineError::Escape(_) | ConfineError::NotAFile(_) => {
                    (code::ACCESS, "Access violation")
                }
                ConfineError::Io { .. } => (code::UNDEFINED, "cannot read file"),
            };
            send_error(&sock, code, msg).await;
            return Err(TransferError::Refused(e.to_string()));
        }
    };
    let (params, oack) = negotiate(&req, (!netascii).then_some(size), config.timeout);
    debug!(%peer, file = %req.filename, ?params, ?oack, "TFTP read request");
    if !oack.is_empty() {
        send_and_wait(
            &sock,
            &Packet::Oack(oack).encode(),
            0,
            params,
            config.retries,
        )
        .await?;
    }
    let mut source = Source {
        file: tokio::fs::File::from_std(file),
        netascii,
        pending: VecDeque::new(),
        eof: false,
    };
    let mut block: u16 = 1;
    let mut sent: u64 = 0;
    loop {
        let data = match source.next_block(params.blksize).await {
            Ok(d) => d,
            Err(e) => {
                send_error(&sock, code::UNDEFINED, "read error").await;
                return Err(e.into());
            }
        };
        let last = data.len() < params.blksize;
        sent += data.len() as u64;
        let pkt = Packet::Data { block, data }.encode();
        send_and_wait(&sock, &pkt, block, params, config.retries).await?;
        if last {
            return Ok(sent);
        }
        block = block.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(options: &[(&str, &str)]) -> Request {
        Request {
            filename: "f".into(),
            mode: "octet".into(),
            options: options
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn negotiation() {
        let t = Duration::from_secs(2);
        let (p, ack) = negotiate(&rrq(&[]), Some(10), t);
        assert_eq!((p.blksize, ack.len()), (512, 0));
        let (p, ack) = negotiate(
            &rrq(&[
                ("blksize", "1468"),
                ("tsize", "0"),
                ("timeout", "3"),
                ("x", "y"),
            ]),
            Some(10),
            t,
        );
        assert_eq!(
            p,
            Params {
                blksize: 1468,
                timeout: Duration::from_secs(3)
            }
        );
        assert_eq!(
            ack,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "10".into()),
                ("timeout".into(), "3".into())
            ]
        );
        let (p, ack) = negotiate(&rrq(&[("blksize", "100000")]), None, t);
        assert_eq!(
            (p.blksize, ack),
            (
                MAX_BLKSIZE,
                vec![("blksize".into(), MAX_BLKSIZE.to_string())]
            )
        );
        let (p, ack) = negotiate(
            &rrq(&[("blksize", "4"), ("timeout", "0"), ("tsize", "0")]),
            None,
            t,
        );
        assert_eq!((p.blksize, p.timeout, ack.len()), (512, t, 0));
    }

    #[tokio::test]
    async fn netascii_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, b"a\nb\rc").unwrap();
        let mut s = Source {
            file: tokio::fs::File::open(&path).await.unwrap(),
            netascii: true,
            pending: VecDeque::new(),
            eof: false,
        };
        assert_eq!(s.next_block(4).await.unwrap(), b"a\r\nb");
        assert_eq!(s.next_block(4).await.unwrap(), b"\r\0c");
        assert_eq!(s.next_block(4).await.unwrap(), b"");
    }
}

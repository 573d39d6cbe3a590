//! `netprobe tcp|udp|udp-connected ADDR MESSAGE [SOURCE_IP]`: sends MESSAGE to ADDR and prints the reply and
//! the address the reply came from, as the application sees them.
//!
//! - `tcp`: connect, send, half-close, read to the end; `peer:` is `getpeername(2)`. With
//!   SOURCE_IP (TCP only) the socket is bound to that address first, as a client with an
//!   address of its own (the load balancer's Maglev and affinity key on it).
//! - `udp`: an unconnected socket, `sendto` then `recvfrom`; `peer:` is the reply's source.
//! - `udp-connected`: `connect`, `send`, `recvfrom`; `peer:` is the reply's source, and the
//!   probe fails if `getpeername(2)` says otherwise.
//!
//! A client that the end-to-end tests start inside the namespaces and cgroups they create.
//! Exit status 0 with `reply: …` and `peer: …` lines on stdout, or 2 with `error: …` (the OS
//! error) on stderr.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::ExitCode,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// A TCP connection to `addr` from `source` (any port).
fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrStorage, bind, connect,
            setsockopt, socket, sockopt,
        },
        time::TimeVal,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Linux bounds a blocking connect by the send timeout.
    let secs = i64::try_from(TIMEOUT.as_secs()).unwrap_or(3);
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(secs, 0))?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(TcpStream::from(fd))
}

fn tcp(
    addr: SocketAddr,
    message: &str,
    source: Option<Ipv4Addr>,
) -> std::io::Result<(String, SocketAddr)> {
    let mut conn = match source {
        Some(source) => connect_from(source, addr)?,
        None => TcpStream::connect_timeout(&addr, TIMEOUT)?,
    };
    conn.set_read_timeout(Some(TIMEOUT))?;
    let peer = conn.peer_addr()?;
    conn.write_all(message.as_bytes())?;
    conn.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    Ok((reply, peer))
}

fn udp(addr: SocketAddr, message: &str) -> std::io::Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(message.as_bytes(), addr)?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

fn udp_connected(addr: SocketAddr, message: &str) -> std::io::Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(addr)?;
    socket.send(message.as_bytes())?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf)?;
    let peer = socket.peer_addr()?;
    if peer != from {
        return Err(std::io::Error::other(format!(
            "getpeername says {peer}, the reply came from {from}"
        )));
    }
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, addr, message, source) = match args.as_slice() {
        [mode, addr, message] => (mode, addr, message, None),
        [mode, addr, message, source] => match source.parse::<Ipv4Addr>() {
            Ok(s) => (mode, addr, message, Some(s)),
            Err(e) => {
                eprintln!("netprobe: {source:?}: {e}");
                return ExitCode::from(64);
            }
        },
        _ => {
            eprintln!("usage: netprobe tcp|udp|udp-connected ADDR MESSAGE [SOURCE_IP]");
            return ExitCode::from(64);
        }
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("netprobe: {addr:?}: {e}");
            return ExitCode::from(64);
        }
    };
    let result = match mode.as_str() {
        "tcp" => tcp(addr, message, source),
        "udp" => udp(addr, message),
        "udp-connected" => udp_connected(addr, message),
        other => {
            eprintln!("netprobe: unknown mode {other:?} (tcp, udp or udp-connected)");
            return ExitCode::from(64);
        }
    };
    match result {
        Ok((reply, peer)) => {
            println!("reply: {reply}\npeer: {peer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

//! Echo servers inside a test namespace: each TCP connection or UDP datagram is answered with
//! `<name>:<request>`, so a test can tell which backend answered.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::Netns;

/// A running echo server; stopped on drop.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long a server blocks before it looks at its stop flag again.
const POLL: Duration = Duration::from_millis(20);

impl EchoServer {
    /// A TCP server on `127.0.0.1:0` inside `netns`; it replies once the client half-closes.
    ///
    /// # Errors
    /// When the listener cannot be set up.
    pub fn tcp(netns: &Netns, name: &str) -> Result<Self> {
        Self::spawn(
            netns,
            name,
            |addr| {
                let l = TcpListener::bind(addr).context("binding TCP echo server")?;
                l.set_nonblocking(true)?;
                Ok(l)
            },
            |l| l.local_addr(),
            |l, name| match l.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut request = Vec::new();
                    if conn.read_to_end(&mut request).is_ok() {
                        let _ = conn.write_all(&reply(name, &request));
                    }
                }
                Err(_) => std::thread::sleep(POLL),
            },
        )
    }

    /// A UDP server on `127.0.0.1:0` inside `netns`; it answers each datagram.
    ///
    /// # Errors
    /// When the socket cannot be set up.
    pub fn udp(netns: &Netns, name: &str) -> Result<Self> {
        Self::spawn(
            netns,
            name,
            |addr| {
                let s = UdpSocket::bind(addr).context("binding UDP echo server")?;
                s.set_read_timeout(Some(POLL))?;
                Ok(s)
            },
            |s| s.local_addr(),
            |s, name| {
                let mut buf = [0u8; 2048];
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&reply(name, &buf[..n]), from);
                }
            },
        )
    }

    fn spawn<S: 'static>(
        netns: &Netns,
        name: &str,
        bind: impl FnOnce(&str) -> Result<S> + Send + 'static,
        local_addr: impl FnOnce(&S) -> std::io::Result<SocketAddr> + Send + 'static,
        mut serve_one: impl FnMut(&S, &str) + Send + 'static,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let name = name.to_owned();
        let ns = netns.try_clone()?;
        let thread = std::thread::spawn(move || {
            // The socket is created in the namespace this thread entered.
            let socket = ns.enter_current_thread().and_then(|()| bind("127.0.0.1:0"));
            let socket = match socket.and_then(|s| Ok((local_addr(&s)?, s))) {
                Ok((addr, s)) => {
                    let _ = tx.send(Ok(addr));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                serve_one(&socket, &name);
            }
        });
        let addr = rx
            .recv()
            .context("echo server thread ended before listening")??;
        Ok(EchoServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on, inside its namespace.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn reply(name: &str, request: &[u8]) -> Vec<u8> {
    format!("{name}:{}", String::from_utf8_lossy(request)).into_bytes()
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

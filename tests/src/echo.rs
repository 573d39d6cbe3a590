//! A TCP server inside a test namespace that answers each connection with `<name>:<request>`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
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

impl EchoServer {
    /// Listens on `127.0.0.1:0` inside `netns` and tags replies with `name`.
    ///
    /// # Errors
    /// When the listener cannot be set up.
    pub fn start(netns: &Netns, name: &str) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let name = name.to_owned();
        let stop_flag = Arc::clone(&stop);
        let ns = netns.try_clone()?;
        let thread = std::thread::spawn(move || {
            let listener = ns
                .enter_current_thread()
                .and_then(|()| TcpListener::bind("127.0.0.1:0").context("binding echo server"))
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    Ok(l)
                });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(l.local_addr().map_err(anyhow::Error::from));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut request = Vec::new();
                        if conn.read_to_end(&mut request).is_ok() {
                            let reply = format!("{name}:{}", String::from_utf8_lossy(&request));
                            let _ = conn.write_all(reply.as_bytes());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
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

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! `netprobe tcp ADDR MESSAGE`: connects, sends MESSAGE, half-closes, and prints the reply.
//!
//! A client the end-to-end tests start inside the namespaces and cgroups they create. Exit
//! status 0 with `reply: …` on stdout, or 2 with `error: …` (the OS error) on stderr.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn probe(addr: &str, message: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(message.as_bytes())?;
    conn.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    Ok(reply)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr, message] = args.as_slice() else {
        eprintln!("usage: netprobe tcp ADDR MESSAGE");
        return ExitCode::from(64);
    };
    if mode != "tcp" {
        eprintln!("netprobe: unknown mode {mode:?} (only tcp)");
        return ExitCode::from(64);
    }
    match probe(addr, message) {
        Ok(reply) => {
            println!("reply: {reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

//! `lbclient ADDR`: one long-lived TCP connection for the load-balancer tests.
//!
//! Connects to ADDR, prints `peer: <getpeername>`, then for each line read from stdin sends
//! it and prints `reply: <the line that came back>`, until stdin ends; the line `?peer`
//! prints `peer: <getpeername>` again instead. Exit status 0, or 2
//! with `error: …` on stderr when the connection fails — so a test can tell that an
//! established connection kept working while the service's backends changed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn run(addr: SocketAddr) -> std::io::Result<()> {
    let conn = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "peer: {}", conn.peer_addr()?)?;
    out.flush()?;
    let mut replies = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line == "?peer" {
            writeln!(out, "peer: {}", writer.peer_addr()?)?;
            out.flush()?;
            continue;
        }
        writer.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        if replies.read_line(&mut reply)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the peer",
            ));
        }
        writeln!(out, "reply: {}", reply.trim_end())?;
        out.flush()?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr] = args.as_slice() else {
        eprintln!("usage: lbclient ADDR");
        return ExitCode::from(64);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lbclient: {addr:?}: {e}");
            return ExitCode::from(64);
        }
    };
    match run(addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

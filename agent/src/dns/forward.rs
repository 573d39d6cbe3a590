//! Forwarding of names outside the cluster domain to the node's upstream resolvers: one query
//! over UDP to each upstream in turn, repeated over TCP when the answer was truncated.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

/// The UDP payload size we offer upstream (the DNS flag day 2020 recommendation).
const UDP_PAYLOAD: u16 = 1232;

/// Why a query could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream resolver is configured.
    #[error("no upstream resolver")]
    NoUpstream,
    /// Every upstream failed; the last failure.
    #[error("upstream {upstream}: {reason}")]
    Failed {
        /// The last upstream tried.
        upstream: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// Relays queries to upstream resolvers.
#[derive(Debug, Clone)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

/// The `nameserver` addresses of a resolv.conf, on port 53, without those that would send a
/// query back to this server (`own`: the addresses it listens on).
pub fn upstreams_from(nameservers: &[IpAddr], own: &[SocketAddr]) -> Vec<SocketAddr> {
    nameservers
        .iter()
        .map(|ip| SocketAddr::new(*ip, 53))
        .filter(|up| !is_own(*up, own))
        .collect()
}

/// Whether `up` is one of `own`, counting a wildcard listener as every local address.
fn is_own(up: SocketAddr, own: &[SocketAddr]) -> bool {
    own.iter().any(|o| {
        o.port() == up.port()
            && (o.ip() == up.ip() || (o.ip().is_unspecified() && (up.ip().is_loopback())))
    })
}

impl Forwarder {
    /// Forwards to `upstreams` in order, waiting `timeout` for each.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Forwarder { upstreams, timeout }
    }

    /// The upstream resolvers.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Asks the upstreams for `qtype` records of `name`; the first upstream that answers
    /// wins (an NXDOMAIN is an answer).
    ///
    /// # Errors
    /// [`ForwardError`] when no upstream answers in time.
    pub async fn forward(
        &self,
        name: &Name,
        qtype: RecordType,
        qclass: DNSClass,
        recursion_desired: bool,
    ) -> Result<Message, ForwardError> {
        let mut last = Err(ForwardError::NoUpstream);
        for up in &self.upstreams {
            let mut query = Query::query(name.clone(), qtype);
            query.set_query_class(qclass);
            let mut msg = Message::new();
            msg.set_id(rand::random())
                .set_message_type(MessageType::Query)
                .set_op_code(OpCode::Query)
                .set_recursion_desired(recursion_desired)
                .add_query(query.clone());
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_PAYLOAD);
            msg.set_edns(edns);
            let attempt = async {
                let bytes = msg.to_vec().map_err(|e| e.to_string())?;
                let reply = udp_exchange(*up, &bytes, &msg, &query).await?;
                if reply.truncated() {
                    tracing::debug!(upstream = %up, %name, "truncated; asking over TCP");
                    return tcp_exchange(*up, &bytes, &msg, &query).await;
                }
                Ok(reply)
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(reason)) => {
                    last = Err(ForwardError::Failed {
                        upstream: *up,
                        reason,
                    });
                }
                Err(_) => {
                    last = Err(ForwardError::Failed {
                        upstream: *up,
                        reason: format!("no answer within {:?}", self.timeout),
                    });
                }
            }
        }
        last
    }
}

/// Whether `reply` answers `sent`: same id, a response, the same question.
fn answers(reply: &Message, sent: &Message, query: &Query) -> bool {
    reply.id() == sent.id()
        && reply.message_type() == MessageType::Response
        && reply
            .queries()
            .first()
            .is_some_and(|q| q.name() == query.name() && q.query_type() == query.query_type())
}

async fn udp_exchange(
    up: SocketAddr,
    bytes: &[u8],
    sent: &Message,
    query: &Query,
) -> Result<Message, String> {
    let local: SocketAddr = match up.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.connect(up).await.map_err(|e| e.to_string())?;
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(UDP_PAYLOAD).max(4096)];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        // Anything that is not the answer (stale or spoofed) is dropped; the timeout ends it.
        if let Ok(reply) = Message::from_vec(&buf[..n])
            && answers(&reply, sent, query)
        {
            return Ok(reply);
        }
    }
}

async fn tcp_exchange(
    up: SocketAddr,
    bytes: &[u8],
    sent: &Message,
    query: &Query,
) -> Result<Message, String> {
    let mut stream = TcpStream::connect(up).await.map_err(|e| e.to_string())?;
    let len = u16::try_from(bytes.len()).map_err(|_| "query too long".to_owned())?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    let reply = Message::from_vec(&buf).map_err(|e| e.to_string())?;
    if !answers(&reply, sent, query) {
        return Err("the TCP answer does not match the question".to_owned());
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_never_upstreams() {
        let own: Vec<SocketAddr> = vec!["10.244.0.1:53".parse().expect("addr")];
        let ns: Vec<IpAddr> = ["10.244.0.1", "10.255.255.53", "127.0.0.53"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(
            upstreams_from(&ns, &own),
            vec![
                "10.255.255.53:53".parse::<SocketAddr>().expect("addr"),
                "127.0.0.53:53".parse().expect("addr")
            ]
        );
        // A wildcard listener on port 53 also answers on loopback.
        let any: Vec<SocketAddr> = vec!["0.0.0.0:53".parse().expect("addr")];
        assert_eq!(upstreams_from(&ns, &any).len(), 2);
        // On another port there is no loop.
        let other: Vec<SocketAddr> = vec!["10.244.0.1:5353".parse().expect("addr")];
        assert_eq!(upstreams_from(&ns, &other).len(), 3);
    }
}

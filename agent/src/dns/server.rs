//! The DNS server: a hickory-server request handler that answers names in the cluster domain
//! from the zone and forwards the rest, served over UDP and TCP on one address.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tokio::net::{TcpListener, UdpSocket};

use super::records::{self, Lookup, SharedZone};
use super::{DnsError, Forwarder, Result};

/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest UDP answer we send to a client that offers EDNS.
const UDP_PAYLOAD: u16 = 1232;

/// Answers queries: the cluster domain from the zone, other names through the forwarder.
pub struct Handler {
    zone: SharedZone,
    forwarder: Option<Forwarder>,
}

impl Handler {
    /// A handler over `zone`; without a forwarder, other names are refused.
    pub fn new(zone: SharedZone, forwarder: Option<Forwarder>) -> Self {
        Handler { zone, forwarder }
    }
}

/// What to send: a header (response code, flags) and the sections.
struct Reply {
    header: Header,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn empty(request: &Request, code: ResponseCode) -> Self {
        let mut header = Header::response_from_request(request.header());
        header.set_response_code(code);
        header.set_recursion_available(true);
        Reply {
            header,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

impl Handler {
    async fn reply(&self, request: &Request) -> Reply {
        if request.message_type() != MessageType::Query {
            return Reply::empty(request, ResponseCode::FormErr);
        }
        if request.op_code() != OpCode::Query {
            return Reply::empty(request, ResponseCode::NotImp);
        }
        let Ok(info) = request.request_info() else {
            return Reply::empty(request, ResponseCode::FormErr);
        };
        let qname: Name = info.query.name().clone().into();
        let qtype = info.query.query_type();
        let qclass = info.query.query_class();
        let lookup = {
            let zone = records::read(&self.zone);
            match zone.lookup(&qname, qtype) {
                Lookup::NotInZone => None,
                _ if !zone.is_synced() => Some((Lookup::NotInZone, None)),
                _ if qclass != DNSClass::IN => Some((Lookup::NoData, Some(zone.soa()))),
                found => Some((found, Some(zone.soa()))),
            }
        };
        match lookup {
            // The zone is not read yet: no answer rather than a wrong NXDOMAIN.
            Some((Lookup::NotInZone, _)) => Reply::empty(request, ResponseCode::ServFail),
            Some((found, soa)) => {
                let mut reply = Reply::empty(request, ResponseCode::NoError);
                reply.header.set_authoritative(true);
                match found {
                    Lookup::Found {
                        answers,
                        additionals,
                    } => {
                        let target = cname_target(&answers, qtype);
                        reply.answers = answers;
                        reply.additionals = additionals;
                        if let Some(target) = target {
                            self.chase(&mut reply, &target, qtype, qclass, request)
                                .await;
                        }
                    }
                    Lookup::NxDomain => {
                        reply.header.set_response_code(ResponseCode::NXDomain);
                        reply.authority.extend(soa);
                    }
                    _ => reply.authority.extend(soa),
                }
                reply
            }
            None => self.forward(request, &qname, qtype, qclass).await,
        }
    }

    /// Follows an ExternalName's CNAME one step, as stub resolvers do not: the target's
    /// records from the zone or, outside it, from upstream.
    async fn chase(
        &self,
        reply: &mut Reply,
        target: &Name,
        qtype: RecordType,
        qclass: DNSClass,
        request: &Request,
    ) {
        let in_zone = records::read(&self.zone).lookup(target, qtype);
        match in_zone {
            Lookup::Found { answers, .. } => reply.answers.extend(answers),
            Lookup::NxDomain => {
                reply.header.set_response_code(ResponseCode::NXDomain);
            }
            Lookup::NoData => {}
            Lookup::NotInZone => {
                let Some(forwarder) = &self.forwarder else {
                    return;
                };
                match forwarder
                    .forward(target, qtype, qclass, request.recursion_desired())
                    .await
                {
                    Ok(mut upstream) => {
                        reply.header.set_response_code(upstream.response_code());
                        reply.answers.extend(upstream.take_answers());
                    }
                    Err(e) => tracing::debug!(name = %target, error = %e, "CNAME target"),
                }
            }
        }
    }

    async fn forward(
        &self,
        request: &Request,
        qname: &Name,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Reply {
        let Some(forwarder) = &self.forwarder else {
            return Reply::empty(request, ResponseCode::Refused);
        };
        match forwarder
            .forward(qname, qtype, qclass, request.recursion_desired())
            .await
        {
            Ok(mut upstream) => {
                let mut reply = Reply::empty(request, upstream.response_code());
                reply.header.set_authentic_data(upstream.authentic_data());
                reply.answers = upstream.take_answers();
                reply.authority = upstream.take_name_servers();
                reply.additionals = upstream.take_additionals();
                reply
            }
            Err(e) => {
                tracing::debug!(name = %qname, error = %e, "forwarding failed");
                Reply::empty(request, ResponseCode::ServFail)
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let reply = self.reply(request).await;
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(req_edns) = request.edns() {
            let mut edns = Edns::new();
            edns.set_max_payload(req_edns.max_payload().clamp(512, UDP_PAYLOAD));
            builder.edns(edns);
        }
        let response = builder.build(
            reply.header,
            reply.answers.iter(),
            reply.authority.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "sending a DNS response");
                let mut header = Header::response_from_request(request.header());
                header.set_response_code(ResponseCode::ServFail);
                header.into()
            }
        }
    }
}

/// The target of an answer that is only a CNAME, when the question was for another type.
fn cname_target(answers: &[Record], qtype: RecordType) -> Option<Name> {
    match answers {
        [only] if !matches!(qtype, RecordType::CNAME | RecordType::ANY) => {
            only.data().as_cname().map(|c| c.0.clone())
        }
        _ => None,
    }
}

/// The UDP socket and TCP listener of one address.
pub struct Sockets {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl Sockets {
    /// Binds UDP and TCP on `addr` (port 0: the same free port for both).
    ///
    /// # Errors
    /// [`DnsError::Io`] when either cannot be bound.
    pub async fn bind(addr: SocketAddr) -> Result<Self> {
        let io = |action, addr| {
            move |source| DnsError::Io {
                action,
                addr,
                source,
            }
        };
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(io("binding UDP", addr))?;
        let bound = udp.local_addr().map_err(io("binding UDP", addr))?;
        let tcp = TcpListener::bind(bound)
            .await
            .map_err(io("binding TCP", bound))?;
        Ok(Sockets { udp, tcp })
    }

    /// The address both listen on.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.udp.local_addr().map_err(|source| DnsError::Io {
            action: "reading the address of",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }
}

/// Serves `handler` on `sockets` until `shutdown`, then stops gracefully.
///
/// # Errors
/// [`DnsError::Server`] when the server fails.
pub async fn serve(
    sockets: Sockets,
    handler: Handler,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut server = ServerFuture::new(handler);
    server.register_socket(sockets.udp);
    server.register_listener(sockets.tcp, TCP_TIMEOUT);
    let token = server.shutdown_token().clone();
    let done = server.block_until_done();
    tokio::pin!(done, shutdown);
    tokio::select! {
        r = &mut done => r?,
        () = &mut shutdown => {
            token.cancel();
            done.await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::str::FromStr as _;

    use hickory_client::client::{Client, ClientHandle as _};
    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, RecordType};
    use hickory_proto::runtime::TokioRuntimeProvider;
    use hickory_proto::tcp::TcpClientStream;
    use hickory_proto::udp::UdpClientStream;
    use hickory_proto::xfer::DnsResponse;
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use serde_json::json;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::dns::Zone;

    /// Answers for the fake upstream: `example.com` has one address, `big.example` has
    /// 100 (too many for UDP: truncated there, whole over TCP), everything else is NXDOMAIN.
    fn upstream_answer(query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        let q = request.queries().first()?.clone();
        let mut reply = Message::new();
        reply
            .set_id(request.id())
            .set_message_type(MessageType::Response)
            .set_recursion_available(true)
            .add_query(q.clone());
        let count = match q.name().to_ascii().as_str() {
            "example.com." => 1,
            "big.example." => 100,
            _ => 0,
        };
        if count == 0 {
            reply.set_response_code(ResponseCode::NXDomain);
        } else if udp && count > 10 {
            reply.set_truncated(true);
        } else {
            for i in 0..count {
                reply.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, i as u8 + 1))),
                ));
            }
        }
        reply.to_vec().ok()
    }

    /// A fake upstream resolver on loopback (UDP and TCP on one port).
    async fn fake_upstream() -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let addr = udp.local_addr().expect("addr");
        let tcp = TcpListener::bind(addr).await.expect("tcp");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                if let Some(reply) = upstream_answer(&buf[..n], true) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).await.is_err() {
                    continue;
                }
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut buf).await.is_err() {
                    continue;
                }
                if let Some(reply) = upstream_answer(&buf, false) {
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend(reply);
                    let _ = s.write_all(&framed).await;
                }
            }
        });
        addr
    }

    fn zone() -> SharedZone {
        let zone = Zone::shared("cluster.local").expect("zone");
        let web: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}
        }))
        .expect("svc");
        let db: Service = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
        }))
        .expect("svc");
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "db-1", "namespace": "shop"},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.5"]}, {"addresses": ["10.244.0.6"]}],
        }))
        .expect("slice");
        let ext: Service = serde_json::from_value(json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }))
        .expect("svc");
        let mut z = records::write(&zone);
        z.set_service(&ext, &[]);
        z.set_service(&web, &[]);
        z.set_service(&db, &[&slice]);
        drop(z);
        zone
    }

    async fn udp_client(addr: SocketAddr) -> Client {
        let conn = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).build();
        let (client, bg) = Client::connect(conn).await.expect("udp client");
        tokio::spawn(bg);
        client
    }

    async fn ask(client: &mut Client, name: &str, qtype: RecordType) -> DnsResponse {
        client
            .query(Name::from_str(name).expect("name"), DNSClass::IN, qtype)
            .await
            .expect("query")
    }

    fn addresses(r: &DnsResponse) -> Vec<String> {
        let mut v: Vec<String> = r.answers().iter().map(|a| a.data().to_string()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn answers_the_cluster_zone_and_forwards_the_rest() {
        let upstream = fake_upstream().await;
        let zone = zone();
        let sockets = Sockets::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = sockets.local_addr().expect("addr");
        let forwarder = Forwarder::new(vec![upstream], Duration::from_secs(2));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            sockets,
            Handler::new(zone.clone(), Some(forwarder)),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let mut client = udp_client(addr).await;

        // Not synced yet: SERVFAIL, never a wrong NXDOMAIN.
        let r = ask(&mut client, "web.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::ServFail);
        records::write(&zone).set_synced();

        let r = ask(&mut client, "web.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.authoritative());
        assert_eq!(addresses(&r), ["10.96.0.20"]);

        let r = ask(&mut client, "db.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(addresses(&r), ["10.244.0.5", "10.244.0.6"]);

        let r = ask(
            &mut client,
            "_pg._tcp.db.shop.svc.cluster.local.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(r.answers().len(), 2);
        assert_eq!(r.additionals().len(), 2, "targets' addresses: {r:?}");

        let r = ask(&mut client, "nope.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::NXDomain);
        assert!(
            r.name_servers()
                .iter()
                .any(|a| a.record_type() == RecordType::SOA),
            "negative answers carry the SOA"
        );
        let r = ask(&mut client, "web.shop.svc.cluster.local.", RecordType::AAAA).await;
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert!(r.answers().is_empty());

        // Other names go upstream: an answer, an NXDOMAIN, and a truncated UDP answer
        // fetched again over TCP.
        let r = ask(&mut client, "example.com.", RecordType::A).await;
        assert_eq!(addresses(&r), ["192.0.2.1"]);
        assert!(!r.authoritative());
        // An ExternalName Service: its CNAME, followed upstream.
        let r = ask(&mut client, "ext.shop.svc.cluster.local.", RecordType::A).await;
        let types: Vec<RecordType> = r.answers().iter().map(Record::record_type).collect();
        assert_eq!(types, [RecordType::CNAME, RecordType::A], "{r:?}");
        assert_eq!(r.answers()[1].data().to_string(), "192.0.2.1");
        let r = ask(&mut client, "missing.example.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::NXDomain);

        let (stream, sender) = TcpClientStream::new(addr, None, None, TokioRuntimeProvider::new());
        let (mut tcp, bg) = Client::new(stream, sender, None).await.expect("tcp client");
        tokio::spawn(bg);
        let r = ask(&mut tcp, "big.example.", RecordType::A).await;
        assert_eq!(r.answers().len(), 100);
        let r = ask(&mut tcp, "web.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(addresses(&r), ["10.96.0.20"]);

        // Answers follow the zone.
        records::write(&zone).remove_service(&("shop".into(), "web".into()));
        let r = ask(&mut client, "web.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::NXDomain);

        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops")
            .expect("join")
            .expect("serve");
    }

    #[tokio::test]
    async fn unreachable_upstreams_give_servfail() {
        // A bound, silent socket: the query times out.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let forwarder = Forwarder::new(
            vec![silent.local_addr().expect("addr")],
            Duration::from_millis(300),
        );
        let zone = zone();
        records::write(&zone).set_synced();
        let sockets = Sockets::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = sockets.local_addr().expect("addr");
        let server = tokio::spawn(serve(
            sockets,
            Handler::new(zone, Some(forwarder)),
            std::future::pending(),
        ));
        let mut client = udp_client(addr).await;
        let r = ask(&mut client, "example.com.", RecordType::A).await;
        assert_eq!(r.response_code(), ResponseCode::ServFail);
        server.abort();
    }
}

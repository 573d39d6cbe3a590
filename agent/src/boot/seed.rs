//! The NoCloud seed: its URL (from a flag or the kernel command line) and its documents,
//! fetched over plain HTTP with hyper, retried until a deadline because the network may still
//! be coming up when the node boots.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;

use super::{Error, Result};

/// Seed documents are small; anything larger is not a seed.
const MAX_DOCUMENT: usize = 1 << 20;
/// One attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The seed URL in a kernel command line: the `s=` (or `seedfrom=`) field of a
/// `ds=nocloud;…` or `ds=nocloud-net;…` argument.
pub fn url_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|arg| {
        let arg = arg.trim_matches('"');
        let fields = arg.strip_prefix("ds=")?;
        let mut fields = fields.split(';');
        let source = fields.next()?;
        if source != "nocloud" && source != "nocloud-net" {
            return None;
        }
        fields.find_map(|f| {
            f.strip_prefix("s=")
                .or_else(|| f.strip_prefix("seedfrom="))
                .map(str::to_owned)
        })
    })
}

/// The seed's base URL, checked to be `http://host[:port]/path/` (a trailing `/` is added).
///
/// # Errors
/// [`Error::BadUrl`] for anything but an absolute `http://` URL.
pub fn base_url(url: &str) -> Result<String> {
    let bad = |reason: &str| Error::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// seeds are supported"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if uri.query().is_some() {
        return Err(bad("a seed URL has no query"));
    }
    let mut base = url.to_owned();
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok(base)
}

/// The seed documents the node image reads.
#[derive(Debug, Clone)]
pub struct Seed {
    /// `meta-data` (YAML).
    pub meta_data: String,
    /// `user-data` (usually `#cloud-config`).
    pub user_data: String,
}

/// Fetches `meta-data` and `user-data` under `base` (a [`base_url`]), retrying each until
/// `deadline`.
///
/// # Errors
/// [`Error::Fetch`] when a document could not be fetched in time (the last failure is in the
/// message).
pub async fn fetch(base: &str, deadline: Instant) -> Result<Seed> {
    let meta_data = fetch_text(&format!("{base}meta-data"), deadline).await?;
    let user_data = fetch_text(&format!("{base}user-data"), deadline).await?;
    Ok(Seed {
        meta_data,
        user_data,
    })
}

async fn fetch_text(url: &str, deadline: Instant) -> Result<String> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let outcome = match tokio::time::timeout(ATTEMPT_TIMEOUT, get(url)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
        };
        match outcome {
            Ok(body) => {
                return String::from_utf8(body).map_err(|_| Error::Fetch {
                    url: url.to_owned(),
                    reason: "the document is not UTF-8".into(),
                });
            }
            // A missing document will not appear by waiting.
            Err(reason) if reason.starts_with("HTTP 404") => {
                return Err(Error::Fetch {
                    url: url.to_owned(),
                    reason,
                });
            }
            Err(reason) if Instant::now() + RETRY_PAUSE >= deadline => {
                return Err(Error::Fetch {
                    url: url.to_owned(),
                    reason: format!("{reason} (gave up after {attempt} attempts)"),
                });
            }
            Err(reason) => {
                if attempt == 1 || attempt.is_multiple_of(10) {
                    tracing::info!(url, %reason, "seed not reachable yet; retrying");
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// One HTTP/1.1 GET; the body, or why not.
async fn get(url: &str) -> std::result::Result<Vec<u8>, String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let host = uri.host().ok_or("no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    // IPv6 literals come bracketed.
    let connect_host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((connect_host, port))
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "keelson-agent-boot")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        conn.abort();
        return Err(format!("HTTP {}", status.as_u16()));
    }
    let body = Limited::new(response.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    conn.abort();
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn seed_url_from_kernel_command_line() {
        let cmdline = "initrd=initrd.img console=ttyS0 quiet \
                       ds=nocloud;s=http://192.0.2.1:8080/nocloud/node-1/\n";
        assert_eq!(
            url_from_cmdline(cmdline).as_deref(),
            Some("http://192.0.2.1:8080/nocloud/node-1/")
        );
        assert_eq!(
            url_from_cmdline("ds=nocloud-net;seedfrom=http://h/x/ ro").as_deref(),
            Some("http://h/x/")
        );
        assert_eq!(
            url_from_cmdline("\"ds=nocloud;i=x;s=http://h/q/\"").as_deref(),
            Some("http://h/q/")
        );
        assert_eq!(url_from_cmdline("ds=ec2;s=http://h/ console=ttyS0"), None);
        assert_eq!(url_from_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn base_url_accepts_plain_http_only() {
        assert_eq!(base_url("http://h:8080/n/a").unwrap(), "http://h:8080/n/a/");
        assert_eq!(base_url("http://h/n/").unwrap(), "http://h/n/");
        for bad in ["https://h/n/", "file:///seed/", "/seed/", "http://h/n/?x=1"] {
            assert!(matches!(base_url(bad), Err(Error::BadUrl { .. })), "{bad}");
        }
    }

    /// A tiny HTTP/1.1 server on loopback: serves `docs` by path, fails the first `fail_first`
    /// requests with a closed connection, counts requests.
    async fn server(
        docs: HashMap<&'static str, &'static str>,
        fail_first: usize,
    ) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => len += k,
                    }
                }
                if n < fail_first {
                    continue;
                }
                let head = String::from_utf8_lossy(&buf[..len]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let resp = match docs.get(path.as_str()) {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    ),
                    None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(),
                };
                let _ = sock.write_all(resp.as_bytes()).await;
            }
        });
        (format!("http://{addr}/nocloud/n1/"), count)
    }

    fn docs() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            (
                "/nocloud/n1/meta-data",
                "instance-id: n1\nlocal-hostname: n1\n",
            ),
            ("/nocloud/n1/user-data", "#cloud-config\nhostname: n1\n"),
        ])
    }

    #[tokio::test]
    async fn fetches_both_documents() {
        let (base, _) = server(docs(), 0).await;
        let seed = fetch(&base, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(seed.meta_data, "instance-id: n1\nlocal-hostname: n1\n");
        assert_eq!(seed.user_data, "#cloud-config\nhostname: n1\n");
    }

    #[tokio::test]
    async fn retries_until_the_server_answers() {
        let (base, count) = server(docs(), 2).await;
        let seed = fetch(&base, Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(seed.user_data, "#cloud-config\nhostname: n1\n");
        assert_eq!(
            count.load(Ordering::SeqCst),
            4,
            "two failures, then two documents"
        );
    }

    #[tokio::test]
    async fn missing_document_fails_at_once() {
        let (base, count) = server(HashMap::new(), 0).await;
        let err = fetch(&base, Instant::now() + Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("HTTP 404"), "{err}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unreachable_seed_gives_up_at_the_deadline() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Instant::now();
        let err = fetch(
            &format!("http://127.0.0.1:{port}/n/"),
            Instant::now() + Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Fetch { .. }), "{err}");
        assert!(err.to_string().contains("gave up"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

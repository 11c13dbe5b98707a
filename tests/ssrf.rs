//! Callback URLs and SSRF: a corpus of hostile callback URLs is refused at submit (400, nothing
//! created) and, sent straight to the webhook sender, never reaches a listener on the loopback
//! interface; public-looking URLs are still accepted; response bodies are not read.
//!
//! Nothing here leaves the machine. Public URLs are only submitted to a server whose workers
//! do not run, so nothing delivers them. The sender's checks are proven through its network
//! seam ([`Network`]): names answer from a table (what a resolver would have said), and every
//! connection the checks let through is routed to a loopback listener, so the checks see the
//! address the sender would have connected to. Literal addresses never reach the resolver:
//! only loopback ones are sent for real, the others are shown refused before any connection.
//!
//! `PORT` in a corpus entry stands for the port of the test's loopback listener, so a URL the
//! sender wrongly connected to would land on it.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::Server;
use serde_json::json;
use tasklane_core::webhook::{BoxFuture, DeliveryResult, Network, WebhookSender};
use tasklane_local::Hooks;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOSTILE: &[&str] = &[
    // Loopback, in every numeric spelling the WHATWG parser accepts.
    "https://127.0.0.1:PORT/hook",
    "https://127.0.0.2:PORT/hook",
    "https://127.1:PORT/hook",
    "https://127.0.1:PORT/hook",
    "https://2130706433:PORT/hook",
    "https://0x7f000001:PORT/hook",
    "https://017700000001:PORT/hook",
    "https://0177.0.0.1:PORT/hook",
    "https://0x7f.1:PORT/hook",
    "https://0x7f.0.0.1:PORT/hook",
    "https://0x7f.0.0.01:PORT/hook",
    "https://127.000.000.001:PORT/hook",
    "https://127.0.0.1.:PORT/hook",
    "https://%31%32%37.0.0.1:PORT/hook",
    "https://\u{ff11}\u{ff12}\u{ff17}.0.0.1:PORT/hook",
    "https://127\u{3002}0\u{3002}0\u{3002}1:PORT/hook",
    "HTTPS://127.0.0.1:PORT/hook",
    // "This network": connecting to 0.0.0.0 or :: reaches the local host.
    "https://0.0.0.0:PORT/hook",
    "https://0:PORT/hook",
    "https://0.1.2.3:PORT/hook",
    // Private, CGNAT, link-local and cloud metadata.
    "https://10.0.0.1:PORT/hook",
    "https://10.1:PORT/hook",
    "https://167772161:PORT/hook",
    "https://172.16.0.1:PORT/hook",
    "https://172.31.255.254:PORT/hook",
    "https://192.168.0.1:PORT/hook",
    "https://192.168.1:PORT/hook",
    "https://100.64.0.1:PORT/hook",
    "https://100.127.255.254:PORT/hook",
    "https://169.254.169.254/latest/meta-data/",
    "https://169.254.0.1:PORT/hook",
    "https://2852039166/latest/meta-data/",
    "https://0xa9fea9fe/latest/meta-data/",
    "https://0251.0376.0251.0376/latest/meta-data/",
    "https://0xa9.254.0251.0xfe/latest/meta-data/",
    "https://169.254.43518/latest/meta-data/",
    // Special-purpose IPv4 blocks.
    "https://255.255.255.255:PORT/hook",
    "https://224.0.0.1:PORT/hook",
    "https://239.255.255.250:PORT/hook",
    "https://240.0.0.1:PORT/hook",
    "https://198.18.0.1:PORT/hook",
    "https://198.19.255.1:PORT/hook",
    "https://192.0.2.1:PORT/hook",
    "https://198.51.100.1:PORT/hook",
    "https://203.0.113.1:PORT/hook",
    "https://192.0.0.8:PORT/hook",
    "https://192.88.99.1:PORT/hook",
    // IPv6 and the IPv6 forms that carry an IPv4 address.
    "https://[::1]:PORT/hook",
    "https://[0:0:0:0:0:0:0:1]:PORT/hook",
    "https://[::]:PORT/hook",
    "https://[::ffff:127.0.0.1]:PORT/hook",
    "https://[::ffff:7f00:1]:PORT/hook",
    "https://[0:0:0:0:0:ffff:127.0.0.1]:PORT/hook",
    "https://[::ffff:169.254.169.254]/latest/meta-data/",
    "https://[::ffff:10.0.0.1]:PORT/hook",
    "https://[::127.0.0.1]:PORT/hook",
    "https://[::ffff:0:127.0.0.1]:PORT/hook",
    "https://[64:ff9b::127.0.0.1]:PORT/hook",
    "https://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "https://[64:ff9b:1::a00:1]:PORT/hook",
    "https://[2002:7f00:1::1]:PORT/hook",
    "https://[2002:a9fe:a9fe::]/latest/meta-data/",
    "https://[2002:c0a8:101::1]:PORT/hook",
    "https://[fc00::1]:PORT/hook",
    "https://[fd00:ec2::254]/latest/meta-data/",
    "https://[fe80::1]:PORT/hook",
    "https://[fe80::1%25lo]:PORT/hook",
    "https://[fe80::1%lo]:PORT/hook",
    "https://[fec0::1]:PORT/hook",
    "https://[ff02::1]:PORT/hook",
    "https://[100::1]:PORT/hook",
    "https://[2001::1]:PORT/hook",
    "https://[2001:db8::1]:PORT/hook",
    // Names that only a local resolver answers.
    "https://localhost:PORT/hook",
    "https://LOCALHOST:PORT/hook",
    "https://localhost.:PORT/hook",
    "https://api.localhost:PORT/hook",
    "https://\u{24db}ocalhost:PORT/hook",
    "https://vm:PORT/hook",
    "https://metadata/computeMetadata/v1/",
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://printer.local:PORT/hook",
    "https://localhost.localdomain:PORT/hook",
    "https://router.home.arpa:PORT/hook",
    // Userinfo, backslash and fragment tricks that end on a private host.
    "https://public.example@127.0.0.1:PORT/hook",
    "https://public.example:443@127.0.0.1:PORT/hook",
    "https://user:pass@example.com/hook",
    "https:\\\\127.0.0.1:PORT\\hook",
    "https:/\\127.0.0.1:PORT/hook",
    "https:127.0.0.1:PORT/hook",
    "https://127.0.0.1:PORT#@example.com/hook",
    "https://127.0.0.1:PORT?@example.com/hook",
    // Schemes other than https.
    "http://example.com/hook",
    "http://127.0.0.1:PORT/hook",
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "gopher://127.0.0.1:PORT/_",
    "dict://127.0.0.1:PORT/",
    "ws://127.0.0.1:PORT/",
    "data:text/plain,hello",
    "javascript:alert(1)",
    // Not URLs at all.
    "//127.0.0.1:PORT/hook",
    "/hook",
    "",
    "https://",
    "https://1.2.3.4.5/",
    "https://256.0.0.1/",
];

const PUBLIC: &[&str] = &[
    "https://example.com/hook",
    "https://hooks.example.com./hook",
    "https://8.8.8.8/x",
    "https://1.1.1.1:8443/x",
    "https://[2606:4700:4700::1111]/x",
    "https://example.com\\@127.0.0.1/hook",
];

fn corpus(port: u16) -> Vec<String> {
    HOSTILE
        .iter()
        .map(|u| u.replace("PORT", &port.to_string()))
        .collect()
}

/// What a resolver would answer for the corpus's names (local-only names answer with local,
/// private or metadata addresses) and for the test's public names; any other name does not
/// resolve, as on a machine without DNS.
fn resolver_answer(host: &str) -> Option<Vec<IpAddr>> {
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let loopback = vec![v4(127, 0, 0, 1), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    Some(match host.trim_end_matches('.') {
        "localhost" | "api.localhost" | "localhost.localdomain" => loopback,
        "vm" => vec![v4(10, 0, 0, 7)],
        "metadata" | "metadata.google.internal" => vec![v4(169, 254, 169, 254)],
        "printer.local" => vec![v4(192, 168, 1, 20)],
        "router.home.arpa" => vec![v4(192, 168, 1, 1), "fd00::1".parse().unwrap()],
        "public.test" => vec![v4(8, 8, 8, 8)],
        "mixed.test" => vec![v4(10, 0, 0, 1), v4(1, 1, 1, 1), v4(192, 168, 0, 1)],
        _ => return None,
    })
}

/// The seam: names answer from [`resolver_answer`]; a connection to a public address goes to
/// the `public` listener, any other to the `trap` listener. Nothing leaves loopback.
#[derive(Debug)]
struct Routed {
    public: SocketAddr,
    trap: SocketAddr,
}

impl Network for Routed {
    fn lookup(&self, host: String) -> BoxFuture<std::io::Result<Vec<IpAddr>>> {
        let answer = resolver_answer(&host);
        Box::pin(async move {
            answer.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, host))
        })
    }

    fn route(&self, to: SocketAddr) -> SocketAddr {
        if tasklane_core::webhook::is_public(to.ip()) {
            self.public
        } else {
            self.trap
        }
    }
}

/// Whether a URL's host is a literal address that a connection would take to this machine
/// (loopback or unspecified): only those are sent for real when the checks are under test.
fn literal_stays_on_this_machine(url: &str) -> bool {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Ipv4(a)) => a.is_loopback() || a.is_unspecified(),
        Some(url::Host::Ipv6(a)) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        _ => false,
    }
}

fn literal_host(url: &str) -> bool {
    matches!(
        url::Url::parse(url)
            .ok()
            .and_then(|u| u.host().map(|h| h.to_owned())),
        Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))
    )
}

/// Asserts no connection reached `listener` before this call: a marker connection made now
/// must be the first one in its accept queue.
async fn assert_accepted_nothing(listener: &TcpListener) {
    let marker = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (_, peer) = listener.accept().await.unwrap();
    assert_eq!(
        peer,
        marker.local_addr().unwrap(),
        "a connection reached the listener on {} before the marker",
        listener.local_addr().unwrap()
    );
}

#[tokio::test]
async fn every_hostile_callback_url_is_refused_at_submit_and_creates_nothing() {
    // No workers: the public URLs are accepted and stored, and nothing ever delivers to them.
    let s = Server::start_with(
        |c| {
            c.core.callback_allow_private = false;
            c.workers = 0;
        },
        Hooks::default(),
    )
    .await;
    let before = s.credits().await;
    let corpus = corpus(8443);
    let mut refused = 0;
    for url in &corpus {
        let a = s
            .post(
                "/tasks",
                &json!({"model": "echo", "prompt": "x", "callback_url": url}),
            )
            .await;
        let e = a.assert_error(400, "invalid_request");
        assert_eq!(e["param"], "callback_url", "{url:?}: {}", a.body);
        refused += 1;
    }
    let mut accepted = 0;
    for url in PUBLIC {
        let t = s
            .submit(json!({"model": "echo", "prompt": "x", "callback_url": url}))
            .await;
        assert!(t["task_id"].is_string(), "{url}: {t}");
        accepted += 1;
    }
    println!(
        "ssrf corpus at submit: {} hostile URLs, {refused} refused; {} public URLs, {accepted} accepted",
        corpus.len(),
        PUBLIC.len()
    );
    assert!(corpus.len() >= 60);
    assert_eq!(refused, corpus.len());
    assert_eq!(
        s.credits().await,
        before - PUBLIC.len() as u64,
        "only the public URLs were charged"
    );
    let list = s.get("/tasks?limit=100").await;
    let created = list.body["data"].as_array().unwrap();
    assert_eq!(
        created.len(),
        PUBLIC.len(),
        "only the public URLs created tasks"
    );
    s.stop().await;
}

#[tokio::test]
async fn no_hostile_callback_url_reaches_a_loopback_listener_at_delivery() {
    let trap = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = trap.local_addr().unwrap().port();
    // The same port on ::1, when the host has IPv6, catches `[::]` and `[::1]`.
    let v6 = TcpListener::bind(SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], port)))
        .await
        .ok();
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let network = Arc::new(Routed {
        public: public.local_addr().unwrap(),
        trap: trap.local_addr().unwrap(),
    });

    // The trap does see a sender that is allowed private targets.
    let open = WebhookSender::with_network(Duration::from_secs(5), true, network.clone());
    let url = format!("http://localhost:{port}/hook");
    let sent =
        tokio::spawn(async move { open.send(&url, "whsec_dGVzdA==", "msg_1", vec![]).await });
    let (conn, _) = trap.accept().await.unwrap();
    drop(conn);
    assert!(matches!(sent.await.unwrap(), DeliveryResult::NoAnswer(_)));

    // A name with public answers is connected to, on a public address only (the control that
    // shows the seam routes what the checks let through).
    let sender = WebhookSender::with_network(Duration::from_secs(5), false, network.clone());
    for name in ["public.test", "mixed.test"] {
        let url = format!("https://{name}/hook");
        let s2 = sender.clone();
        let sent =
            tokio::spawn(async move { s2.send(&url, "whsec_dGVzdA==", "msg_1", vec![]).await });
        let accepted = tokio::time::timeout(Duration::from_secs(10), public.accept()).await;
        assert!(
            accepted.is_ok(),
            "{name}: no connection to its public address"
        );
        drop(accepted);
        assert!(matches!(sent.await.unwrap(), DeliveryResult::NoAnswer(_)));
    }

    let mut sent_for_real = 0;
    let mut refused_unsent = 0;
    for url in &corpus(port) {
        if literal_host(url) && !literal_stays_on_this_machine(url) {
            // A literal address is connected to without a lookup, so the seam cannot route it:
            // it must be refused before any connection is tried.
            assert!(
                sender.refuses_before_connecting(url).is_some(),
                "{url:?} would be connected to"
            );
            refused_unsent += 1;
            continue;
        }
        let r = sender
            .send(url, "whsec_dGVzdA==", "msg_1", b"{}".to_vec())
            .await;
        assert!(
            matches!(r, DeliveryResult::NoAnswer(_)),
            "{url:?} answered {r:?}"
        );
        sent_for_real += 1;
    }
    assert_accepted_nothing(&trap).await;
    if let Some(v6) = &v6 {
        assert_accepted_nothing(v6).await;
    }
    println!(
        "ssrf corpus at delivery: {sent_for_real} URLs sent through the seam and refused, \
         {refused_unsent} literal non-local addresses refused before connecting, \
         0 connections on 127.0.0.1:{port}{}",
        if v6.is_some() { " or [::1]" } else { "" }
    );
    assert!(sent_for_real >= 40 && refused_unsent >= 30);
}

#[tokio::test]
async fn a_response_body_is_dropped_unread_and_its_connection_closed() {
    const ADVERTISED: u64 = 1 << 30;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // A receiver that answers 200 with a 1 GiB body and writes it until the client hangs up.
    let receiver = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended early");
            head.extend_from_slice(&buf[..n]);
        }
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {ADVERTISED}\r\n\r\n");
        conn.write_all(answer.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let mut written = 0u64;
        while written < ADVERTISED {
            if conn.write_all(&chunk).await.is_err() {
                return (written, true);
            }
            written += chunk.len() as u64;
        }
        (written, false)
    });
    let sender = WebhookSender::new(Duration::from_secs(30), true);
    let r = sender
        .send(
            &format!("http://127.0.0.1:{port}/hook"),
            "whsec_dGVzdA==",
            "msg_1",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(r, DeliveryResult::Status(200));
    // The sender (and its connection pool) stays alive: only dropping the response may close.
    let (written, hung_up) = receiver.await.unwrap();
    assert!(
        hung_up,
        "the client read the whole {ADVERTISED}-byte body ({written} bytes)"
    );
    println!("the receiver wrote {written} bytes of a {ADVERTISED}-byte body before the hang-up");
    drop(sender);
}

#[tokio::test]
async fn a_proxy_named_in_the_environment_is_not_used() {
    const CHILD: &str = "TASKLANE_SSRF_PROXY_CHILD";
    let name = "a_proxy_named_in_the_environment_is_not_used";
    if std::env::var_os(CHILD).is_some() {
        // In the child: the proxy variables are set for this whole process. `public.test`
        // resolves (through the seam) to a public address, which is routed to `direct`.
        let direct = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let trap = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let network = Arc::new(Routed {
            public: direct.local_addr().unwrap(),
            trap: trap.local_addr().unwrap(),
        });
        let sender = WebhookSender::with_network(Duration::from_secs(2), false, network);
        let sent = tokio::spawn(async move {
            sender
                .send(
                    "https://public.test/hook",
                    "whsec_dGVzdA==",
                    "msg_1",
                    vec![],
                )
                .await
        });
        let accepted = tokio::time::timeout(Duration::from_secs(10), direct.accept()).await;
        assert!(accepted.is_ok(), "the sender did not connect directly");
        drop(accepted);
        let r = sent.await.unwrap();
        assert!(matches!(r, DeliveryResult::NoAnswer(_)), "{r:?}");
        assert_accepted_nothing(&trap).await;
        return;
    }
    // A proxy would resolve (and connect to) the callback host on the sender's behalf, past
    // the address check; proxy settings are process-wide, so the send runs in a child process.
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let status = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1"])
        .env(CHILD, "1")
        .env("HTTPS_PROXY", &proxy_url)
        .env("https_proxy", &proxy_url)
        .env("ALL_PROXY", &proxy_url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "the child test failed: {status}");
    assert_accepted_nothing(&proxy).await;
}

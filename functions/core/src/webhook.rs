//! Webhooks: Standard Webhooks signing and a careful HTTP sender.
//!
//! The sender follows no redirects, bounds connect and total time, does not read response
//! bodies, and (unless private targets are allowed for development) refuses to connect to
//! any address that is not public, checked on the addresses the name resolves to at connect time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Signs `body` per Standard Webhooks: `v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>`
/// with the secret's bytes (the base64 after `whsec_`).
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .unwrap_or_else(|_| secret.as_bytes().to_vec());
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Whether `ip` is a public unicast address a webhook may be sent to.
///
/// IPv4: everything except "this network" 0/8, loopback, private, CGNAT 100.64/10, link-local
/// (169.254.169.254 included), IETF 192.0.0/24, documentation, the 6to4 relay 192.88.99/24,
/// benchmarking 198.18/15, multicast, reserved 240/4 and broadcast.
/// IPv6: only global unicast 2000::/3 less 2001::/23 (Teredo, benchmarking, ORCHID and other
/// protocol assignments) and the documentation blocks; forms that carry an IPv4 address
/// (IPv4-mapped, NAT64 64:ff9b::/96, 6to4 2002::/16) are judged by that address, and every other
/// form (loopback, unspecified, IPv4-compatible, unique-local, link-local, site-local,
/// multicast, discard-only, local-use NAT64) lies outside 2000::/3.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 192 && o[1] == 88 && o[2] == 99)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            };
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]));
            }
            (s[0] & 0xe000) == 0x2000
                && !(s[0] == 0x2001 && s[1] < 0x0200)
                && !(s[0] == 0x2001 && s[1] == 0x0db8)
                && !(s[0] == 0x3fff && s[1] < 0x1000)
        }
    }
}

/// Refuses, before any connection is tried, what the resolver never sees: a URL that does not
/// parse, a scheme other than `https`, and a literal address that is not public (literal
/// addresses are connected to without resolving).
fn check_target(url: &str) -> Result<(), &'static str> {
    let u = url::Url::parse(url).map_err(|_| "not a valid URL")?;
    if u.scheme() != "https" {
        return Err("not https");
    }
    let literal = match u.host() {
        None => return Err("no host"),
        Some(url::Host::Domain(_)) => return Ok(()),
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
    };
    if is_public(literal) {
        Ok(())
    } else {
        Err("not a public address")
    }
}

/// The answer of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// The receiver answered with this status.
    Status(u16),
    /// No answer (refused address, connect failure, timeout).
    NoAnswer(String),
}

/// Sends signed webhook requests.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    allow_private: bool,
}

/// How the sender reaches the network: the addresses a name resolves to, and where a
/// connection to an address (after it passed the checks) actually goes.
///
/// [`SystemNetwork`] is the real one. Tests plug in their own: a table of names and the
/// addresses they "resolve" to, with every connection routed to a loopback listener, so the
/// checks run on exactly the addresses the sender would have connected to while no packet and
/// no DNS query leaves the machine. Literal addresses in a URL are never looked up (they are
/// judged before anything is sent: [`WebhookSender::refuses_before_connecting`]).
pub trait Network: Send + Sync + std::fmt::Debug + 'static {
    /// The addresses `host` resolves to.
    fn lookup(&self, host: String) -> BoxFuture<std::io::Result<Vec<IpAddr>>>;

    /// Where a connection to `to`, already checked, goes. The real network: `to` itself.
    fn route(&self, to: SocketAddr) -> SocketAddr {
        to
    }
}

/// A boxed future, as [`Network::lookup`] returns it.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The machine's resolver (`getaddrinfo`) and direct connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemNetwork;

impl Network for SystemNetwork {
    fn lookup(&self, host: String) -> BoxFuture<std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Resolves names through a [`Network`] and, unless private targets are allowed, keeps only
/// their public addresses. What it returns is exactly what the connector connects to, so the
/// check holds on the address actually connected to; a name that changes its answer (DNS
/// rebinding) is resolved, and checked, again on every new connection.
struct Resolver {
    network: std::sync::Arc<dyn Network>,
    public_only: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let network = self.network.clone();
        let public_only = self.public_only;
        Box::pin(async move {
            let found = network.lookup(name.as_str().to_string()).await?;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|ip| !public_only || is_public(*ip))
                // Port 0: the connector puts in the URL's port.
                .map(|ip| network.route(SocketAddr::new(ip, 0)))
                .collect();
            if allowed.is_empty() {
                return Err(if public_only {
                    "callback host does not resolve to a public address".into()
                } else {
                    "callback host does not resolve".into()
                });
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client for addresses that someone else chose (webhook targets, upstream output
/// URLs): it follows no redirects, uses no proxy, bounds connect and total time, and resolves
/// names through `network`, keeping only public addresses unless `allow_private`. Literal
/// addresses in URLs are not resolved: judge them first ([`is_public`]).
pub fn guarded_client(
    timeout: Duration,
    allow_private: bool,
    network: std::sync::Arc<dyn Network>,
    user_agent: &str,
) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .user_agent(user_agent)
        // A proxy (HTTPS_PROXY and the like) would resolve and connect on our behalf,
        // past the address check.
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(Resolver {
            network,
            public_only: !allow_private,
        }))
        .build()
        .expect("static reqwest configuration")
}

impl WebhookSender {
    /// A sender with a `timeout` for the whole request; private targets only when `allow_private`.
    pub fn new(timeout: Duration, allow_private: bool) -> Self {
        Self::with_network(timeout, allow_private, std::sync::Arc::new(SystemNetwork))
    }

    /// A sender that resolves and connects through `network` (see [`Network`]).
    pub fn with_network(
        timeout: Duration,
        allow_private: bool,
        network: std::sync::Arc<dyn Network>,
    ) -> Self {
        let client = guarded_client(
            timeout,
            allow_private,
            network,
            concat!("tasklane-webhooks/", env!("CARGO_PKG_VERSION")),
        );
        WebhookSender {
            client,
            allow_private,
        }
    }

    /// Why a delivery to `url` would be refused before any lookup or connection (a URL that
    /// does not parse, not `https`, a literal address that is not public); `None` when it
    /// would be attempted. Always `None` for a sender that allows private targets.
    pub fn refuses_before_connecting(&self, url: &str) -> Option<&'static str> {
        if self.allow_private {
            return None;
        }
        check_target(url).err()
    }

    /// POSTs `body` to `url` with the Standard Webhooks headers.
    pub async fn send(
        &self,
        url: &str,
        secret: &str,
        msg_id: &str,
        body: Vec<u8>,
    ) -> DeliveryResult {
        if let Some(why) = self.refuses_before_connecting(url) {
            return DeliveryResult::NoAnswer(format!("callback target refused: {why}"));
        }
        let ts = chrono::Utc::now().timestamp();
        let sig = sign(secret, msg_id, ts, &body);
        let res = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body)
            .send()
            .await;
        match res {
            // The body is dropped unread: hyper then takes at most what one read of the
            // connection already holds and closes it instead of draining the rest.
            Ok(r) => DeliveryResult::Status(r.status().as_u16()),
            Err(e) => DeliveryResult::NoAnswer(if e.is_timeout() {
                "timed out".into()
            } else {
                "connection failed".into()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // Test vector from the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    fn refused(addrs: &[&str]) {
        for a in addrs {
            assert!(!is_public(a.parse().unwrap()), "{a} counted as public");
        }
    }

    fn allowed(addrs: &[&str]) {
        for a in addrs {
            assert!(is_public(a.parse().unwrap()), "{a} counted as not public");
        }
    }

    #[test]
    fn every_special_purpose_ipv4_block_is_refused_at_both_ends() {
        refused(&[
            "0.0.0.0",
            "0.255.255.255",
            "10.0.0.0",
            "10.255.255.255",
            "100.64.0.0",
            "100.127.255.255",
            "127.0.0.0",
            "127.255.255.255",
            "169.254.0.0",
            "169.254.255.255",
            "172.16.0.0",
            "172.31.255.255",
            "192.0.0.0",
            "192.0.0.255",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.0.0",
            "192.168.255.255",
            "198.18.0.0",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.0",
            "239.255.255.255",
            "240.0.0.0",
            "255.255.255.254",
        ]);
        allowed(&[
            "1.0.0.0",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
        ]);
    }

    #[test]
    fn ipv6_outside_global_unicast_and_its_special_blocks_is_refused() {
        refused(&[
            "::",
            "::1",
            "::127.0.0.1",
            "::8.8.8.8",
            "::ffff:0:127.0.0.1",
            "100::1",
            "64:ff9b:1::1",
            "5f00::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:10::1",
            "2001:1ff::1",
            "2001:db8::1",
            "3fff::1",
            "3fff:fff::1",
        ]);
        allowed(&[
            "2001:200::1",
            "2001:4860:4860::8888",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "3ffe::1",
            "3fff:1000::1",
        ]);
    }

    #[test]
    fn ipv6_forms_carrying_an_ipv4_address_are_judged_by_that_address() {
        refused(&[
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:100.64.0.1",
            "::ffff:0.0.0.0",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::192.168.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::1",
            "2002:0a00:0001:1::1",
        ]);
        allowed(&["::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"]);
    }

    #[test]
    fn targets_that_need_no_lookup_are_refused_before_connecting() {
        for url in [
            "http://example.com/",
            "ftp://example.com/",
            "not a url",
            "https://127.0.0.1/",
            "https://0x7f.1/",
            "https://2130706433/",
            "https://[::ffff:127.0.0.1]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://[2002:7f00:1::]/",
            "https://169.254.169.254/latest/meta-data/",
        ] {
            assert!(check_target(url).is_err(), "{url} passed");
        }
        for url in [
            "https://example.com/hook",
            "https://8.8.8.8/x",
            "https://[2606:4700::1]/",
        ] {
            assert_eq!(check_target(url), Ok(()), "{url}");
        }
    }

    /// Names answer from a table; nothing is sent.
    #[derive(Debug)]
    struct Table(Vec<(&'static str, Vec<IpAddr>)>);

    impl Network for Table {
        fn lookup(&self, host: String) -> BoxFuture<std::io::Result<Vec<IpAddr>>> {
            let found = self
                .0
                .iter()
                .find(|(n, _)| *n == host)
                .map(|(_, a)| a.clone());
            Box::pin(async move { found.ok_or_else(|| std::io::Error::other("no such name")) })
        }
    }

    async fn resolve(public_only: bool, name: &str) -> Result<Vec<SocketAddr>, String> {
        use reqwest::dns::Resolve;
        let table = Table(vec![
            (
                "loopback.test",
                vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            ),
            (
                "mixed.test",
                vec!["10.0.0.1".parse().unwrap(), "8.8.8.8".parse().unwrap()],
            ),
        ]);
        let r = Resolver {
            network: std::sync::Arc::new(table),
            public_only,
        };
        r.resolve(name.parse().unwrap())
            .await
            .map(|a| a.collect())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn the_resolver_keeps_only_public_addresses_unless_private_ones_are_allowed() {
        let refused = resolve(true, "loopback.test").await.unwrap_err();
        assert!(refused.contains("public"), "{refused}");
        assert_eq!(
            resolve(true, "mixed.test").await.unwrap(),
            vec!["8.8.8.8:0".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(resolve(false, "loopback.test").await.unwrap().len(), 2);
        assert!(resolve(true, "unknown.test").await.is_err());
    }
}

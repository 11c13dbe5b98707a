//! Webhooks: Standard Webhooks signing and a careful HTTP sender.
//!
//! The sender follows no redirects, bounds connect and total time, does not read response
//! bodies, and (unless private targets are allowed for development) refuses to connect to
//! any address that is not public, checked on the addresses the name resolves to at connect time.

use std::net::{IpAddr, SocketAddr};
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
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0)
        }
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

struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addrs.into_iter().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err("callback host does not resolve to a public address".into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl WebhookSender {
    /// A sender with a `timeout` for the whole request; private targets only when `allow_private`.
    pub fn new(timeout: Duration, allow_private: bool) -> Self {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .user_agent(concat!("tasklane-webhooks/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            b = b.dns_resolver(std::sync::Arc::new(PublicOnly));
        }
        WebhookSender {
            client: b.build().expect("static reqwest configuration"),
            allow_private,
        }
    }

    /// POSTs `body` to `url` with the Standard Webhooks headers.
    pub async fn send(
        &self,
        url: &str,
        secret: &str,
        msg_id: &str,
        body: Vec<u8>,
    ) -> DeliveryResult {
        if !self.allow_private {
            // Literal addresses never reach the resolver: check them here.
            if let Ok(u) = url::Url::parse(url) {
                let literal = match u.host() {
                    Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
                    Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
                    _ => None,
                };
                if literal.is_some_and(|ip| !is_public(ip)) || u.scheme() != "https" {
                    return DeliveryResult::NoAnswer(
                        "callback target refused: not a public https address".into(),
                    );
                }
            }
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
            // The body is dropped unread.
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
}

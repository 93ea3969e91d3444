//! The client's address, for throttling and logs. `X-Forwarded-For` is
//! written by whoever sends the request, so it is believed only when the TCP
//! peer is a configured trusted proxy (`COHORT_TRUSTED_PROXIES`), and then
//! only as far as the proxies go: the client is the right-most address that
//! is not itself a trusted proxy (what the last trusted hop saw).

use std::future::{Ready, ready};
use std::net::IpAddr;

use actix_web::dev::Payload;
use actix_web::http::header::HeaderMap;
use actix_web::{FromRequest, HttpRequest};
use ipnet::IpNet;

/// The configured trusted proxies (app data).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Vec<IpNet>);

impl TrustedProxies {
    fn trusts(&self, ip: &IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(ip))
    }

    /// The client address of a request that came from `peer`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(&peer) {
            return peer;
        }
        // Every X-Forwarded-For line, in order, as one list.
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .map(|s| s.parse::<IpAddr>().ok())
            .collect::<Option<Vec<_>>>()
            // A garbled header from a trusted proxy: trust none of it.
            .unwrap_or_default();
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            client = hop;
            if !self.trusts(&hop) {
                break;
            }
        }
        client
    }

    /// The client address of `req` (None only without a peer, as in tests
    /// that build requests by hand).
    pub fn of(req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        Some(
            match req.app_data::<actix_web::web::Data<TrustedProxies>>() {
                Some(t) => t.client(peer, req.headers()),
                None => peer,
            },
        )
    }
}

/// Extractor: the client's address as the throttle keys it.
pub struct ClientIp(pub Option<IpAddr>);

impl ClientIp {
    pub fn key(&self) -> Option<String> {
        self.0.map(|ip| ip.to_string())
    }
}

impl FromRequest for ClientIp {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Ok(ClientIp(TrustedProxies::of(req))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append(
                HeaderName::from_static("x-forwarded-for"),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_cannot_spoof() {
        let t = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            t.client(ip("203.0.113.9"), &headers(&["1.2.3.4"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            TrustedProxies::default().client(ip("10.1.1.1"), &headers(&["1.2.3.4"])),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn a_trusted_chain_yields_the_last_untrusted_hop() {
        let t = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]);
        // The client forged "6.6.6.6"; the edge proxy appended the real
        // address, the inner proxy appended the edge's.
        let h = headers(&["6.6.6.6, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(t.client(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        // No header: the proxy itself.
        assert_eq!(t.client(ip("10.0.0.1"), &headers(&[])), ip("10.0.0.1"));
        // Garbage: not believed.
        assert_eq!(
            t.client(ip("10.0.0.1"), &headers(&["not-an-ip"])),
            ip("10.0.0.1")
        );
    }
}

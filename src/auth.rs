//! Who may post: client IP allow-list (with `X-Forwarded-For` from trusted proxies only),
//! HTTP Basic credentials and the `api_key` body parameter.
//!
//! Pure checks over values the route hands in; secrets are compared in constant time and
//! never appear in an error or a log line.

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use ipnet::IpNet;
use subtle::ConstantTimeEq;
use thiserror::Error;
use warp::http::{header, HeaderMap};

use crate::settings::{AuthSettings, Secret};

/// A request that is not allowed in.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    #[error("this client address may not post webhooks")]
    Forbidden,
    #[error("HTTP Basic credentials are required")]
    MissingBasic,
    #[error("HTTP Basic credentials are wrong")]
    WrongBasic,
    /// `basic` tells whether HTTP Basic is configured too.
    #[error("api_key is required")]
    MissingApiKey { basic: bool },
    #[error("api_key is wrong")]
    WrongApiKey { basic: bool },
}

impl AuthError {
    /// Whether the answer carries `WWW-Authenticate: Basic`: every 401 does when Basic is
    /// configured (RFC 9110: a 401 names a scheme; there is none to name for api_key alone).
    pub fn challenges_basic(self) -> bool {
        matches!(
            self,
            AuthError::MissingBasic
                | AuthError::WrongBasic
                | AuthError::MissingApiKey { basic: true }
                | AuthError::WrongApiKey { basic: true }
        )
    }
}

/// The checks configured in `[auth]`.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    api_key: Option<Secret>,
    /// Expected `Authorization` header value (`Basic base64(user:password)`).
    basic: Option<Secret>,
    allowed: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
}

impl Auth {
    /// The checks of `[auth]`, whose networks the loader has already parsed.
    pub fn from_settings(s: &AuthSettings) -> Auth {
        let basic = (!s.basic_username.is_empty()).then(|| {
            let pair = format!("{}:{}", s.basic_username, s.basic_password.expose());
            Secret::new(base64::engine::general_purpose::STANDARD.encode(pair))
        });
        Auth {
            api_key: s.api_key.is_set().then(|| s.api_key.clone()),
            basic,
            allowed: s.allowed_ips.clone(),
            trusted_proxies: s.trusted_proxies.clone(),
        }
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
    /// address of `X-Forwarded-For` that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let mut hops: Vec<&str> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(value) = value.to_str() else {
                return None;
            };
            hops.extend(value.split(',').map(str::trim).filter(|h| !h.is_empty()));
        }
        let mut client = peer;
        for hop in hops.iter().rev() {
            let ip = hop.parse::<IpAddr>().ok()?.to_canonical();
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        Some(client)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// `auth.allowed_ips`.
    pub fn check_client(
        &self,
        peer: Option<SocketAddr>,
        headers: &HeaderMap,
    ) -> Result<(), AuthError> {
        if self.allowed.is_empty() {
            return Ok(());
        }
        let client = peer.and_then(|p| self.client_ip(p.ip(), headers));
        match client {
            Some(ip) if self.allowed.iter().any(|n| n.contains(&ip)) => Ok(()),
            _ => Err(AuthError::Forbidden),
        }
    }

    /// HTTP Basic, when configured.
    pub fn check_basic(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let Some(expected) = &self.basic else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::MissingBasic)?
            .as_bytes();
        // Scheme names are case-insensitive; compare the credentials in constant time.
        let credentials = match given.get(..6) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"basic ") => given[6..].trim_ascii(),
            _ => return Err(AuthError::MissingBasic),
        };
        if bool::from(credentials.ct_eq(expected.expose().as_bytes())) {
            Ok(())
        } else {
            Err(AuthError::WrongBasic)
        }
    }

    /// The request's `api_key` parameter, when one is configured.
    pub fn check_api_key(&self, given: Option<&str>) -> Result<(), AuthError> {
        let Some(expected) = &self.api_key else {
            return Ok(());
        };
        let basic = self.basic.is_some();
        let given = given.ok_or(AuthError::MissingApiKey { basic })?;
        if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
            Ok(())
        } else {
            Err(AuthError::WrongApiKey { basic })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(toml_auth: AuthSettings) -> Auth {
        Auth::from_settings(&toml_auth)
    }

    fn xff(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", value.parse().unwrap());
        h
    }

    #[test]
    fn api_key_is_checked_only_when_configured() {
        assert_eq!(Auth::default().check_api_key(None), Ok(()));
        let a = auth(AuthSettings {
            api_key: Secret::new("k"),
            ..Default::default()
        });
        assert_eq!(a.check_api_key(Some("k")), Ok(()));
        assert_eq!(
            a.check_api_key(Some("K")),
            Err(AuthError::WrongApiKey { basic: false })
        );
        assert_eq!(
            a.check_api_key(Some("")),
            Err(AuthError::WrongApiKey { basic: false })
        );
        assert_eq!(
            a.check_api_key(None),
            Err(AuthError::MissingApiKey { basic: false })
        );
    }

    #[test]
    fn basic_credentials() {
        let a = auth(AuthSettings {
            basic_username: "cmc".into(),
            basic_password: Secret::new("pw"),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        assert_eq!(a.check_basic(&h), Err(AuthError::MissingBasic));
        h.insert(header::AUTHORIZATION, "Basic Y21jOnB3".parse().unwrap());
        assert_eq!(a.check_basic(&h), Ok(()));
        h.insert(header::AUTHORIZATION, "basic Y21jOnB3".parse().unwrap());
        assert_eq!(a.check_basic(&h), Ok(()));
        h.insert(header::AUTHORIZATION, "Basic Y21jOnB4".parse().unwrap());
        assert_eq!(a.check_basic(&h), Err(AuthError::WrongBasic));
        h.insert(header::AUTHORIZATION, "Bearer Y21jOnB3".parse().unwrap());
        assert_eq!(a.check_basic(&h), Err(AuthError::MissingBasic));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let a = auth(AuthSettings {
            allowed_ips: vec!["203.0.113.0/24".parse().unwrap()],
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        let proxy: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        let allowed: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        assert_eq!(a.check_client(Some(allowed), &HeaderMap::new()), Ok(()));
        assert_eq!(
            a.check_client(Some(stranger), &HeaderMap::new()),
            Err(AuthError::Forbidden)
        );
        // A stranger cannot spoof its way in.
        assert_eq!(
            a.check_client(Some(stranger), &xff("203.0.113.9")),
            Err(AuthError::Forbidden)
        );
        // Through the proxy, the right-most untrusted hop is the client.
        assert_eq!(a.check_client(Some(proxy), &xff("203.0.113.9")), Ok(()));
        assert_eq!(
            a.check_client(Some(proxy), &xff("203.0.113.9, 10.9.9.9")),
            Ok(())
        );
        assert_eq!(
            a.check_client(Some(proxy), &xff("203.0.113.9, 198.51.100.7")),
            Err(AuthError::Forbidden)
        );
        assert_eq!(
            a.check_client(Some(proxy), &xff("garbage")),
            Err(AuthError::Forbidden)
        );
        assert_eq!(
            a.check_client(None, &HeaderMap::new()),
            Err(AuthError::Forbidden)
        );
    }
}

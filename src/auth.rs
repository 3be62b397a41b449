//! Who may post: client IP allow-list (with `X-Forwarded-For` from trusted proxies only),
//! HTTP Basic credentials and the `api_key` body parameter.
//!
//! Pure checks over values the route hands in; secrets are compared in constant time and
//! never appear in an error or a log line. Several keys and several Basic users may be
//! accepted at once (a rotation): a value is compared with every one of them, whichever
//! matches, so the time taken does not tell which one did.

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use ipnet::IpNet;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
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
    /// Accepted `api_key` values in their configured order (a match's position is the label
    /// of the per-key request counter); empty: no key is required.
    api_keys: Vec<Secret>,
    /// Accepted `Authorization` credentials (`base64(user:password)`), one per Basic user;
    /// empty: Basic is not required.
    basic: Vec<Secret>,
    allowed: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
}

impl Auth {
    /// The checks of `[auth]`, whose networks the loader has already parsed.
    pub fn from_settings(s: &AuthSettings) -> Auth {
        let basic = s
            .basic_users()
            .iter()
            .map(|user| {
                let pair = format!("{}:{}", user.username, user.password.expose());
                Secret::new(base64::engine::general_purpose::STANDARD.encode(pair))
            })
            .collect();
        Auth {
            api_keys: s.api_key.keys().to_vec(),
            basic,
            allowed: s.allowed_ips.clone(),
            trusted_proxies: s.trusted_proxies.clone(),
        }
    }

    /// How many `api_key` values are accepted.
    pub fn api_keys(&self) -> usize {
        self.api_keys.len()
    }

    /// How many HTTP Basic users are accepted.
    pub fn basic_users(&self) -> usize {
        self.basic.len()
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

    /// HTTP Basic, when configured: the credentials of any accepted user.
    pub fn check_basic(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        if self.basic.is_empty() {
            return Ok(());
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::MissingBasic)?
            .as_bytes();
        // Scheme names are case-insensitive; compare the credentials in constant time.
        let credentials = match given.get(..6) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"basic ") => given[6..].trim_ascii(),
            _ => return Err(AuthError::MissingBasic),
        };
        match matching(credentials, &self.basic) {
            Some(_) => Ok(()),
            None => Err(AuthError::WrongBasic),
        }
    }

    /// The request's `api_key` parameter, when keys are configured: the position of the key
    /// it matches (`None` when no key is required).
    pub fn check_api_key(&self, given: Option<&str>) -> Result<Option<usize>, AuthError> {
        if self.api_keys.is_empty() {
            return Ok(None);
        }
        let basic = !self.basic.is_empty();
        let given = given.ok_or(AuthError::MissingApiKey { basic })?;
        match matching(given.as_bytes(), &self.api_keys) {
            Some(position) => Ok(Some(position)),
            None => Err(AuthError::WrongApiKey { basic }),
        }
    }
}

/// The position of the first of `accepted` equal to `given`, comparing with every one in
/// constant time (only the lengths may show), so no early exit tells which one matched.
fn matching(given: &[u8], accepted: &[Secret]) -> Option<usize> {
    let mut found = Choice::from(0);
    let mut position = 0u32;
    for (i, secret) in accepted.iter().enumerate() {
        let equal = given.ct_eq(secret.expose().as_bytes());
        position.conditional_assign(&(i as u32), equal & !found);
        found |= equal;
    }
    bool::from(found).then_some(position as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{ApiKeys, BasicCredential};

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
        assert_eq!(Auth::default().check_api_key(None), Ok(None));
        let a = auth(AuthSettings {
            api_key: Secret::new("k").into(),
            ..Default::default()
        });
        assert_eq!(a.check_api_key(Some("k")), Ok(Some(0)));
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
    fn any_of_several_keys_is_accepted_and_named_by_its_position() {
        let a = auth(AuthSettings {
            api_key: ApiKeys::new([Secret::new("old"), Secret::new("new")]),
            ..Default::default()
        });
        assert_eq!(a.api_keys(), 2);
        assert_eq!(a.check_api_key(Some("old")), Ok(Some(0)));
        assert_eq!(a.check_api_key(Some("new")), Ok(Some(1)));
        for wrong in ["", "ol", "oldnew", "NEW", "new "] {
            assert_eq!(
                a.check_api_key(Some(wrong)),
                Err(AuthError::WrongApiKey { basic: false }),
                "{wrong:?}"
            );
        }
        assert_eq!(
            a.check_api_key(None),
            Err(AuthError::MissingApiKey { basic: false })
        );
        // The same key twice is named by its first position.
        let twice = auth(AuthSettings {
            api_key: ApiKeys::new([Secret::new("k"), Secret::new("k")]),
            ..Default::default()
        });
        assert_eq!(twice.check_api_key(Some("k")), Ok(Some(0)));
    }

    #[test]
    fn every_basic_user_is_accepted_and_no_other() {
        let a = auth(AuthSettings {
            basic_username: "cmc".into(),
            basic_password: Secret::new("pw"),
            basic_credentials: vec![
                BasicCredential {
                    username: "second".into(),
                    password: Secret::new("pw2"),
                },
                // A password rotation: one user, two passwords.
                BasicCredential {
                    username: "second".into(),
                    password: Secret::new("pw3"),
                },
            ],
            ..Default::default()
        });
        assert_eq!(a.basic_users(), 3);
        let with = |user: &str, password: &str| {
            let mut h = HeaderMap::new();
            let value =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            h.insert(
                header::AUTHORIZATION,
                format!("Basic {value}").parse().unwrap(),
            );
            a.check_basic(&h)
        };
        assert_eq!(with("cmc", "pw"), Ok(()));
        assert_eq!(with("second", "pw2"), Ok(()));
        assert_eq!(with("second", "pw3"), Ok(()));
        assert_eq!(with("second", "pw"), Err(AuthError::WrongBasic));
        assert_eq!(with("third", "pw2"), Err(AuthError::WrongBasic));
        assert_eq!(
            a.check_basic(&HeaderMap::new()),
            Err(AuthError::MissingBasic)
        );
        // Basic users alone (no basic_username) also turn Basic on.
        let only_list = auth(AuthSettings {
            basic_credentials: vec![BasicCredential {
                username: "u".into(),
                password: Secret::new("p"),
            }],
            ..Default::default()
        });
        assert_eq!(
            only_list.check_basic(&HeaderMap::new()),
            Err(AuthError::MissingBasic)
        );
        assert_eq!(
            only_list.check_api_key(None),
            Ok(None),
            "no key configured, none required"
        );
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

//! Who is calling: the client's credential and the key it maps to.
//!
//! In `passthrough` mode the client's own Anthropic key (`x-api-key`, or
//! `Authorization: Bearer`) goes upstream unchanged; tollgate only derives a
//! fingerprint from it (a prefix of its SHA-256) to attribute usage. The key
//! itself is never logged or stored.

use http::HeaderMap;
use sha2::{Digest, Sha256};

/// Hex characters of the SHA-256 kept as a key fingerprint (64 bits).
const FINGERPRINT_HEX_LEN: usize = 16;

/// The credential a client presented.
pub struct Credential<'a> {
    secret: &'a str,
}

impl<'a> Credential<'a> {
    /// Reads `x-api-key`, else `Authorization: Bearer …`. Empty values count as
    /// absent.
    pub fn from_headers(headers: &'a HeaderMap) -> Option<Credential<'a>> {
        if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            let key = key.trim();
            if !key.is_empty() {
                return Some(Credential { secret: key });
            }
        }
        let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = auth.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
            .then_some(Credential { secret: token })
    }

    /// The key's fingerprint: `pt_` and the first 16 hex digits of its SHA-256.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.secret)
    }
}

/// `pt_` + a hex prefix of SHA-256(secret): stable, not reversible, safe to log.
pub fn fingerprint(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(3 + FINGERPRINT_HEX_LEN);
    out.push_str("pt_");
    out.push_str(&hex::encode(&digest[..FINGERPRINT_HEX_LEN / 2]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_either_header() {
        let a = headers(&[("x-api-key", "sk-ant-1")]);
        let b = headers(&[("authorization", "Bearer sk-ant-1")]);
        let fa = Credential::from_headers(&a).unwrap().fingerprint();
        let fb = Credential::from_headers(&b).unwrap().fingerprint();
        assert_eq!(fa, fb);
        assert_eq!(fa.len(), 19);
        assert!(!fa.contains("sk-ant"));
    }

    #[test]
    fn absent_or_empty_is_none() {
        assert!(Credential::from_headers(&headers(&[])).is_none());
        assert!(Credential::from_headers(&headers(&[("x-api-key", " ")])).is_none());
        assert!(Credential::from_headers(&headers(&[("authorization", "Basic abc")])).is_none());
        assert!(Credential::from_headers(&headers(&[("authorization", "Bearer ")])).is_none());
    }

    #[test]
    fn different_keys_differ() {
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }
}

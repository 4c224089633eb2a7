//! The credential a client presented: `x-api-key`, or `Authorization: Bearer`.
//!
//! The secret is only handed to [`crate::keys::Keys::authenticate`], which
//! reduces it to a hash at once; it is never logged or stored.

use http::HeaderMap;

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

    /// The secret itself, for authentication only.
    pub fn secret(&self) -> &'a str {
        self.secret
    }
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
        assert_eq!(Credential::from_headers(&a).unwrap().secret(), "sk-ant-1");
        assert_eq!(Credential::from_headers(&b).unwrap().secret(), "sk-ant-1");
    }

    #[test]
    fn absent_or_empty_is_none() {
        assert!(Credential::from_headers(&headers(&[])).is_none());
        assert!(Credential::from_headers(&headers(&[("x-api-key", " ")])).is_none());
        assert!(Credential::from_headers(&headers(&[("authorization", "Basic abc")])).is_none());
        assert!(Credential::from_headers(&headers(&[("authorization", "Bearer ")])).is_none());
    }
}

//! Values that must never be printed: API keys, tokens, passwords.
//!
//! `Secret<T>` prints `*****` through `Debug`, `Display` and `Serialize`, so a
//! secret that ends up in a log line, an error message or `check-config`
//! output shows as masked. `MaskedUrl` does the same for the password part of
//! a connection URL while keeping the rest readable.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MASK: &str = "*****";

/// A secret value. Read it with [`Secret::expose`], only where it is sent.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself. Call sites are the places that send it somewhere.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(MASK)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

/// A connection URL (database, Redis) whose password is masked when printed.
#[derive(Clone, PartialEq, Eq)]
pub struct MaskedUrl(String);

impl MaskedUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        MaskedUrl(url.into())
    }

    /// The full URL, password included, for opening the connection.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `*****`.
    pub fn masked(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut url) if url.password().is_some() => {
                // Setting a password only fails for URLs that cannot carry one,
                // and this one already does.
                let _ = url.set_password(Some(MASK));
                url.to_string()
            }
            Ok(_) => self.0.clone(),
            // Not a URL we can take apart: show only the scheme, if any.
            Err(_) => match self.0.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://{MASK}"),
                None => MASK.to_owned(),
            },
        }
    }
}

impl fmt::Debug for MaskedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Display for MaskedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl Serialize for MaskedUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.masked())
    }
}

impl<'de> Deserialize<'de> for MaskedUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(MaskedUrl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("sk-ant-very-secret".to_owned());
        assert_eq!(format!("{s}"), MASK);
        assert_eq!(format!("{s:?}"), MASK);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"*****\"");
        assert_eq!(s.expose(), "sk-ant-very-secret");
    }

    #[test]
    fn url_password_is_masked() {
        let u = MaskedUrl::new("postgres://app:hunter2@db:5432/tollgate");
        assert_eq!(u.masked(), "postgres://app:*****@db:5432/tollgate");
        assert!(!format!("{u:?}").contains("hunter2"));
        let plain = MaskedUrl::new("sqlite://tollgate.db");
        assert_eq!(plain.masked(), "sqlite://tollgate.db");
        let odd = MaskedUrl::new("weird://user:pa ss@");
        assert!(!odd.masked().contains("pa ss"));
    }
}

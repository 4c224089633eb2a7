//! Key secrets: how a tollgate key is made, hashed and recognised.
//!
//! A key is `tg-` followed by 43 characters drawn uniformly from the 62 ASCII
//! letters and digits by the thread-local CSPRNG (ChaCha, seeded from the
//! operating system): 256 bits of randomness. Only the hex SHA-256 of the whole
//! string is stored, with a display prefix (`tg-` and the next 8 characters).
//! The prefix gives away 48 bits; the remaining 208 are what an attacker would
//! have to guess, so the plain hash needs no salt or stretching.

use std::fmt;

use rand::Rng as _;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// What every tollgate key starts with.
pub const KEY_PREFIX: &str = "tg-";
/// Random characters after [`KEY_PREFIX`]: 43 × log2(62) ≈ 256 bits.
const RANDOM_CHARS: usize = 43;
/// Random characters kept in the display prefix.
const DISPLAY_CHARS: usize = 8;
/// Random characters of a key id (`key_…`): ids are not secret, only unique.
const ID_CHARS: usize = 16;

/// A freshly generated key: the secret (shown once), its hash and its prefix.
pub struct NewSecret {
    secret: String,
    /// Hex SHA-256 of the secret: what the store keeps.
    pub hash: String,
    /// `tg-` and the first 8 random characters, to recognise the key in listings.
    pub prefix: String,
}

impl NewSecret {
    /// Draws a new key.
    pub fn generate() -> NewSecret {
        let random: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(RANDOM_CHARS)
            .map(char::from)
            .collect();
        let secret = format!("{KEY_PREFIX}{random}");
        NewSecret {
            hash: hash_secret(&secret),
            prefix: display_prefix(&secret),
            secret,
        }
    }

    /// The secret itself, to print once to whoever created the key.
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// Gives up the secret, for the one response that carries it.
    pub fn into_exposed(self) -> String {
        self.secret
    }
}

impl fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewSecret")
            .field("secret", &"*****")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The hex SHA-256 of a client's secret: how keys are stored and looked up.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The passthrough fingerprint of a client's own key: `pt_` and the first 16
/// hex digits of its SHA-256. Stable, not reversible, safe to log.
pub fn fingerprint(secret: &str) -> String {
    fingerprint_of_hash(&hash_secret(secret))
}

/// [`fingerprint`] from a secret's hash, without hashing it again.
pub fn fingerprint_of_hash(secret_hash: &str) -> String {
    format!("pt_{}", secret_hash.get(..16).unwrap_or(secret_hash))
}

/// The display prefix of a tollgate key.
fn display_prefix(secret: &str) -> String {
    secret
        .get(..KEY_PREFIX.len() + DISPLAY_CHARS)
        .unwrap_or(KEY_PREFIX)
        .to_owned()
}

/// Whether a presented credential has the shape of a tollgate key. Anything
/// else is refused in virtual mode without a lookup.
pub fn looks_like_key(secret: &str) -> bool {
    secret.strip_prefix(KEY_PREFIX).is_some_and(|rest| {
        rest.len() == RANDOM_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// A new key id: `key_` and 16 random letters and digits.
pub fn new_key_id() -> String {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(ID_CHARS)
        .map(char::from)
        .collect();
    format!("key_{random}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let a = NewSecret::generate();
        let b = NewSecret::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(looks_like_key(a.expose()), "{}", a.expose());
        assert_eq!(a.expose().len(), 3 + 43);
        assert_eq!(a.hash, hash_secret(a.expose()));
        assert_eq!(a.hash.len(), 64);
        assert_eq!(a.prefix.len(), 11);
        assert!(a.expose().starts_with(&a.prefix));
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn only_tollgate_shaped_keys_are_recognised() {
        assert!(!looks_like_key("sk-ant-api03-abc"));
        assert!(!looks_like_key("tg-short"));
        assert!(!looks_like_key(&format!("tg-{}!", "a".repeat(42))));
        assert!(looks_like_key(&format!("tg-{}", "a".repeat(43))));
    }

    #[test]
    fn fingerprint_is_a_sha256_prefix() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223…
        assert_eq!(fingerprint("abc"), "pt_ba7816bf8f01cfea");
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }

    #[test]
    fn ids_are_distinct() {
        let a = new_key_id();
        assert!(a.starts_with("key_") && a.len() == 20, "{a}");
        assert_ne!(a, new_key_id());
    }
}

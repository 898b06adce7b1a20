//! Who may claim a client id: the credential in `HELLO`, checked before a session is admitted.
//!
//! # Layout
//! [`Authenticator`] is the pluggable check: given the claimed id and the credential bytes, it answers with a
//! [`Grant`] (what the session may subscribe to) or an [`AuthError`]. [`HmacTokens`] is the built-in scheme:
//! a token is `v1.<id>.<expiry>.<subscriptions>.<mac>`. The id is base64url (no padding); expiry is Unix
//! seconds; subscriptions is `~` for no limit, or the allowed ids each in base64url, comma-separated (empty: no
//! subscription allowed); mac is HMAC-SHA256 under the server secret over the token's own text up to the MAC,
//! also base64url. Every field is encoded before the fields are joined, so no choice of id or subscriptions can
//! make one token's signed text read as another split of fields, and any id survives the trip unchanged. The
//! MAC is compared in constant time. Because every admitted session proved its id, a takeover is only possible
//! for a holder of a valid token for that id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What an authenticated session may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Ids the session may subscribe to (`*` allows everyone); `None` puts no limit.
    pub subscriptions: Option<Vec<String>>,
}

impl Grant {
    /// Whether subscribing to `id` is within the grant.
    pub fn allows(&self, id: &str) -> bool {
        self.subscriptions.as_ref().is_none_or(|list| list.iter().any(|a| a == "*" || a == id))
    }
}

/// Why a credential was refused (the client only ever sees `auth_failed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("no credential")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is for another client id")]
    WrongId,
}

/// A credential check, pluggable for other schemes.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, client_id: &str, credential: &[u8], now: SystemTime) -> Result<Grant, AuthError>;
}

/// The built-in HMAC-SHA256 tokens.
pub struct HmacTokens {
    secret: Vec<u8>,
}

impl std::fmt::Debug for HmacTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacTokens { secret: <redacted> }")
    }
}

type HmacSha256 = Hmac<Sha256>;

/// The subscriptions field of a token that puts no limit on them (not a base64url character).
const UNLIMITED: &str = "~";

impl HmacTokens {
    /// A secret shorter than 16 bytes is refused: it would be guessable.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<HmacTokens, &'static str> {
        let secret = secret.into();
        if secret.len() < 16 {
            return Err("the auth secret must be at least 16 bytes");
        }
        Ok(HmacTokens { secret })
    }

    /// The MAC over a token's signed text, `v1.<id>.<expiry>.<subscriptions>`.
    fn mac(&self, body: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(body.as_bytes());
        mac
    }

    /// A token for `id`, valid until `now + ttl`, allowing `subscriptions` (`None`: no limit).
    pub fn mint(&self, id: &str, now: SystemTime, ttl: Duration, subscriptions: Option<&[String]>) -> String {
        let expiry = (now + ttl).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let subs = match subscriptions {
            None => UNLIMITED.to_owned(),
            Some(list) => list.iter().map(|s| B64.encode(s)).collect::<Vec<_>>().join(","),
        };
        let body = format!("v1.{}.{expiry}.{subs}", B64.encode(id));
        let mac = self.mac(&body).finalize().into_bytes();
        format!("{body}.{}", B64.encode(mac))
    }
}

impl Authenticator for HmacTokens {
    fn authenticate(&self, client_id: &str, credential: &[u8], now: SystemTime) -> Result<Grant, AuthError> {
        if credential.is_empty() {
            return Err(AuthError::Missing);
        }
        let token = std::str::from_utf8(credential).map_err(|_| AuthError::Malformed)?;
        let token = token.trim();
        let (body, mac) = token.rsplit_once('.').ok_or(AuthError::Malformed)?;
        let parts: Vec<&str> = body.split('.').collect();
        let ["v1", id, expiry, subs] = parts[..] else { return Err(AuthError::Malformed) };
        let decode = |s: &str| B64.decode(s).map_err(|_| AuthError::Malformed);
        // The signature first: nothing the token says is interpreted before it is known to be ours.
        self.mac(body).verify_slice(&decode(mac)?).map_err(|_| AuthError::BadSignature)?;
        let text = |s: &str| String::from_utf8(decode(s)?).map_err(|_| AuthError::Malformed);
        let id = text(id)?;
        let subscriptions = match subs {
            UNLIMITED => None,
            "" => Some(Vec::new()),
            list => Some(list.split(',').map(text).collect::<Result<Vec<_>, _>>()?),
        };
        let expiry: u64 = expiry.parse().map_err(|_| AuthError::Malformed)?;
        let now_s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now_s >= expiry {
            return Err(AuthError::Expired);
        }
        if id != client_id {
            return Err(AuthError::WrongId);
        }
        Ok(Grant { subscriptions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> HmacTokens {
        HmacTokens::new(b"0123456789abcdef0123".to_vec()).unwrap()
    }

    #[test]
    fn a_minted_token_authenticates_its_id_until_it_expires() {
        let t = tokens();
        let now = SystemTime::now();
        let tok = t.mint("dev-1", now, Duration::from_secs(60), None);
        assert_eq!(t.authenticate("dev-1", tok.as_bytes(), now), Ok(Grant { subscriptions: None }));
        assert_eq!(t.authenticate("dev-2", tok.as_bytes(), now), Err(AuthError::WrongId));
        let later = now + Duration::from_secs(61);
        assert_eq!(t.authenticate("dev-1", tok.as_bytes(), later), Err(AuthError::Expired));
    }

    #[test]
    fn forgeries_are_refused() {
        let t = tokens();
        let now = SystemTime::now();
        let tok = t.mint("dev-1", now, Duration::from_secs(60), None);
        // Another secret's token.
        let other =
            HmacTokens::new(b"another secret, 16+".to_vec()).unwrap().mint("dev-1", now, Duration::from_secs(60), None);
        assert_eq!(t.authenticate("dev-1", other.as_bytes(), now), Err(AuthError::BadSignature));
        // The id swapped in a valid token (signature no longer matches).
        let parts: Vec<&str> = tok.split('.').collect();
        let swapped = format!("v1.{}.{}.{}.{}", B64.encode("dev-2"), parts[2], parts[3], parts[4]);
        assert_eq!(t.authenticate("dev-2", swapped.as_bytes(), now), Err(AuthError::BadSignature));
        // A longer expiry swapped in.
        let extended = format!("v1.{}.{}.{}.{}", parts[1], u64::MAX, parts[3], parts[4]);
        assert_eq!(t.authenticate("dev-1", extended.as_bytes(), now), Err(AuthError::BadSignature));
        assert_eq!(t.authenticate("dev-1", b"", now), Err(AuthError::Missing));
        assert_eq!(t.authenticate("dev-1", b"garbage", now), Err(AuthError::Malformed));
        assert_eq!(t.authenticate("dev-1", &[0xff, 0xfe], now), Err(AuthError::Malformed));
        assert!(HmacTokens::new(b"short".to_vec()).is_err());
    }

    #[test]
    fn fields_cannot_be_re_split_under_one_signature() {
        // With fields joined raw under the MAC, (id "a", expiry E, subscriptions "F|x") and (id "a|E", expiry F,
        // subscriptions "x") would sign the same text. The signed text is the encoded fields, so they do not.
        let t = tokens();
        let now = SystemTime::now();
        let far = (now + Duration::from_secs(7200)).duration_since(UNIX_EPOCH).unwrap().as_secs();
        let subs = [format!("{far}|x")];
        let tok = t.mint("a", now, Duration::from_secs(3600), Some(&subs));
        let parts: Vec<&str> = tok.split('.').collect();
        let resplit = format!("v1.{}.{far}.{}.{}", B64.encode(format!("a|{}", parts[2])), B64.encode("x"), parts[4]);
        assert_eq!(t.authenticate(&format!("a|{}", parts[2]), resplit.as_bytes(), now), Err(AuthError::BadSignature));
        assert!(t.authenticate("a", tok.as_bytes(), now).is_ok());
    }

    #[test]
    fn an_empty_grant_allows_nothing_and_any_id_survives_the_trip() {
        let t = tokens();
        let now = SystemTime::now();
        // An empty list is a limit (nothing), not the absence of one.
        let tok = t.mint("w", now, Duration::from_secs(60), Some(&[]));
        let g = t.authenticate("w", tok.as_bytes(), now).unwrap();
        assert_eq!(g.subscriptions, Some(vec![]));
        assert!(!g.allows("anyone"));
        // Ids with the token's own separators are carried exactly.
        let odd = vec!["a,b".to_string(), "c.d".to_string(), "~".to_string()];
        let tok = t.mint("x.y,z", now, Duration::from_secs(60), Some(&odd));
        let g = t.authenticate("x.y,z", tok.as_bytes(), now).unwrap();
        assert_eq!(g.subscriptions, Some(odd));
        assert!(g.allows("a,b") && !g.allows("a") && !g.allows("b"));
    }

    #[test]
    fn subscriptions_are_limited_to_the_grant() {
        let t = tokens();
        let now = SystemTime::now();
        let subs = vec!["a".to_string(), "b".to_string()];
        let tok = t.mint("w", now, Duration::from_secs(60), Some(&subs));
        let g = t.authenticate("w", tok.as_bytes(), now).unwrap();
        assert!(g.allows("a") && g.allows("b") && !g.allows("c") && !g.allows("*"));
        let all = t.mint("w", now, Duration::from_secs(60), Some(&["*".to_string()]));
        assert!(t.authenticate("w", all.as_bytes(), now).unwrap().allows("anyone"));
        assert!(format!("{t:?}").contains("redacted"));
    }
}

//! The built-in token check, the first thing tether parses from an unauthenticated peer.
//!
//! Properties:
//! - arbitrary credential bytes never panic and are never accepted (the fuzzer does not know the secret, and
//!   the MAC is compared in constant time, so comparison tracing cannot leak it);
//! - a freshly minted token verifies for its id with exactly the subscriptions it was minted with, is refused for
//!   any other id with `WrongId`, and is `Expired` at its expiry;
//! - any one-byte change to a minted token is refused.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tether::{AuthError, Authenticator, HmacTokens};

#[derive(Debug, Arbitrary)]
struct Input {
    credential: Vec<u8>,
    claimed: String,
    id: String,
    subscriptions: Option<Vec<String>>,
    ttl_s: u16,
    now_s: u32,
    flip_at: u16,
    flip_to: u8,
}

fuzz_target!(|input: Input| {
    let tokens = HmacTokens::new(b"a fuzzing secret of 16 bytes or more".to_vec()).unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(input.now_s));
    assert!(
        tokens.authenticate(&input.claimed, &input.credential, now).is_err(),
        "accepted bytes the fuzzer made up: {:?}",
        String::from_utf8_lossy(&input.credential)
    );

    if input.ttl_s == 0 || input.id.is_empty() {
        return;
    }
    let ttl = Duration::from_secs(u64::from(input.ttl_s));
    let token = tokens.mint(&input.id, now, ttl, input.subscriptions.as_deref());
    let grant = tokens.authenticate(&input.id, token.as_bytes(), now).expect("a fresh token verifies");
    // Client ids are never empty, so a list holding only "" grants the same as an empty list.
    let expected = input.subscriptions.map(|l| if l.len() == 1 && l[0].is_empty() { vec![] } else { l });
    assert_eq!(grant.subscriptions, expected);
    if input.claimed != input.id {
        assert_eq!(tokens.authenticate(&input.claimed, token.as_bytes(), now), Err(AuthError::WrongId));
    }
    assert_eq!(tokens.authenticate(&input.id, token.as_bytes(), now + ttl), Err(AuthError::Expired));
    let mut changed = token.into_bytes();
    let at = usize::from(input.flip_at) % changed.len();
    if changed[at] != input.flip_to {
        changed[at] = input.flip_to;
        let r = tokens.authenticate(&input.id, &changed, now);
        assert!(r.is_err(), "a token changed at byte {at} still verifies: {r:?}");
    }
});

//! The frame decoder on arbitrary bytes: `check` then `parse`, frame after frame, as a connection does, in
//! protocol version 1 or 2.
//!
//! Properties: no panic; `check` never asks for more than `max_frame` + header bytes (a length is refused from
//! the header alone); every frame that parses encodes back to the same bytes, and re-parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::frame::{self, Frame};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the frame limit (the default or the smallest allowed) and the session version.
    let Some((&pick, mut buf)) = data.split_first() else { return };
    let max = if pick & 1 == 0 { frame::DEFAULT_MAX_FRAME } else { frame::MIN_MAX_FRAME };
    let version = if pick & 2 == 0 { frame::V1 } else { frame::V2 };
    while let Ok(Some(n)) = frame::check(buf, max) {
        assert!(n <= frame::HEADER_LEN + max as usize, "check accepted {n} bytes with limit {max}");
        let raw = &buf[..n];
        if let Ok(f) = Frame::parse_v(raw, version) {
            let encoded = f.to_bytes_v(version);
            assert_eq!(&encoded[..], raw, "{f:?} does not re-encode to its bytes (v{version})");
            assert_eq!(f.encoded_len_v(version), n);
            assert_eq!(Frame::parse_v(&encoded, version).as_ref(), Ok(&f));
        }
        buf = &buf[n..];
    }
});

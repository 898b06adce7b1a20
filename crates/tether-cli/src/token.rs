//! `tether token`: mint a client token, and the secret loading shared with `serve`.
//!
//! # Layout
//! [`secret`] reads the server secret from a file (or the `TETHER_AUTH_SECRET` environment variable), never from a
//! flag value, which would show in `ps`. [`run`] prints one token for `--id`, valid for `--ttl`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tether::HmacTokens;

use crate::duration;

/// The environment variable that may hold the secret when no file is given.
pub const SECRET_ENV: &str = "TETHER_AUTH_SECRET";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// File holding the server secret (at least 16 bytes; a trailing newline is ignored).
    /// Without it, the TETHER_AUTH_SECRET environment variable is used.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// The client id the token is for.
    #[arg(long)]
    id: String,
    /// How long the token is valid.
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    ttl: Duration,
    /// Limit presence subscriptions to these ids (`*` for everyone, '' for none) [default: no limit].
    #[arg(long, value_delimiter = ',', value_name = "ID,ID|*")]
    subscribe: Vec<String>,
}

/// The secret from `file`, or else from the environment; `None` when neither is set.
pub fn secret(file: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    let raw = match file {
        Some(path) => std::fs::read(path).with_context(|| format!("reading the secret file {}", path.display()))?,
        None => match std::env::var_os(SECRET_ENV) {
            Some(v) => v.into_encoded_bytes(),
            None => return Ok(None),
        },
    };
    let end = raw.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    Ok(Some(raw[..end].to_vec()))
}

/// The built-in authenticator over a secret.
pub fn tokens(secret: Vec<u8>) -> anyhow::Result<HmacTokens> {
    HmacTokens::new(secret).map_err(anyhow::Error::msg)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Some(secret) = secret(args.secret_file.as_deref())? else {
        bail!("no secret: give --secret-file FILE or set {SECRET_ENV}");
    };
    if args.id.is_empty() || args.id.len() > tether::proto::frame::MAX_ID_LEN {
        bail!("--id must be 1 to {} bytes", tether::proto::frame::MAX_ID_LEN);
    }
    // Given at all, even as '', the flag is a limit: empty entries are dropped, so '' allows nothing.
    let subs: Option<Vec<String>> =
        (!args.subscribe.is_empty()).then(|| args.subscribe.iter().filter(|s| !s.is_empty()).cloned().collect());
    println!("{}", tokens(secret)?.mint(&args.id, SystemTime::now(), args.ttl, subs.as_deref()));
    Ok(ExitCode::SUCCESS)
}

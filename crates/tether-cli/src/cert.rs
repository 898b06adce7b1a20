//! `tether cert`: a throwaway PKI for TLS tests and local demos.
//!
//! Writes `ca.pem`, `server.pem`, `server.key`, `client.pem` and `client.key` into a directory: a fresh CA, a
//! server certificate for the `--name`s, and a client certificate, both signed by the CA. Keys are written with
//! mode 0600. For production, use certificates from your own CA.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use tether::DevPki;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write the files into (created if missing; existing files are not overwritten).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// DNS names or IP addresses the server certificate is valid for.
    #[arg(long = "name", value_name = "NAME", default_values = ["localhost", "127.0.0.1", "::1"])]
    names: Vec<String>,
    /// The client certificate's name.
    #[arg(long, value_name = "NAME", default_value = "tether-client")]
    client_name: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let names: Vec<&str> = args.names.iter().map(String::as_str).collect();
    let pki = DevPki::generate(&names, &args.client_name)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let files = [
        ("ca.pem", &pki.ca_cert, 0o644),
        ("server.pem", &pki.server_cert, 0o644),
        ("server.key", &pki.server_key, 0o600),
        ("client.pem", &pki.client_cert, 0o644),
        ("client.key", &pki.client_key, 0o600),
    ];
    for (name, _, _) in &files {
        let path = args.out.join(name);
        if path.exists() {
            bail!("{} exists; not overwriting", path.display());
        }
    }
    for (name, text, mode) in files {
        let path = args.out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

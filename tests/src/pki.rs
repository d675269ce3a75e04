//! Test certificates and PSK keys made at test time with GnuTLS's
//! `certtool` and `psktool` (package gnutls-bin), laid out as the servers
//! and libnbd expect (shared/servers.md §6).
//!
//! [`Pki::new`] makes, in a fresh temporary directory:
//! * `server/`: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` for
//!   `localhost`, `127.0.0.1` and `::1` (nbdkit `--tls-certificates`,
//!   qemu `tls-creds-x509 dir=`), plus `keys.psk` (user `alice`);
//! * `client/`: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`;
//! * `caonly/`: `ca-cert.pem` only;
//! * `other/`: the server layout signed by a second, unrelated CA;
//! * `othername/`: the server layout, signed by the first CA, for
//!   `other.example` only;
//! * `wrongca/`: a client directory holding the second CA only.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A test PKI in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct Pki {
    dir: TempDir,
}

fn certtool(dir: &Path, args: &[&str]) {
    let out = Command::new("certtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run certtool (package gnutls-bin)");
    assert!(
        out.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key(dir: &Path, name: &str) {
    let out = Command::new("certtool")
        .args(["--generate-privkey", "--sec-param=medium", "--no-text"])
        .output()
        .expect("run certtool (package gnutls-bin)");
    assert!(out.status.success(), "certtool key");
    fs::write(dir.join(name), out.stdout).unwrap();
}

fn ca(dir: &Path, cn: &str) {
    key(dir, "ca-key.pem");
    fs::write(
        dir.join("ca.info"),
        format!("cn = {cn}\nca\ncert_signing_key\nexpiration_days = 3650\n"),
    )
    .unwrap();
    certtool(
        dir,
        &[
            "--generate-self-signed",
            "--load-privkey",
            "ca-key.pem",
            "--template",
            "ca.info",
            "--outfile",
            "ca-cert.pem",
        ],
    );
}

fn signed(dir: &Path, ca_dir: &Path, base: &str, template: &str) {
    key(dir, &format!("{base}-key.pem"));
    let info = format!("{base}.info");
    fs::write(dir.join(&info), template).unwrap();
    let ca_cert = ca_dir.join("ca-cert.pem");
    let ca_key = ca_dir.join("ca-key.pem");
    certtool(
        dir,
        &[
            "--generate-certificate",
            "--load-ca-certificate",
            ca_cert.to_str().unwrap(),
            "--load-ca-privkey",
            ca_key.to_str().unwrap(),
            "--load-privkey",
            &format!("{base}-key.pem"),
            "--template",
            &info,
            "--outfile",
            &format!("{base}-cert.pem"),
        ],
    );
}

const SERVER_LOCALHOST: &str = "organization = NBD Test\ncn = localhost\ndns_name = localhost\n\
    ip_address = 127.0.0.1\nip_address = ::1\ntls_www_server\nencryption_key\nsigning_key\n\
    expiration_days = 3650\n";
const SERVER_OTHER: &str = "organization = NBD Test\ncn = other.example\n\
    dns_name = other.example\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3650\n";
const CLIENT: &str = "organization = NBD Test\ncn = nbd-test-client\ntls_www_client\n\
    encryption_key\nsigning_key\nexpiration_days = 3650\n";

fn copy(from: &Path, to: &Path, names: &[&str]) {
    fs::create_dir_all(to).unwrap();
    for n in names {
        fs::copy(from.join(n), to.join(n)).unwrap();
    }
}

impl Pki {
    /// Makes the whole PKI (RSA 2048 keys: well under a second).
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("nbd-rs-pki-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        let ca1 = root.join("ca1");
        let ca2 = root.join("ca2");
        fs::create_dir_all(&ca1).unwrap();
        fs::create_dir_all(&ca2).unwrap();
        ca(&ca1, "NBD Test CA");
        ca(&ca2, "Some Other CA");
        signed(&ca1, &ca1, "server", SERVER_LOCALHOST);
        signed(&ca1, &ca1, "client", CLIENT);
        signed(&ca1, &ca1, "othername", SERVER_OTHER);
        signed(&ca2, &ca2, "server", SERVER_LOCALHOST);
        signed(&ca2, &ca2, "client", CLIENT);

        let server = root.join("server");
        copy(
            &ca1,
            &server,
            &["ca-cert.pem", "server-cert.pem", "server-key.pem"],
        );
        let out = Command::new("psktool")
            .args(["-u", "alice", "-p"])
            .arg(server.join("keys.psk"))
            .output()
            .expect("run psktool (package gnutls-bin)");
        assert!(out.status.success(), "psktool");
        copy(
            &ca1,
            &root.join("client"),
            &["ca-cert.pem", "client-cert.pem", "client-key.pem"],
        );
        copy(&ca1, &root.join("caonly"), &["ca-cert.pem"]);
        copy(
            &ca2,
            &root.join("other"),
            &["ca-cert.pem", "server-cert.pem", "server-key.pem"],
        );
        copy(
            &ca2,
            &root.join("wrongca"),
            &["ca-cert.pem", "client-cert.pem", "client-key.pem"],
        );
        let on = root.join("othername");
        fs::create_dir_all(&on).unwrap();
        fs::copy(ca1.join("ca-cert.pem"), on.join("ca-cert.pem")).unwrap();
        fs::copy(ca1.join("othername-cert.pem"), on.join("server-cert.pem")).unwrap();
        fs::copy(ca1.join("othername-key.pem"), on.join("server-key.pem")).unwrap();
        Pki { dir }
    }

    /// One of the directories listed in the module documentation.
    pub fn path(&self, which: &str) -> PathBuf {
        self.dir.path().join(which)
    }

    /// The server directory (`server/`).
    pub fn server(&self) -> PathBuf {
        self.path("server")
    }

    /// The PSK key file (`server/keys.psk`, user `alice`).
    pub fn psk_file(&self) -> PathBuf {
        self.server().join("keys.psk")
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

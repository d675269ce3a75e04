//! What the subcommands share: the error type, the `NBD` argument (a URI
//! or `[ CMD ARGS ... ]`), connecting, sizes and string formatting.

use std::fmt::Display;
use std::time::Duration;

use nbd_std::{Client, Config};

/// A failure, printed as one line on standard error (exit status 1).
#[derive(Debug)]
pub struct Fail(pub String);

/// Result of a subcommand: the exit status on success.
pub type Res<T = u8> = Result<T, Fail>;

/// Turns any error into a [`Fail`] with a context prefix.
pub trait Context<T> {
    /// Prefixes the error's message with `what: `.
    fn ctx(self, what: impl Display) -> Res<T>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn ctx(self, what: impl Display) -> Res<T> {
        self.map_err(|e| Fail(format!("{what}: {}", one_line(&e.to_string()))))
    }
}

/// Builds a [`Fail`].
pub fn fail<T>(msg: impl Into<String>) -> Res<T> {
    Err(Fail(msg.into()))
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// Where an NBD server is: a URI, or a command to run with systemd
/// socket activation (`[ CMD ARGS ... ]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// An NBD URI.
    Uri(String),
    /// A server to start as a subprocess (argv).
    Command(Vec<String>),
}

impl Server {
    /// A short name for messages.
    pub fn describe(&self) -> String {
        match self {
            Server::Uri(u) => u.clone(),
            Server::Command(argv) => format!("[ {} ]", argv.join(" ")),
        }
    }
}

/// Splits positional arguments into items: a plain word, or a bracketed
/// command `[ CMD ARGS ... ]` (as separate arguments).
pub fn split_items(args: &[String]) -> Res<Vec<Item>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "[" {
            let Some(end) = args[i + 1..].iter().position(|a| a == "]") else {
                return fail("missing ']' after '[ CMD ARGS ...'");
            };
            let argv: Vec<String> = args[i + 1..i + 1 + end].to_vec();
            if argv.is_empty() {
                return fail("empty command in '[ ]'");
            }
            out.push(Item::Command(argv));
            i += end + 2;
        } else {
            out.push(Item::Word(args[i].clone()));
            i += 1;
        }
    }
    Ok(out)
}

/// One positional item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A plain argument.
    Word(String),
    /// `[ CMD ARGS ... ]`.
    Command(Vec<String>),
}

/// The single `NBD` argument of info, dump, discard and zero.
pub fn one_server(args: &[String]) -> Res<Server> {
    let items = split_items(args)?;
    match <[Item; 1]>::try_from(items) {
        Ok([Item::Word(u)]) => Ok(Server::Uri(u)),
        Ok([Item::Command(c)]) => Ok(Server::Command(c)),
        Err(v) if v.is_empty() => fail("missing NBD URI or [ CMD ARGS ... ] (see --help)"),
        Err(_) => fail("expected exactly one NBD URI or [ CMD ARGS ... ] (see --help)"),
    }
}

/// Applies `--timeout SECONDS` to a configuration: the handshake and every
/// command must finish within it.
pub fn apply_timeout(cfg: &mut Config, timeout: Option<f64>) -> Res<()> {
    if let Some(t) = timeout {
        if !(t.is_finite() && t > 0.0) {
            return fail(format!("--timeout: invalid number of seconds: {t}"));
        }
        let d = Duration::from_secs_f64(t);
        cfg.handshake_timeout = Some(d);
        cfg.command_timeout = Some(d);
    }
    Ok(())
}

/// Connects a blocking client.
pub fn connect(server: &Server, cfg: Config) -> Res<Client> {
    match server {
        Server::Uri(u) => {
            if !nbd_std::nbd_core::uri::is_nbd_uri(u) {
                return fail(format!(
                    "{u}: not an NBD URI (nbd://, nbd+unix://, nbds://, ...)"
                ));
            }
            Client::connect_uri(u, cfg).ctx(u)
        }
        Server::Command(argv) => connect_command(argv, cfg),
    }
}

/// Starts `argv` with systemd socket activation and connects to it; the
/// server is stopped when the client is dropped.
fn connect_command(argv: &[String], cfg: Config) -> Res<Client> {
    Client::connect_systemd_socket_activation(argv, cfg).ctx(format!("[ {} ]", argv.join(" ")))
}

/// The URI libnbd's `nbd_get_uri` would give for `server` and `export`,
/// if there is a meaningful one (not for a subprocess).
pub fn uri_for(server: &Server, export: &str) -> Option<String> {
    let Server::Uri(u) = server else { return None };
    let mut p = nbd_std::nbd_core::NbdUri::parse(u).ok()?;
    p.export_name = export.to_owned();
    Some(p.to_string())
}

/// libnbd's human-readable size: the largest power-of-1024 unit that
/// divides the size exactly, and whether a unit was used.
pub fn human_size(mut n: u64) -> (String, bool) {
    const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let mut i = 0;
    while n != 0 && n % 1024 == 0 && i + 1 < UNITS.len() {
        n /= 1024;
        i += 1;
    }
    (format!("{n}{}", UNITS[i]), i > 0)
}

/// Parses a size: a number (decimal, or `0x` hexadecimal) with an optional
/// unit suffix (`k`/`K`, `M`, `G`, `T`, `P`, `E`, powers of 1024; an
/// optional trailing `B`/`iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() && !t.starts_with("0x") => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return Err(format!("invalid size: {s}")),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    let v = if let Some(h) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        num.parse::<u64>()
    }
    .map_err(|_| format!("invalid size: {s}"))?;
    v.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size too large: {s}"))
}

/// A JSON string literal, escaped as libnbd's tools escape it.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("256k"), Ok(256 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("x").is_err());
        assert_eq!(human_size(1 << 20), ("1M".into(), true));
        assert_eq!(human_size(1000000), ("1000000".into(), false));
        assert_eq!(human_size(2125119488), ("2075312K".into(), true));
        assert_eq!(human_size(0), ("0".into(), false));
    }

    #[test]
    fn brackets() {
        let a: Vec<String> = ["[", "nbdkit", "memory", "1M", "]", "-"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            split_items(&a).unwrap(),
            vec![
                Item::Command(vec!["nbdkit".into(), "memory".into(), "1M".into()]),
                Item::Word("-".into())
            ]
        );
        assert!(split_items(&["[".to_string()]).is_err());
    }
}

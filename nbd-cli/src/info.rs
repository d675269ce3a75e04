//! `nbd info`: nbdinfo's report, JSON, size, flags (by exit status), map,
//! map totals, export list and URI.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;

use nbd_std::{Client, CmdFlags, Config, Phase};

use crate::common::{
    apply_timeout, connect, fail, human_size, json_string, one_server, uri_for, Context, Fail, Res,
    Server,
};

/// Arguments of `nbd info` (those of nbdinfo).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "NBD is an NBD URI (nbd://, nbd+unix://, nbds://, ...) or a server \
to run with systemd socket activation: nbd info -- [ nbdkit memory 1M ]\n\n\
--can/--is/--has print nothing: exit status 0 means true, 2 false, anything else an error."
)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Print only the size of the export in bytes.
    #[arg(long)]
    size: bool,
    /// Print only the URI of the export.
    #[arg(long)]
    uri: bool,
    /// List every export of the server.
    #[arg(short = 'L', long)]
    list: bool,
    /// Print the map of a metadata context (default base:allocation).
    #[arg(long, value_name = "CONTEXT", num_args = 0..=1, require_equals = true,
          default_missing_value = "base:allocation")]
    map: Option<String>,
    /// With --map: print totals per extent type.
    #[arg(long, alias = "summary")]
    totals: bool,
    /// Exit 0 if the export can FLAG (cache, connect, df, fast-zero, flush, fua,
    /// multi-conn, read, trim, write, zero, block-status-payload, structured-reply,
    /// extended-headers), 2 if not.
    #[arg(long, value_name = "FLAG")]
    can: Option<String>,
    /// Exit 0 if the export is FLAG (read-only, rotational, tls), 2 if not.
    #[arg(long, value_name = "FLAG")]
    is: Option<String>,
    /// Exit 0 if the server has the metadata CONTEXT (or FLAG), 2 if not.
    #[arg(long, value_name = "CONTEXT")]
    has: Option<String>,
    /// The negation of --can.
    #[arg(long, value_name = "FLAG")]
    cannot: Option<String>,
    /// The negation of --is.
    #[arg(long, value_name = "FLAG")]
    isnt: Option<String>,
    /// The negation of --has.
    #[arg(long, value_name = "CONTEXT")]
    hasnt: Option<String>,
    /// Probe the content with file(1) (default, except with --list).
    #[arg(long, overrides_with = "no_content")]
    content: bool,
    /// Do not probe the content.
    #[arg(long)]
    no_content: bool,
    /// Accepted for compatibility (output is never coloured).
    #[arg(
        long,
        alias = "colour",
        alias = "no-color",
        alias = "no-colour",
        hide = true
    )]
    color: bool,
    /// Give up if connecting or any request takes longer than SECONDS.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// NBD URI, or [ CMD ARGS ... ] after --.
    #[arg(value_name = "NBD", num_args = 0..)]
    server: Vec<String>,
}

/// Runs `nbd info`.
pub fn run(a: Args) -> Res {
    let server = one_server(&a.server)?;
    let mut cfg = Config::default();
    apply_timeout(&mut cfg, a.timeout)?;

    let flag_opts = [
        (&a.can, false),
        (&a.is, false),
        (&a.has, false),
        (&a.cannot, true),
        (&a.isnt, true),
        (&a.hasnt, true),
    ];
    let flags: Vec<(&String, bool)> = flag_opts
        .iter()
        .filter_map(|(o, neg)| o.as_ref().map(|f| (f, *neg)))
        .collect();
    let modes =
        a.list as u8 + a.map.is_some() as u8 + a.size as u8 + a.uri as u8 + !flags.is_empty() as u8;
    if modes > 1 || flags.len() > 1 {
        return fail("you cannot use --list, --map, --size, --uri and --can/--is/--has together");
    }
    if a.content && a.no_content {
        return fail("you cannot use --content and --no-content together");
    }
    if a.totals && a.map.is_none() {
        return fail("--totals requires --map");
    }

    if let Some((flag, negate)) = flags.first() {
        return flag_test(&server, cfg, flag, *negate);
    }
    if a.size {
        let c = connect(&server, cfg)?;
        let size = c.get_size().ctx("get_size")?;
        return emit(format!("{size}\n"));
    }
    if a.uri {
        let uri = match &server {
            Server::Uri(_) => {
                let c = connect(&server, cfg)?;
                uri_for(&server, c.export_name())
            }
            Server::Command(_) => None,
        };
        let Some(uri) = uri else {
            return fail("no URI for a server run as a subprocess");
        };
        let text = if a.json {
            format!("{}\n", json_string(&uri))
        } else {
            format!("{uri}\n")
        };
        return emit(text);
    }
    if let Some(ctx) = &a.map {
        return map(&server, cfg, ctx, a.totals, a.json);
    }

    let probe = if a.content {
        true
    } else if a.no_content {
        false
    } else {
        !a.list
    };
    cfg.opt_mode = true;
    cfg.full_info = true;
    report(&server, cfg, a.list, probe, a.json)
}

/// Writes the whole output at once (nothing on standard output on error).
fn emit(text: String) -> Res {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .ctx("write to stdout")?;
    Ok(0)
}

// ----- --can / --is / --has -----

/// The value of a libnbd flag name on a connected client; `None` if the
/// name is not a flag.
fn flag_value(c: &Client, name: &str) -> Option<bool> {
    let n = name.replace('_', "-").to_ascii_lowercase();
    let i = c.export_info().ok()?;
    Some(match n.as_str() {
        "connect" | "read" => true,
        "cache" => i.can_cache(),
        "df" => i.can_df(),
        "fast-zero" => i.can_fast_zero(),
        "flush" => i.can_flush(),
        "fua" => i.can_fua(),
        "multi-conn" => i.can_multi_conn(),
        "trim" => i.can_trim(),
        "write" => !i.is_read_only(),
        "zero" => i.can_zero(),
        "block-status-payload" => i.can_block_status_payload(),
        "structured-reply" | "structured-replies" => c.get_structured_replies_negotiated(),
        "extended-headers" => c.get_extended_headers_negotiated(),
        "read-only" | "readonly" => i.is_read_only(),
        "rotational" => i.is_rotational(),
        "tls" => c.connection().tls_negotiated(),
        _ => return None,
    })
}

const FLAG_NAMES: &[&str] = &[
    "connect",
    "read",
    "cache",
    "df",
    "fast-zero",
    "flush",
    "fua",
    "multi-conn",
    "trim",
    "write",
    "zero",
    "block-status-payload",
    "structured-reply",
    "structured-replies",
    "extended-headers",
    "read-only",
    "readonly",
    "rotational",
    "tls",
];

fn flag_test(server: &Server, mut cfg: Config, flag: &str, negate: bool) -> Res {
    let norm = flag.replace('_', "-").to_ascii_lowercase();
    let is_flag = FLAG_NAMES.contains(&norm.as_str());
    let is_context = !is_flag && flag.contains(':');
    if !is_flag && !is_context {
        return fail(format!("unknown --can or --is option: {flag}"));
    }
    if is_context {
        cfg.meta_contexts = vec![flag.to_owned()];
    }
    let c = connect(server, cfg)?;
    let v = if is_context {
        c.can_meta_context(flag)
    } else {
        match flag_value(&c, flag) {
            Some(v) => v,
            None => return fail(format!("unknown --can or --is option: {flag}")),
        }
    };
    Ok(if v != negate { 0 } else { 2 })
}

// ----- the report -----

struct Export {
    name: String,
    description: Option<String>,
    size: u64,
    content: Option<String>,
    uri: Option<String>,
    contexts: Option<Vec<String>>,
    bools: Vec<(&'static str, bool)>,
    block: Option<nbd_std::BlockSize>,
}

fn report(server: &Server, cfg: Config, list: bool, probe: bool, json: bool) -> Res {
    let mut c = connect(server, cfg.clone())?;
    let protocol = c.get_protocol().unwrap_or("newstyle-fixed");
    let tls = c.connection().tls_negotiated();
    let sr = c.get_structured_replies_negotiated();
    let eh = c.get_extended_headers_negotiated();

    let mut out = String::new();
    if json {
        out.push_str("{\n");
        let _ = writeln!(out, "\"protocol\": {},", json_string(protocol));
        let _ = writeln!(out, "\"TLS\": {tls},");
        let _ = writeln!(out, "\"structured\": {sr},");
        let _ = writeln!(out, "\"extended\": {eh},");
    } else {
        let packets = if eh {
            "extended"
        } else if sr {
            "structured"
        } else {
            "simple"
        };
        let _ = writeln!(
            out,
            "protocol: {protocol} {} TLS, using {packets} packets",
            if tls { "with" } else { "without" }
        );
    }

    let mut ok = true;
    if !list {
        let e = describe(&mut c, server, None, probe)?;
        print_export(&mut out, &e, json, true, true);
        let _ = c.shutdown();
    } else {
        let exports = c.opt_list().ctx("opt_list")?;
        let _ = c.opt_abort();
        drop(c);
        if exports.is_empty() && json {
            out.push_str("\"exports\": []\n");
        }
        let n = exports.len();
        for (i, (name, desc)) in exports.iter().enumerate() {
            let r = (|| -> Res<Export> {
                let mut c2 = connect(server, cfg.clone())?;
                c2.set_export_name(name).ctx("set_export_name")?;
                let desc = (!desc.is_empty()).then_some(desc.as_str());
                let e = describe(&mut c2, server, desc, probe)?;
                let _ = c2.shutdown();
                Ok(e)
            })();
            match r {
                Ok(e) => print_export(&mut out, &e, json, i == 0, i + 1 == n),
                Err(Fail(m)) => {
                    eprintln!("nbd info: {m} for export: {name}");
                    ok = false;
                }
            }
        }
    }
    if json {
        out.push_str("}\n");
    }
    emit(out)?;
    Ok(if ok { 0 } else { 1 })
}

/// Collects what nbdinfo shows about the client's current export. The
/// client is in option mode; it ends in the transmission phase when the
/// content is probed.
fn describe(c: &mut Client, server: &Server, desc: Option<&str>, probe: bool) -> Res<Export> {
    if c.phase() == Phase::Negotiating && c.opt_info().is_err() {
        c.opt_go()
            .map_err(|e| Fail(format!("{e} for export: {}", c.export_name())))?;
    }
    let info = c.export_info().ctx("get_size")?.clone();
    let name = info
        .canonical_name
        .clone()
        .unwrap_or_else(|| c.export_name().to_owned());
    let description = match desc {
        Some(d) => Some(d.to_owned()),
        None => info.description.clone(),
    }
    .filter(|d| !d.is_empty());
    let contexts = if c.phase() == Phase::Negotiating {
        c.opt_list_meta_context::<&str>(&[]).ok()
    } else {
        None
    };
    let bools = vec![
        ("is_rotational", info.is_rotational()),
        ("is_read_only", info.is_read_only()),
        ("can_block_status_payload", info.can_block_status_payload()),
        ("can_cache", info.can_cache()),
        ("can_df", info.can_df()),
        ("can_fast_zero", info.can_fast_zero()),
        ("can_flush", info.can_flush()),
        ("can_fua", info.can_fua()),
        ("can_multi_conn", info.can_multi_conn()),
        ("can_trim", info.can_trim()),
        ("can_zero", info.can_zero()),
    ];
    let content = if probe {
        probe_content(c, info.size)?
    } else {
        None
    };
    Ok(Export {
        uri: uri_for(server, c.export_name()),
        name,
        description,
        size: info.size,
        content,
        contexts,
        bools,
        block: info.block_size,
    })
}

/// Runs `file -b` on the first 8 KiB of the export (best effort).
fn probe_content(c: &mut Client, size: u64) -> Res<Option<String>> {
    if c.phase() == Phase::Negotiating {
        c.opt_go().ctx("opt_go")?;
    }
    let n = size.min(8192) as usize;
    let mut buf = vec![0u8; n];
    if n > 0 && c.pread(&mut buf, 0, CmdFlags::empty()).is_err() {
        return Ok(None);
    }
    let path = std::env::temp_dir().join(format!(
        "nbd-info-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&buf));
    let r = match written {
        Ok(()) => std::process::Command::new("file")
            .arg("-b")
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                s.lines().next().map(str::to_owned)
            }),
        Err(_) => None,
    };
    let _ = std::fs::remove_file(&path);
    Ok(r)
}

fn print_export(out: &mut String, e: &Export, json: bool, first: bool, last: bool) {
    if !json {
        let _ = writeln!(out, "export={}:", json_string(&e.name));
        if let Some(d) = &e.description {
            let _ = writeln!(out, "\tdescription: {d}");
        }
        let (h, is_h) = human_size(e.size);
        if is_h {
            let _ = writeln!(out, "\texport-size: {} ({h})", e.size);
        } else {
            let _ = writeln!(out, "\texport-size: {}", e.size);
        }
        if let Some(c) = &e.content {
            let _ = writeln!(out, "\tcontent: {c}");
        }
        if let Some(u) = &e.uri {
            let _ = writeln!(out, "\turi: {u}");
        }
        if let Some(cs) = &e.contexts {
            out.push_str("\tcontexts:\n");
            for c in cs {
                let _ = writeln!(out, "\t\t{c}");
            }
        }
        for (k, v) in &e.bools {
            let _ = writeln!(out, "\t{k}: {v}");
        }
        if let Some(b) = &e.block {
            let _ = writeln!(out, "\tblock_size_minimum: {}", b.minimum);
            let _ = writeln!(out, "\tblock_size_preferred: {}", b.preferred);
            let _ = writeln!(out, "\tblock_size_maximum: {}", b.maximum);
        }
        return;
    }
    if first {
        out.push_str("\"exports\": [\n");
    }
    out.push_str("\t{\n");
    let _ = writeln!(out, "\t\"export-name\": {},", json_string(&e.name));
    if let Some(d) = &e.description {
        let _ = writeln!(out, "\t\"description\": {},", json_string(d));
    }
    if let Some(c) = &e.content {
        let _ = writeln!(out, "\t\"content\": {},", json_string(c));
    }
    if let Some(u) = &e.uri {
        let _ = writeln!(out, "\t\"uri\": {},", json_string(u));
    }
    if let Some(cs) = &e.contexts {
        out.push_str("\t\"contexts\": [\n");
        for (i, c) in cs.iter().enumerate() {
            let comma = if i + 1 < cs.len() { "," } else { "" };
            let _ = writeln!(out, "\t\t{}{comma}", json_string(c));
        }
        out.push_str("\t],\n");
    }
    for (k, v) in &e.bools {
        let _ = writeln!(out, "\t\"{k}\": {v},");
    }
    if let Some(b) = &e.block {
        let _ = writeln!(out, "\t\"block_size_minimum\": {},", b.minimum);
        let _ = writeln!(out, "\t\"block_size_preferred\": {},", b.preferred);
        let _ = writeln!(out, "\t\"block_size_maximum\": {},", b.maximum);
    }
    let _ = writeln!(out, "\t\"export-size\": {},", e.size);
    let _ = writeln!(out, "\t\"export-size-str\": \"{}\"", human_size(e.size).0);
    out.push_str(if last { "\t} ]\n" } else { "\t},\n" });
}

// ----- --map -----

/// libnbd's description of an extent type of a known context.
pub fn extent_description(ctx: &str, t: u64) -> Option<String> {
    if ctx == "base:allocation" {
        return match t {
            0 => Some("data".into()),
            1 => Some("hole".into()),
            2 => Some("zero".into()),
            3 => Some("hole,zero".into()),
            _ => None,
        };
    }
    if ctx.starts_with("qemu:dirty-bitmap:") {
        return match t {
            0 => Some("clean".into()),
            1 => Some("dirty".into()),
            _ => None,
        };
    }
    if ctx == "qemu:allocation-depth" {
        return match t {
            0 => Some("absent".into()),
            1 => Some("local".into()),
            n => Some(format!("backing depth {n}")),
        };
    }
    None
}

/// The whole map of `ctx`: (offset, length, type), adjacent extents of one
/// type merged.
fn collect_map(c: &mut Client, ctx: &str, size: u64) -> Res<Vec<(u64, u64, u64)>> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let count = (size - off).min(1 << 31);
        let replies = c
            .block_status(off, count, CmdFlags::empty())
            .ctx("block_status")?;
        let extents = replies
            .into_iter()
            .find(|(n, _)| n == ctx)
            .map(|(_, e)| e)
            .unwrap_or_default();
        let before = off;
        for e in extents {
            if off >= size || e.length == 0 {
                break;
            }
            let len = e.length.min(size - off);
            match out.last_mut() {
                Some(last) if last.2 == e.flags && last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len, e.flags)),
            }
            off += len;
        }
        if off == before {
            return fail("block_status: the server returned no extents");
        }
    }
    Ok(out)
}

/// `%g`: six significant digits, trailing zeros removed.
fn fmt_g(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let digits = 6i32;
    let exp = x.abs().log10().floor() as i32;
    let decimals = (digits - 1 - exp).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

fn map(server: &Server, mut cfg: Config, ctx: &str, totals: bool, json: bool) -> Res {
    cfg.meta_contexts = vec![ctx.to_owned()];
    let mut c = connect(server, cfg)?;
    if !c.can_meta_context(ctx) {
        return fail(format!(
            "--map: server does not support metadata context \"{ctx}\""
        ));
    }
    let size = c.get_size().ctx("get_size")?;
    let m = collect_map(&mut c, ctx, size)?;
    let _ = c.shutdown();
    let mut out = String::new();
    if !totals {
        if json {
            out.push_str("[\n");
        }
        for (i, (off, len, t)) in m.iter().enumerate() {
            let d = extent_description(ctx, *t);
            if json {
                let _ = write!(
                    out,
                    "{{ \"offset\": {off}, \"length\": {len}, \"type\": {t}"
                );
                if let Some(d) = d {
                    let _ = write!(out, ", \"description\": {}", json_string(&d));
                }
                out.push('}');
                out.push_str(if i + 1 < m.len() { ",\n" } else { "\n" });
            } else {
                let _ = write!(out, "{off:>10}  {len:>10}  {t:>3}");
                if let Some(d) = d {
                    let _ = write!(out, "  {d}");
                }
                out.push('\n');
            }
        }
        if json {
            out.push_str("]\n");
        }
    } else {
        let mut sums: BTreeMap<u64, u64> = BTreeMap::new();
        for (_, len, t) in &m {
            *sums.entry(*t).or_default() += len;
        }
        if json {
            out.push_str("[\n");
        }
        let n = sums.len();
        for (i, (t, bytes)) in sums.into_iter().enumerate() {
            let pct = if size > 0 {
                100.0 * bytes as f64 / size as f64
            } else {
                0.0
            };
            let d = extent_description(ctx, t);
            if json {
                let _ = write!(
                    out,
                    "{{ \"size\": {bytes}, \"percent\": {}, \"type\": {t}",
                    fmt_g(pct)
                );
                if let Some(d) = d {
                    let _ = write!(out, ", \"description\": {}", json_string(&d));
                }
                out.push_str(" }");
                out.push_str(if i + 1 < n { ",\n" } else { "\n" });
            } else {
                let _ = write!(out, "{bytes:>10} {pct:>5.1}% {t:>3}");
                if let Some(d) = d {
                    let _ = write!(out, " {d}");
                }
                out.push('\n');
            }
        }
        if json {
            out.push_str("]\n");
        }
    }
    emit(out)
}

#[cfg(test)]
mod tests {
    use super::fmt_g;

    #[test]
    fn percent_like_printf_g() {
        assert_eq!(fmt_g(100.0), "100");
        assert_eq!(fmt_g(9.8304), "9.8304");
        assert_eq!(fmt_g(90.1696), "90.1696");
        assert_eq!(fmt_g(33.333333333), "33.3333");
        assert_eq!(fmt_g(0.0), "0");
    }
}

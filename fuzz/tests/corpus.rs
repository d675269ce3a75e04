//! Replays every committed seed of every target (`corpus/seed/<target>/`)
//! through the same check function the cargo-fuzz binary runs, under plain
//! `cargo test`, so that a regression shows in CI without cargo-fuzz:
//!
//! ```sh
//! cargo test --manifest-path fuzz/Cargo.toml
//! ```
//!
//! A target without seeds fails: each one must have at least one.

use std::path::Path;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 7] = [
    ("state_machine", nbd_fuzz::run_state_machine),
    ("negotiation", nbd_fuzz::checks::negotiation::check),
    ("uri", nbd_fuzz::checks::uri::check),
    ("wire_handshake", nbd_fuzz::checks::wire_handshake::check),
    ("wire_option", nbd_fuzz::checks::wire_option::check),
    ("wire_reply", nbd_fuzz::checks::wire_reply::check),
    ("wire_request", nbd_fuzz::checks::wire_request::check),
];

fn replay(target: &str, check: Check) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus/seed")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: seed {} fails its check", f.display());
    }
    eprintln!("{target}: {} seeds replayed", files.len());
}

#[test]
fn every_target_has_a_check_in_this_list() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz_targets");
    for e in std::fs::read_dir(dir).expect("fuzz_targets") {
        let name = e.expect("entry").path();
        let stem = name
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == stem),
            "target {stem} has no corpus replay here"
        );
    }
}

#[test]
fn seeds_replay() {
    for (t, check) in TARGETS {
        replay(t, check);
    }
}

//! Replays `state_machine` inputs (seeds or crash artifacts) outside
//! libFuzzer through the target itself and prints the events the client
//! saw, one per line.
//!
//! ```sh
//! cd fuzz && cargo run --example replay -- corpus/seed/state_machine/qemu-nbd-extended
//! ```

use nbd_fuzz::{Setup, HEADER_LEN};

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).expect("read input");
        println!("== {path} ({} bytes)", data.len());
        let Some((header, _)) = data.split_first_chunk::<HEADER_LEN>() else {
            println!("(shorter than the header)");
            continue;
        };
        println!("{:?}", Setup::from_header(*header));
        // The run of the fuzz target itself, with its event log.
        for ev in nbd_fuzz::run_state_machine_logged(&data, true) {
            println!("  {}", truncate(&ev));
        }
    }
}
fn truncate(s: &str) -> String {
    if s.len() > 300 {
        let cut = (0..=300)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}...", &s[..cut])
    } else {
        s.to_owned()
    }
}

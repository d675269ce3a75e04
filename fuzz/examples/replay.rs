//! Replays `state_machine` inputs (seeds or crash artifacts) outside
//! libFuzzer and prints the events the client saw, one per line.
//!
//! ```sh
//! cd fuzz && cargo run --example replay -- corpus/seed/state_machine/qemu-nbd-extended
//! ```

use nbd_fuzz::{feed, frames, Driver, Setup, HEADER_LEN};

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).expect("read input");
        println!("== {path} ({} bytes)", data.len());
        let Some((header, body)) = data.split_first_chunk::<HEADER_LEN>() else {
            println!("(shorter than the header)");
            continue;
        };
        let setup = Setup::from_header(*header);
        println!("{setup:?}");
        let mut d = Driver::new(setup);
        d.log = Some(Vec::new());
        let mut out = Vec::new();
        d.pump(&mut out);
        let mut sent = out.len();
        for frame in frames(body) {
            feed(&mut d.conn, frame, setup.recv_path);
            d.pump(&mut out);
            for ev in d.log.as_mut().unwrap().drain(..) {
                println!("  {}", truncate(&ev));
            }
            sent = out.len();
        }
        d.finish(&mut out);
        for ev in d.log.as_mut().unwrap().drain(..) {
            println!("  {}", truncate(&ev));
        }
        println!(
            "client sent {sent} bytes; {} commands issued; {} events",
            d.issued, d.events
        );
        // Also the whole run through the fuzz target itself.
        nbd_fuzz::run_state_machine(&data);
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

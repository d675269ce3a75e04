//! Connects to an NBD server and prints the size of the export in bytes,
//! with the tokio client.
//!
//! ```text
//! $ nbdkit -U - memory 1M --run 'cargo run -p nbd-tokio --example get-size -- "$uri"'
//! 1048576
//! ```
//!
//! The argument is an NBD URI (`nbd+unix:///export?socket=/tmp/sock`,
//! `nbd://host:port/export`) or a Unix socket path.

use std::process::ExitCode;

use nbd_tokio::{Client, Config};

async fn run(target: &str) -> Result<u64, nbd_tokio::Error> {
    let (nbd, task) = Client::connect(target, Config::default()).await?;
    let task = tokio::spawn(task);
    let size = nbd.size()?;
    nbd.disconnect().await?;
    task.await.map_err(|_| nbd_tokio::Error::TaskGone)??;
    Ok(size)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target] = args.as_slice() else {
        eprintln!("usage: get-size SOCKET|URI");
        return ExitCode::FAILURE;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("get-size: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(target)) {
        Ok(size) => {
            println!("{size}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("get-size: {target}: {e}");
            ExitCode::FAILURE
        }
    }
}

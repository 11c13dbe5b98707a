//! `tasklane-dynamo-proxy`: the AWS emulator's DynamoDB with the real service's atomic
//! transactions and `TransactionConflict` for overlapping ones (see
//! `tasklane_testkit::dynamo_proxy`). Listens on a free loopback port and prints its URL as
//! the first line of its output; runs until killed.

use std::time::Duration;

use clap::Parser;
use tasklane_testkit::dynamo_proxy::{DynamoProxy, ProxyOptions};

/// Puts DynamoDB's transaction semantics in front of an AWS emulator.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The emulator's base URL (a loopback address), e.g. http://127.0.0.1:5000.
    #[arg(long)]
    upstream: String,
    /// Milliseconds a transaction stays ongoing after the emulator answered it.
    #[arg(long, default_value_t = 5)]
    hold_ms: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut proxy = DynamoProxy::start(ProxyOptions {
        upstream: args.upstream,
        hold: Duration::from_millis(args.hold_ms),
    })
    .await?;
    println!("{}", proxy.url());
    proxy.wait().await;
    Ok(())
}

//! `tasklane`: the whole task API on 127.0.0.1 with embedded backends (`cargo run`).

use std::process::ExitCode;

use tasklane_local::{LocalConfig, init_tracing, start};

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // What is wrong (an invalid variable, a bad model catalog, a port in use), with its
            // causes on one line; never a backtrace, even with RUST_BACKTRACE set.
            eprintln!("tasklane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the server and serves until SIGINT or SIGTERM.
async fn run() -> anyhow::Result<()> {
    let cfg = LocalConfig::from_env()?;
    let data_dir = cfg.data_dir.clone();
    let running = start(cfg).await?;
    println!("tasklane is listening on {}", running.base_url);
    println!("development API key: {}", running.dev_api_key);
    println!("data directory: {}", data_dir.display());
    println!(
        "try: curl -s {}/account -H \"Authorization: Bearer {}\"",
        running.base_url, running.dev_api_key
    );
    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight work");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

//! One module per command; [`run`] dispatches a parsed command to it on an opened backend.

pub mod create_account;
pub mod grant;
pub mod revoke_key;
pub mod rotate_key;
pub mod shard;
pub mod show;

use crate::backend::Opened;
use crate::cli::Command;
use crate::failure::Failure;
use crate::report::Report;

/// Runs `command` on the opened backend.
pub async fn run(command: &Command, opened: &Opened) -> Result<Report, Failure> {
    match command {
        Command::CreateAccount(args) => create_account::run(args, opened).await,
        Command::Grant(args) => grant::run(args, opened).await,
        Command::Show(args) => show::run(args, opened).await,
        Command::RotateKey(args) => rotate_key::run(args, opened).await,
        Command::RevokeKey(args) => revoke_key::run(args, opened).await,
        Command::Shard(args) => shard::run(args, opened).await,
    }
}

//! `shard`: spreads a busy account's balance over more DynamoDB items
//! (`tasklane_aws::dynamo`'s ledger) and prints the account with the count in force.

use serde_json::json;

use crate::backend::Opened;
use crate::cli::ShardArgs;
use crate::failure::Failure;
use crate::report::Report;

/// Sets the shard count; the local store has none to set.
pub async fn run(args: &ShardArgs, opened: &Opened) -> Result<Report, Failure> {
    let ShardArgs { account, shards } = args;
    let Some(dynamo) = &opened.dynamo else {
        return Err(Failure::Backend(format!(
            "shard applies to the DynamoDB table only: {} writes one change at a time and has \
             no per-item limit to spread over",
            opened.name
        )));
    };
    opened.existing(account).await?;
    let count = dynamo
        .set_shards(account, *shards)
        .await
        .map_err(|e| opened.failure(e, "spreading the account", Some(account)))?;
    let mut report = Report::account(&opened.existing(account).await?);
    report.fields.push(("shards", json!(count)));
    Ok(report)
}

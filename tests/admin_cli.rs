//! The `tasklane-admin` binary, run as a user would: on the local server's SQLite database
//! (checked through a running local server's API) and on a DynamoDB table in the AWS emulator
//! (checked through the DynamoDB store).
//!
//! The DynamoDB tests need `AWS_ENDPOINT_URL` (scripts/test.sh starts moto and sets it); without
//! it they fail (they never pass without having run).

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use tasklane_aws::dynamo::DynamoStore;
use tasklane_core::account::hash_api_key;
use tasklane_core::ports::TaskStore;
use tasklane_local::{LocalConfig, Running};

const BIN: &str = env!("CARGO_BIN_EXE_tasklane-admin");

/// Runs the binary with `args`, `TASKLANE_DATA_DIR` and `TASKLANE_TABLE` unset unless `env`
/// sets them.
async fn admin_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("TASKLANE_DATA_DIR")
        .env_remove("TASKLANE_TABLE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.expect("tasklane-admin runs")
}

async fn admin(args: &[&str]) -> Output {
    admin_env(args, &[]).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and parses the JSON object printed on stdout.
fn ok_json(o: &Output) -> Value {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Asserts the exit code, an empty stdout, a message on stderr that contains every one of
/// `needles`, and no panic.
fn fails(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "stderr: {err}\nstdout: {}",
        stdout(o)
    );
    assert!(o.stdout.is_empty(), "stdout on failure: {}", stdout(o));
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
}

fn s<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing: {v}"))
}

fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {v}"))
}

async fn server(dir: &Path) -> Running {
    tasklane_local::start(LocalConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        workers: 2,
        ..LocalConfig::default()
    })
    .await
    .expect("the local server starts")
}

/// `GET /v1/account` with `key`: the status and the body.
async fn account_api(server: &Running, key: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("{}/account", server.base_url))
        .bearer_auth(key)
        .send()
        .await
        .expect("the server answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn local_accounts_work_against_the_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();

    // Created before the server ever ran: the CLI creates the database.
    let created =
        ok_json(&admin(&["create-account", "--credits", "500", "--local", d, "--json"]).await);
    let (id, key) = (s(&created, "account_id"), s(&created, "api_key"));
    assert!(id.starts_with("acct_"), "{created}");
    assert!(key.starts_with("tl_"), "{created}");
    assert!(s(&created, "webhook_secret").starts_with("whsec_"));
    assert_eq!((u(&created, "credits"), u(&created, "granted")), (500, 500));

    let srv = server(dir.path()).await;
    let (status, body) = account_api(&srv, key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["account_id"], id);
    assert_eq!(body["credits"], 500);
    assert_eq!(body["webhook_secret"], created["webhook_secret"]);

    // While the server runs.
    let granted = ok_json(
        &admin(&[
            "grant",
            "--account",
            id,
            "--credits",
            "250",
            "--local",
            d,
            "--json",
        ])
        .await,
    );
    assert_eq!((u(&granted, "credits"), u(&granted, "granted")), (750, 750));
    assert_eq!(account_api(&srv, key).await.1["credits"], 750);

    // show: human and JSON, never the key.
    let shown = admin(&["show", "--account", id, "--local", d]).await;
    assert_eq!(shown.status.code(), Some(0), "{}", stderr(&shown));
    let text = stdout(&shown);
    assert!(text.contains(id) && text.contains("750"), "{text}");
    assert!(
        !text.contains(key) && !stderr(&shown).contains(key),
        "{text}"
    );
    assert!(
        !text.contains("api_key") && !text.contains("key_hash"),
        "{text}"
    );
    assert!(!text.contains(&hash_api_key(key)), "{text}");
    let shown = ok_json(&admin(&["show", "--account", id, "--local", d, "--json"]).await);
    assert_eq!(s(&shown, "account_id"), id);
    assert_eq!((u(&shown, "credits"), u(&shown, "granted")), (750, 750));
    assert!(
        shown.get("api_key").is_none() && !shown.to_string().contains(key),
        "{shown}"
    );

    // rotate-key: the old key stops working at once, the new one works.
    let rotated = ok_json(&admin(&["rotate-key", "--account", id, "--local", d, "--json"]).await);
    let new_key = s(&rotated, "api_key");
    assert_eq!(s(&rotated, "account_id"), id);
    assert!(new_key.starts_with("tl_") && new_key != key, "{rotated}");
    assert_eq!(account_api(&srv, key).await.0, 401);
    let (status, body) = account_api(&srv, new_key).await;
    assert_eq!(
        (status, &body["credits"]),
        (200, &Value::from(750)),
        "{body}"
    );
    assert_eq!(body["account_id"], id);

    // revoke-key: the key answers 401 at once; the account and its credits stay, and
    // rotate-key gives it a working key again.
    let revoked = ok_json(&admin(&["revoke-key", "--account", id, "--local", d, "--json"]).await);
    assert_eq!(revoked["key_revoked"], true);
    assert!(!revoked.to_string().contains(new_key), "{revoked}");
    assert_eq!(account_api(&srv, new_key).await.0, 401);
    let shown = ok_json(&admin(&["show", "--account", id, "--local", d, "--json"]).await);
    assert_eq!(u(&shown, "credits"), 750);
    let again = ok_json(&admin(&["rotate-key", "--account", id, "--local", d, "--json"]).await);
    assert_eq!(account_api(&srv, s(&again, "api_key")).await.0, 200);
    assert_eq!(account_api(&srv, new_key).await.0, 401);

    // The development account the server made is untouched and distinct.
    assert_ne!(srv.dev_account_id, id);
    assert_eq!(account_api(&srv, &srv.dev_api_key).await.0, 200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn human_output_shows_the_key_once_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let o = admin(&["--local", d, "create-account", "--credits", "7"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} line: {out}"))
    };
    let (id, key) = (field("account_id"), field("api_key"));
    assert!(key.starts_with("tl_"), "{out}");
    assert!(field("webhook_secret").starts_with("whsec_"), "{out}");
    assert_eq!(field("credits"), "7");
    assert!(stderr(&o).contains("not shown again"), "{}", stderr(&o));

    let o = admin(&["--local", d, "rotate-key", "--account", &id]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("api_key:") && !stdout(&o).contains(&key));

    let o = admin(&["--local", d, "grant", "--account", &id, "--credits", "3"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("credits:") && l.ends_with(" 10")),
        "{}",
        stdout(&o)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chosen_key_works_and_cannot_be_reused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let key = "sk-imported-0123456789";
    let created = ok_json(
        &admin(&[
            "create-account",
            "--credits",
            "5",
            "--key",
            key,
            "--local",
            d,
            "--json",
        ])
        .await,
    );
    assert_eq!(s(&created, "api_key"), key);
    let srv = server(dir.path()).await;
    let (status, body) = account_api(&srv, key).await;
    assert_eq!((status, &body["account_id"]), (200, &created["account_id"]));
    fails(
        &admin(&[
            "create-account",
            "--credits",
            "5",
            "--key",
            key,
            "--local",
            d,
        ])
        .await,
        1,
        &["already uses this key"],
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_directory_defaults_to_tasklane_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let env = [("TASKLANE_DATA_DIR", d)];
    let created = ok_json(
        &admin_env(
            &["--local", "create-account", "--credits", "3", "--json"],
            &env,
        )
        .await,
    );
    assert!(dir.path().join("tasklane.db").is_file());
    let id = s(&created, "account_id");
    let shown = ok_json(&admin_env(&["show", "--account", id, "--local", "--json"], &env).await);
    assert_eq!(u(&shown, "credits"), 3);
    // --local DIR wins over the variable.
    let other = tempfile::tempdir().unwrap();
    fails(
        &admin_env(
            &[
                "show",
                "--account",
                id,
                "--local",
                other.path().to_str().unwrap(),
            ],
            &env,
        )
        .await,
        1,
        &["no tasklane database"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_while_the_server_spends_credits_are_all_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let created =
        ok_json(&admin(&["create-account", "--credits", "100", "--local", d, "--json"]).await);
    let (id, key) = (
        s(&created, "account_id").to_string(),
        s(&created, "api_key").to_string(),
    );
    let srv = server(dir.path()).await;
    let client = reqwest::Client::new();
    let submits = (0..40).map(|_| {
        client
            .post(format!("{}/tasks", srv.base_url))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "echo", "prompt": "hi"}))
            .send()
    });
    let grants = (0..10).map(|_| {
        let (id, d) = (id.clone(), d.to_string());
        async move { admin(&["grant", "--account", &id, "--credits", "5", "--local", &d]).await }
    });
    let (submitted, granted) = tokio::join!(futures_join_all(submits), futures_join_all(grants));
    for g in &granted {
        assert_eq!(g.status.code(), Some(0), "{}", stderr(g));
    }
    let accepted = submitted
        .into_iter()
        .map(|r| r.expect("the server answers").status().as_u16())
        .filter(|s| *s == 202)
        .count() as u64;
    assert_eq!(accepted, 40);
    let shown = ok_json(&admin(&["show", "--account", &id, "--local", d, "--json"]).await);
    assert_eq!(u(&shown, "granted"), 150);
    // echo costs 1 credit and never fails here, so nothing is refunded.
    assert_eq!(u(&shown, "credits"), 150 - accepted);
    assert_eq!(account_api(&srv, &key).await.1["credits"], 150 - accepted);
    srv.shutdown().await;
}

/// Awaits every future concurrently (spawned, so they make progress together).
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task completes"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_exit_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let o = admin(&[]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("Usage"), "{}", stderr(&o));

    let help = admin(&["--help"]).await;
    assert_eq!(help.status.code(), Some(0));
    for word in [
        "create-account",
        "grant",
        "show",
        "rotate-key",
        "--local",
        "--dynamodb",
        "--json",
    ] {
        assert!(stdout(&help).contains(word), "help lacks {word}");
    }

    fails(
        &admin(&["create-account", "--local", d]).await,
        2,
        &["--credits"],
    );
    fails(
        &admin(&["create-account", "--credits", "5"]).await,
        2,
        &["--local", "--dynamodb"],
    );
    fails(
        &admin(&[
            "create-account",
            "--credits",
            "5",
            "--local",
            d,
            "--dynamodb",
            "--table",
            "t",
        ])
        .await,
        2,
        &["not both"],
    );
    fails(
        &admin(&["create-account", "--credits", "5", "--dynamodb"]).await,
        2,
        &["--table", "TASKLANE_TABLE"],
    );
    fails(
        &admin(&["create-account", "--credits", "many", "--local", d]).await,
        2,
        &["--credits"],
    );
    fails(
        &admin(&["create-account", "--credits", "-4", "--local", d]).await,
        2,
        &["--credits"],
    );
    fails(
        &admin(&[
            "create-account",
            "--credits",
            "5",
            "--key",
            "short",
            "--local",
            d,
        ])
        .await,
        2,
        &["--key"],
    );
    fails(
        &admin(&[
            "grant",
            "--account",
            "acct_x",
            "--credits",
            "0",
            "--local",
            d,
        ])
        .await,
        2,
        &["at least 1"],
    );
    fails(
        &admin(&["grant", "--credits", "5", "--local", d]).await,
        2,
        &["--account"],
    );
    fails(&admin(&["show", "--local", d]).await, 2, &["--account"]);
    fails(
        &admin(&[
            "show",
            "--account",
            "acct_x",
            "--credits",
            "5",
            "--local",
            d,
        ])
        .await,
        2,
        &["--credits"],
    );
    fails(
        &admin(&[
            "rotate-key",
            "--account",
            "acct_x",
            "--key",
            "0123456789abcdefg",
            "--local",
            d,
        ])
        .await,
        2,
        &["--key"],
    );
    fails(
        &admin(&["delete-account", "--local", d]).await,
        2,
        &["unrecognized subcommand", "delete-account"],
    );
    fails(
        &admin(&["show", "--account", "acct_x", "--local", d, "--verbose"]).await,
        2,
        &["--verbose"],
    );
    fails(
        &admin(&["show", "--account", "acct_x", "--local", d, "--table", "t"]).await,
        2,
        &["--table"],
    );

    // With --json the error is a JSON object on stderr.
    let o = admin(&[
        "grant",
        "--credits",
        "x",
        "--account",
        "a",
        "--local",
        d,
        "--json",
    ])
    .await;
    fails(&o, 2, &[]);
    let err: Value = serde_json::from_slice(&o.stderr).expect("a JSON error");
    assert_eq!(err["error"]["code"], "usage");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--credits")
    );

    // A usage error touches nothing: no data directory was created.
    assert!(!dir.path().join("tasklane.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_account_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok_json(&admin(&["create-account", "--credits", "1", "--local", d, "--json"]).await);
    let missing = "acct_01J00000000000000000000000";
    fails(
        &admin(&["show", "--account", missing, "--local", d]).await,
        1,
        &[missing, "no account"],
    );
    fails(
        &admin(&[
            "grant",
            "--account",
            missing,
            "--credits",
            "5",
            "--local",
            d,
        ])
        .await,
        1,
        &[missing],
    );
    fails(
        &admin(&["rotate-key", "--account", missing, "--local", d]).await,
        1,
        &[missing],
    );
    // The local store has no items to spread an account over.
    fails(
        &admin(&["shard", "--account", missing, "--shards", "4", "--local", d]).await,
        1,
        &["DynamoDB table only"],
    );
    let o = admin(&["show", "--account", missing, "--local", d, "--json"]).await;
    fails(&o, 1, &[]);
    let err: Value = serde_json::from_slice(&o.stderr).expect("a JSON error");
    assert_eq!(err["error"]["code"], "not_found");

    // A directory without a database is an error, and is not turned into one.
    let empty = tempfile::tempdir().unwrap();
    fails(
        &admin(&[
            "show",
            "--account",
            missing,
            "--local",
            empty.path().to_str().unwrap(),
        ])
        .await,
        1,
        &["no tasklane database"],
    );
    assert!(!empty.path().join("tasklane.db").exists());
}

// ---------------------------------------------------------------------------------------------
// DynamoDB, on the emulator.

/// Fails the test unless the AWS emulator is configured.
fn require_emulator() {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok_and(|v| !v.is_empty()),
        "AWS_ENDPOINT_URL is not set: this test needs the AWS emulator (moto). Run \
         scripts/test.sh, which starts it and sets AWS_ENDPOINT_URL and the emulator's dummy \
         credentials"
    );
}

fn unique_prefix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("admin{nanos:x}{}", std::process::id())
}

async fn dynamo_table() -> (DynamoStore, String) {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let settings = tasklane_testkit::provision::provision(&config, &unique_prefix())
        .await
        .expect(
            "provisioning on the AWS emulator (is AWS_ENDPOINT_URL right? run scripts/test.sh)",
        );
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), &settings.table);
    (store, settings.table)
}

#[tokio::test(flavor = "multi_thread")]
async fn dynamodb_accounts_keys_and_credits() {
    require_emulator();
    let (store, table) = dynamo_table().await;
    let t = table.as_str();
    let created = ok_json(
        &admin(&[
            "create-account",
            "--credits",
            "300",
            "--dynamodb",
            "--table",
            t,
            "--json",
        ])
        .await,
    );
    let (id, key) = (s(&created, "account_id"), s(&created, "api_key"));
    let acct = store
        .account_by_key_hash(&hash_api_key(key))
        .await
        .unwrap()
        .expect("the printed key finds the account");
    assert_eq!(acct.id, id);
    assert_eq!((acct.credits, acct.granted), (300, 300));
    assert_eq!(acct.webhook_secret, s(&created, "webhook_secret"));
    assert_ne!(acct.key_hash, key, "the key is stored as its hash");

    let granted = ok_json(
        &admin(&[
            "grant",
            "--account",
            id,
            "--credits",
            "200",
            "--dynamodb",
            "--table",
            t,
            "--json",
        ])
        .await,
    );
    assert_eq!((u(&granted, "credits"), u(&granted, "granted")), (500, 500));
    let acct = store.account(id).await.unwrap().unwrap();
    assert_eq!((acct.credits, acct.granted), (500, 500));

    // The table can come from TASKLANE_TABLE.
    let shown = admin_env(
        &["show", "--account", id, "--dynamodb"],
        &[("TASKLANE_TABLE", t)],
    )
    .await;
    assert_eq!(shown.status.code(), Some(0), "{}", stderr(&shown));
    assert!(
        stdout(&shown).contains(id) && stdout(&shown).contains("500"),
        "{}",
        stdout(&shown)
    );
    assert!(!stdout(&shown).contains(key), "{}", stdout(&shown));
    let shown = ok_json(
        &admin(&[
            "show",
            "--account",
            id,
            "--dynamodb",
            "--table",
            t,
            "--json",
        ])
        .await,
    );
    assert_eq!(u(&shown, "credits"), 500);
    assert!(!shown.to_string().contains(key));

    let rotated = ok_json(
        &admin(&[
            "rotate-key",
            "--account",
            id,
            "--dynamodb",
            "--table",
            t,
            "--json",
        ])
        .await,
    );
    let new_key = s(&rotated, "api_key");
    assert_ne!(new_key, key);
    assert!(
        store
            .account_by_key_hash(&hash_api_key(key))
            .await
            .unwrap()
            .is_none(),
        "the old key still works"
    );
    let acct = store
        .account_by_key_hash(&hash_api_key(new_key))
        .await
        .unwrap()
        .expect("the new key works");
    assert_eq!((acct.id.as_str(), acct.credits), (id, 500));

    // A chosen key, and its reuse refused.
    let chosen = "sk-imported-dynamo-0123456789";
    let other = ok_json(
        &admin(&[
            "create-account",
            "--credits",
            "0",
            "--key",
            chosen,
            "--dynamodb",
            "--table",
            t,
            "--json",
        ])
        .await,
    );
    let acct = store
        .account_by_key_hash(&hash_api_key(chosen))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.id.as_str(), acct.credits),
        (s(&other, "account_id"), 0)
    );
    fails(
        &admin(&[
            "create-account",
            "--credits",
            "1",
            "--key",
            chosen,
            "--dynamodb",
            "--table",
            t,
        ])
        .await,
        1,
        &["already uses this key"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shard_spreads_a_dynamodb_account_and_only_grows() {
    require_emulator();
    let (store, table) = dynamo_table().await;
    let t = table.as_str();
    let created = ok_json(
        &admin(&[
            "create-account",
            "--credits",
            "90",
            "--dynamodb",
            "--table",
            t,
            "--json",
        ])
        .await,
    );
    let id = s(&created, "account_id");
    let spread = ok_json(
        &admin(&[
            "shard",
            "--account",
            id,
            "--shards",
            "3",
            "--dynamodb",
            "--table",
            t,
            "--json",
        ])
        .await,
    );
    assert_eq!((u(&spread, "shards"), u(&spread, "credits")), (3, 90));
    // The balance is the account's wherever it lies; the key still finds it.
    let acct = store
        .account_by_key_hash(&hash_api_key(s(&created, "api_key")))
        .await
        .unwrap()
        .expect("the key finds the account");
    assert_eq!((acct.credits, acct.granted), (90, 90));
    fails(
        &admin(&[
            "shard",
            "--account",
            id,
            "--shards",
            "2",
            "--dynamodb",
            "--table",
            t,
        ])
        .await,
        1,
        &["only grows"],
    );
    fails(
        &admin(&[
            "shard",
            "--account",
            id,
            "--shards",
            "65",
            "--dynamodb",
            "--table",
            t,
        ])
        .await,
        2,
        &["65"],
    );
    fails(
        &admin(&[
            "shard",
            "--account",
            "acct_nobody",
            "--shards",
            "2",
            "--dynamodb",
            "--table",
            t,
        ])
        .await,
        1,
        &["no account"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dynamodb_errors_are_clear() {
    require_emulator();
    let (_store, table) = dynamo_table().await;
    let missing = "acct_01J00000000000000000000000";
    for args in [
        vec!["show", "--account", missing],
        vec!["grant", "--account", missing, "--credits", "5"],
        vec!["rotate-key", "--account", missing],
    ] {
        let mut args = args;
        args.extend(["--dynamodb", "--table", &table]);
        fails(&admin(&args).await, 1, &["no account", missing]);
    }
    fails(
        &admin(&[
            "show",
            "--account",
            missing,
            "--dynamodb",
            "--table",
            "no-such-table-here",
        ])
        .await,
        1,
        &["no-such-table-here", "does not exist"],
    );
}

//! The real Cog prediction server (coglet, from `pip install cog==0.23.1`) on loopback, running
//! one of the predictors in `tests/cog/` (`render`, `fail`, `hang`, `fast`): the upstream that
//! tasklane's Cog provider adapter talks to.
//!
//! [`CogServer::start`] needs the test venv (`TASKLANE_VENV`, else `<repository>/.venv`, made by
//! `scripts/test.sh`) and panics when it or its `cog` package is missing: it never skips.
//!
//! # Observed on coglet 0.23.1
//!
//! What the adapter may rely on (predictors from `tests/cog/`, loopback, one slot unless said):
//!
//! - **Submit** `PUT /predictions/{id}` with `Prefer: respond-async`: `202`
//!   `{"id":"<id>","status":"starting"}` (just these two fields). Without the header the PUT waits
//!   and answers `200` with the final state (`{id,logs,metrics,output?,error?,status}`).
//! - **Re-PUT of the same id while it runs** (same or different body): `202` with the current
//!   state `{id,input,logs,metrics,status:"processing"}`, still the *original* input; a different
//!   `input`, `webhook` or filter in the re-PUT is ignored (the new webhook gets nothing). This
//!   holds at capacity too: the same id is answered, not refused.
//! - **Re-PUT after the prediction finished**: `202 {"id","status":"starting"}` again and a
//!   **new run** under the same id (all webhooks again): coglet forgets finished predictions.
//!   For ~5 ms after the completed webhook the slot is not yet released: a re-PUT may still
//!   get `202` with the finished state (`status:"succeeded"`, output) or `409`, a cancel `200`.
//! - `GET /predictions/{id}`: `405` (`allow: PUT`), empty body. No way to read a finished one.
//! - **Busy** (all slots): another id (PUT or `POST /predictions`) gets `409`
//!   `{"error":"At capacity - all prediction slots busy","status":"failed"}`, headers only
//!   `content-type: application/json` (no `Retry-After`).
//! - **Cancel** `POST /predictions/{id}/cancel`: `200 {}` while it runs (a re-PUT right after
//!   still says `processing`; the `canceled` webhook follows within ~50 ms); `404 {}` for an
//!   unknown or finished id, or a second cancel. Status spelling: `canceled`. **A cancel sent
//!   before the predictor's code starts (within ms of the PUT, even after the start webhook) is
//!   answered `200` and lost** (5 of 20 tries right after the PUT): the prediction runs on. A
//!   second cancel works; re-send until the `canceled` webhook (or a re-PUT shows it over).
//! - **Webhooks** (`POST`, `content-type: application/json`, `user-agent: coglet/0.23.1`,
//!   `authorization: Bearer <WEBHOOK_AUTH_TOKEN>` when that env var is set). Bodies are
//!   `{id,status,logs,metrics,output?,error?}`: no `input`, no timestamps. With the filter
//!   `["start","logs","output","completed"]`:
//!   - start: `{"status":"processing","logs":"","metrics":{}}` (never `starting`);
//!   - logs: `status:"processing"`, `logs` is **all** lines so far (cumulative, each ending in
//!     `\n`), sent at most every `COG_THROTTLE_RESPONSE_INTERVAL` (0.5 s; 0.1 s gives ~0.125 s)
//!     and only when a new line arrives: a lone line (the `hang` predictor's) gets no logs
//!     webhook at all, and the last lines come only with output/completed;
//!   - output: `status:"processing"`, `output` is a **list** `["data:..."]`;
//!   - completed: `status` `succeeded` (`output` a **string** `"data:..."`), `failed` (`error`,
//!     no output) or `canceled`; `metrics` `{"predict_time": <seconds>}`.
//!   - **Order is not guaranteed**: the output and completed webhooks are sent concurrently and
//!     the `processing` output one arrived *after* `succeeded` in 5 of 20 runs (`fast`): a
//!     receiver must never let a non-terminal webhook overwrite a terminal state.
//! - **Failure**: `error` is `"Prediction failed: Prediction failed: ValueError: the prompt was
//!   refused: <prompt>"` (the prefix doubled), `logs` the lines printed before.
//! - **No input validation** without the schema `cog build` writes (`.cog/openapi_schema.json`):
//!   `Input(ge=, le=)` is not enforced, nothing is coerced (`"2"` for an int stays a string),
//!   missing inputs without default arrive as `None`, unknown fields reach the function (a
//!   `TypeError`); all of these come back as `failed` predictions, never `422`. Only a body `id`
//!   differing from the URL's gets `422`.
//! - **Webhook receiver failing**: only the completed webhook is retried, on `500` and `429`,
//!   backoff 0.2 s doubling to a 102.4 s cap: 13 deliveries over ~410 s, then "Terminal webhook
//!   failed after max retries"; a `400` is not retried. Start, logs and output webhooks are sent
//!   once, failures only logged. A dead receiver does not hold the slot.
//! - **Outputs**: a `cog.Path` output comes back inline as a data URI: `data:image/gif;base64,…`
//!   for a `.gif`, `data:text/plain;base64,…` for a `.txt`.
//! - `COG_MAX_CONCURRENCY` > 1 needs an async `run`: with the sync predictors here the server
//!   stays up with `/health-check` `{"status":"SETUP_FAILED",...}` (start panics on it).
//! - coglet makes `/tmp/coglet/predictions/<id>/{inputs,outputs}` (empty) per prediction,
//!   whatever `TMPDIR` says, and never removes them: tests should use unique ids.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long [`CogServer::start`] waits for `/health-check` to say `READY`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running coglet server for one predictor of `tests/cog/`, on a free 127.0.0.1 port.
///
/// The server and its Python worker run in their own process group, which drop kills whole.
/// Their output goes to a log file in a temporary folder that drop removes, as are the files
/// the predictor writes (`TMPDIR` points there).
pub struct CogServer {
    /// The server's base URL, `http://127.0.0.1:<port>` (no trailing slash).
    pub url: String,
    /// The port it listens on.
    pub port: u16,
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl CogServer {
    /// Starts the predictor `tests/cog/<predictor>/predict.py` (class `Predictor`) and waits
    /// until it is ready (about a second; blocks the calling thread).
    ///
    /// Panics with the server's log when it exits, reports `SETUP_FAILED` or is not ready
    /// within 30 s, and when the venv or its `cog` package is missing (run `scripts/test.sh`
    /// to install them).
    pub fn start(predictor: &str) -> CogServer {
        CogServer::start_with(predictor, &[])
    }

    /// [`CogServer::start`] with extra environment variables for the server, e.g.
    /// `("COG_MAX_CONCURRENCY", "2")` or `("COG_THROTTLE_RESPONSE_INTERVAL", "0.1")`.
    pub fn start_with(predictor: &str, env: &[(&str, &str)]) -> CogServer {
        let venv = venv();
        let folder = repository().join("tests/cog").join(predictor);
        assert!(
            folder.join("predict.py").is_file(),
            "no predictor {predictor}: {} has no predict.py",
            folder.display()
        );
        let mut last_log = String::new();
        // The port is free when picked but could be taken before the server binds it: retry.
        for _ in 0..3 {
            match CogServer::try_start(&venv, &folder, env) {
                Ok(server) => return server,
                Err(log) if log.contains("in use") => last_log = log,
                Err(log) => panic!("the Cog server for {predictor} did not start; its log:\n{log}"),
            }
        }
        panic!("the Cog server for {predictor} found no free port; its log:\n{last_log}")
    }

    fn try_start(venv: &Path, folder: &Path, env: &[(&str, &str)]) -> Result<CogServer, String> {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tasklane-cog-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary folder for the Cog server");
        let log = dir.join("server.log");
        let out = std::fs::File::create(&log).expect("the Cog server's log file");
        let port = free_port();
        let bin = venv.join("bin");
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(&p)))
                    .expect("a PATH")
            }
            None => bin.clone().into_os_string(),
        };
        let mut command = Command::new(bin.join("python"));
        command
            .args(["-m", "cog.server.http", "--host", "127.0.0.1"])
            .current_dir(folder)
            // The worker is a `python` subprocess found on PATH: the venv's must come first.
            .env("PATH", path)
            .env("COG_PREDICT_TYPE_STUB", "predict.py:Predictor")
            .env("PORT", port.to_string())
            .env("TMPDIR", &dir)
            .env_remove("VIRTUAL_ENV")
            .env_remove("PYTHONHOME")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("the log file"))
            .stderr(out);
        for (k, v) in env {
            command.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", bin.join("python").display()));
        let mut server = CogServer {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child,
            dir,
            log,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                // Drop removes the folder: read the log first.
                return Err(format!("(exited with {status})\n{}", server.log_tail()));
            }
            match health_status(port).as_deref() {
                Some("READY") => return Ok(server),
                // e.g. a sync predictor with COG_MAX_CONCURRENCY > 1: the server stays up.
                Some(failed @ ("SETUP_FAILED" | "DEFUNCT")) => panic!(
                    "the Cog server on port {port} says {failed}; its log:\n{}",
                    server.log_tail()
                ),
                _ => {}
            }
            if Instant::now() > deadline {
                panic!(
                    "the Cog server on port {port} was not READY after {READY_TIMEOUT:?}; its log:\n{}",
                    server.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far (coglet's JSON lines and the predictor's output).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id of the server, which is also its process group's id (the worker's too).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for CogServer {
    fn drop(&mut self) {
        // The whole group: the server and its Python worker (the worker outlives a server
        // killed alone).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The repository root, two folders above this crate's manifest.
fn repository() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// The test venv, with coglet installed in it; panics telling how to make it.
fn venv() -> PathBuf {
    let venv = std::env::var_os("TASKLANE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repository().join(".venv"));
    assert!(
        venv.join("bin/python").is_file(),
        "no Python venv at {} (TASKLANE_VENV or <repository>/.venv): run scripts/test.sh, \
         which installs cog (coglet) into .venv",
        venv.display()
    );
    let has_cog = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|python| {
            let site = python.path().join("site-packages");
            site.join("cog").is_dir() && site.join("coglet").is_dir()
        });
    assert!(
        has_cog,
        "the venv {} has no cog package (coglet): run scripts/test.sh, which installs \
         scripts/requirements-test.txt into .venv",
        venv.display()
    );
    venv
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `status` of `GET /health-check` (`STARTING`, `READY`, …), or `None` when there is no answer.
fn health_status(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /health-check HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (_, body) = answer.split_once("\r\n\r\n")?;
    let body: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(body["status"].as_str()?.to_owned())
}

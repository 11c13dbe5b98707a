//! The product document's flow, run by the real openai-python client against a fresh server:
//! on the built-in demo models, and with `veo3` served by a real Cog server through a model
//! catalog.
//!
//! `scripts/test.sh` installs openai-python into `.venv` and sets `TASKLANE_TEST_PYTHON`; without
//! it the tests fail (they never pass without having run).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::Server;
use tasklane_core::ports::PortResult;
use tasklane_core::task::Transition;
use tasklane_local::{Hooks, LocalConfig};
use tasklane_testkit::cog::CogServer;
use tasklane_testkit::intercept::{Interceptor, Op};

/// The Python that has openai-python, or a failure saying how to get one.
fn python() -> String {
    std::env::var("TASKLANE_TEST_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .expect(
            "TASKLANE_TEST_PYTHON is not set: this test runs examples/openai_flow.py with a Python \
             that has openai-python installed. Run scripts/test.sh, which installs it into .venv \
             and sets TASKLANE_TEST_PYTHON (or set it to such a Python yourself)",
        )
}

/// Runs `examples/openai_flow.py` against `s` and asserts it went through; returns its output.
async fn run_the_flow(s: &Server) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/openai_flow.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .env("TASKLANE_BASE_URL", &s.base)
        .env("TASKLANE_API_KEY", &s.key)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("openai-python flow: OK"), "{stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_openai_python_flow_runs_unchanged() {
    python();
    // One slow worker, so the tasks the script cancels are still queued when it does.
    let s = Server::start_with(
        |c| {
            c.workers = 1;
            c.demo_time_scale = 0.4;
        },
        Hooks::default(),
    )
    .await;
    run_the_flow(&s).await;
    s.stop().await;
}

/// A catalog serving the flow's two models: `veo3` on the Cog server at `endpoint` (the flow
/// asks for up to 20 s; the render predictor refuses more than 8, so those tasks fail there,
/// refunded, which the flow does not look at) and `echo`, a demo generator.
fn catalog(dir: &std::path::Path, endpoint: &str) -> std::path::PathBuf {
    let path = dir.join("models.toml");
    let text = format!(
        r#"
[models.veo3]
provider = "cog"
description = "Video from a prompt, on our Cog server"
endpoint = "{endpoint}"
prompt = {{ required = true, max_length = 2000 }}
duration = {{ min = 1, max = 20, default = 5 }}
price = {{ per_second = 10 }}
timeout = 120
trusted_hosts = ["127.0.0.1"]

[models.echo]
provider = "demo"
demo = "echo"
description = "The prompt back, as a text file"
price = {{ per_task = 1 }}
"#
    );
    std::fs::write(&path, text).expect("writing the catalog");
    path
}

/// Makes every start of a task (`queued -> processing`) wait first: a worker busy for
/// `delay` before each task it takes. The demo flow gets this from one slow worker; a task
/// served upstream holds no worker, so without it the flow's "a long video" has already
/// failed on Cog (20 s is over the predictor's 8) when its 0.2 s sync wait ends, and the
/// task the flow cancels could already be running there (a running task is not cancellable).
struct SlowWorker {
    delay: Duration,
}

#[async_trait]
impl Interceptor for SlowWorker {
    async fn before(&self, _op: Op) -> PortResult<()> {
        Ok(())
    }

    async fn before_update(&self, transition: &Transition) -> PortResult<()> {
        if matches!(transition, Transition::Start { .. }) {
            tokio::time::sleep(self.delay).await;
        }
        Ok(())
    }
}

/// How many times the render predictor started rendering `prompt`.
fn renders(cog: &CogServer, prompt: &str) -> usize {
    cog.log().matches(&format!("frames for '{prompt}'")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_openai_python_flow_runs_unchanged_with_veo3_on_a_cog_server() {
    python();
    let cog = CogServer::start("render");
    let models = tempfile::tempdir().expect("a folder for the catalog");
    let path = catalog(models.path(), &cog.url);
    let slow = Arc::new(SlowWorker {
        delay: Duration::from_secs(1),
    });
    let s = Server::start_with(
        |c: &mut LocalConfig| {
            c.models = Some(path);
            c.workers = 1;
        },
        tasklane_testkit::intercept::hooks(slow),
    )
    .await;
    let stdout = run_the_flow(&s).await;
    // The flow's video came from Cog, rendered once, not from the demo generator.
    assert_eq!(
        renders(&cog, "A cat walking on the beach"),
        1,
        "{stdout}\nCog's log:\n{}",
        cog.log()
    );
    assert!(stdout.contains("bytes of image/gif"), "{stdout}");
    s.stop().await;
}

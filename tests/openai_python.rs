//! The product document's flow, run by the real openai-python client against a fresh server.
//!
//! `scripts/test.sh` installs openai-python into `.venv` and sets `TASKLANE_TEST_PYTHON`; without
//! it the test fails (it never passes without having run).

mod common;

use common::Server;
use tasklane_local::Hooks;

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_openai_python_flow_runs_unchanged() {
    let python = std::env::var("TASKLANE_TEST_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .expect(
            "TASKLANE_TEST_PYTHON is not set: this test runs examples/openai_flow.py with a Python \
             that has openai-python installed. Run scripts/test.sh, which installs it into .venv \
             and sets TASKLANE_TEST_PYTHON (or set it to such a Python yourself)",
        );
    // One slow worker, so the tasks the script cancels are still queued when it does.
    let s = Server::start_with(
        |c| {
            c.workers = 1;
            c.demo_time_scale = 0.4;
        },
        Hooks::default(),
    )
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/openai_flow.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .env("TASKLANE_BASE_URL", &s.base)
        .env("TASKLANE_API_KEY", &s.key)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("openai-python flow: OK"), "{stdout}");
    s.stop().await;
}

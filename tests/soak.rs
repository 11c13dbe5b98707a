//! The soak run's history check: a seeded run under injected faults passes every check (on the
//! embedded backends, or on DynamoDB, SQS and S3 with `TASKLANE_TEST_BACKEND=aws`), and the
//! checker itself catches each kind of violation in a fabricated history.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tasklane_core::task::{Task, TaskStatus};
use tasklane_core::view::rfc3339;
use tasklane_testkit::TaskBuilder;
use tasklane_testkit::soak::{AccountState, Answer, Check, Checked, Op, Seen, SoakOptions, check};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeded_soak_run_under_faults_passes_every_check() {
    if std::env::var_os("RUST_LOG").is_some() {
        tasklane_local::init_tracing();
    }
    let tmp = tempfile::tempdir().unwrap();
    let (opts, backends) = if common::on_aws() {
        let (b, _settings) = common::aws_backends(None).await;
        let opts = SoakOptions {
            tasks: 120,
            clients: 4,
            accounts: 2,
            seed: 11,
            // Few workers and more slow tasks keep tasks queued long enough for some cancels
            // to win against the pickup (SQS hands a message to a waiting worker at once).
            workers: 2,
            slow_ratio: 0.25,
            crash: 0.03,
            ..SoakOptions::default()
        };
        (opts, Some(b))
    } else {
        let opts = SoakOptions {
            tasks: 300,
            clients: 10,
            accounts: 3,
            seed: 7,
            ..SoakOptions::default()
        };
        (opts, None)
    };
    let report = tasklane_testkit::soak::run(opts, backends, tmp.path())
        .await
        .expect("the soak run completes");
    println!("{report}");
    assert!(report.passed(), "violations:\n{report}");
    assert!(report.drained, "the drain timed out:\n{report}");
    assert_eq!(
        report.acknowledged, report.options.tasks,
        "not every submit was acknowledged:\n{report}"
    );
    // It cannot pass vacuously: faults were injected and every path was taken.
    let c = report.chaos;
    assert!(c.failed > 0, "no injected failure: {c:?}");
    assert!(c.duplicated > 0, "no duplicate delivery: {c:?}");
    assert!(c.crashed > 0, "no worker crash: {c:?}");
    assert!(report.retries > 0, "no retried request:\n{report}");
    let f = &report.checked.figures;
    assert!(
        f.cancels_acknowledged > 0,
        "no acknowledged cancel:\n{report}"
    );
    assert!(f.stored >= f.acknowledged, "{report}");
    assert!(
        report.outcomes.get("completed").copied().unwrap_or(0) > 0
            && report.outcomes.get("failed").copied().unwrap_or(0) > 0
            && report.outcomes.get("cancelled").copied().unwrap_or(0) > 0,
        "every terminal state reached: {:?}",
        report.outcomes
    );
}

// ---- the checker over fabricated histories ----

const ACCT: &str = "acct_1";

fn at(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn time(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
}

fn task(id: &str, status: TaskStatus, credits: u64, refunded: bool, done: Option<i64>) -> Task {
    let mut task = TaskBuilder::echo(ACCT)
        .id(id)
        .status(status)
        .prompt("x")
        .credits(credits)
        .refunded(refunded)
        .created_at(time(0))
        .attempts(1)
        .version(3)
        .waiting_since(None);
    if let Some(s) = done {
        task = task.completed_at(time(s));
    }
    task.build()
}

fn seen(t: &Task) -> Option<Seen> {
    Some(Seen::from_task(t))
}

fn answer(op: Op, t: &Task, key: Option<&str>, sent: u64, received: u64, http: u16) -> Answer {
    Answer {
        client: Some(0),
        op,
        key: key.map(str::to_string),
        task_id: Some(t.id.clone()),
        sent: at(sent),
        received: at(received),
        http: Some(http),
        error: None,
        seen: seen(t),
    }
}

fn account(granted: u64, credits: u64) -> AccountState {
    AccountState {
        id: ACCT.into(),
        granted,
        stored_granted: granted,
        credits,
    }
}

/// A clean history: task A submitted, polled while queued, completed (1 credit charged);
/// task B submitted, cancel acknowledged (refunded).
fn clean() -> (Vec<Answer>, Vec<Task>, Vec<AccountState>) {
    let a_queued = task("task_A", TaskStatus::Queued, 1, false, None);
    let a_done = task("task_A", TaskStatus::Completed, 1, false, Some(5));
    let b_queued = task("task_B", TaskStatus::Queued, 1, false, None);
    let b_cancelled = task("task_B", TaskStatus::Cancelled, 1, true, Some(2));
    let history = vec![
        answer(Op::Submit, &a_queued, Some("k1"), 0, 10, 202),
        answer(Op::Submit, &b_queued, Some("k2"), 20, 30, 202),
        answer(Op::Cancel, &b_cancelled, None, 31, 40, 200),
        answer(Op::Poll, &a_queued, None, 41, 50, 200),
        answer(Op::Poll, &a_done, None, 60, 70, 200),
        // A replay of k1 after the task finished names the same task.
        answer(Op::Submit, &a_done, Some("k1"), 80, 90, 202),
        answer(Op::List, &a_done, None, 100, 110, 200),
        answer(Op::List, &b_cancelled, None, 100, 110, 200),
    ];
    (history, vec![a_done, b_cancelled], vec![account(10, 9)])
}

fn only(checked: &Checked, c: Check) {
    assert!(
        checked.of(c).count() > 0,
        "{c:?} not reported: {:#?}",
        checked.violations
    );
    for v in &checked.violations {
        assert_eq!(v.check, c, "unexpected violation: {v}");
    }
}

#[test]
fn a_clean_history_passes_with_its_figures() {
    let (h, s, a) = clean();
    let checked = check(&h, &s, &a);
    assert!(checked.passed(), "{:#?}", checked.violations);
    let f = &checked.figures;
    assert_eq!(f.acknowledged, 2);
    assert_eq!(f.stored, 2);
    assert_eq!(f.cancels_acknowledged, 1);
    assert_eq!(f.refunded, 1);
    assert_eq!((f.credits, f.charged_not_refunded, f.granted), (9, 1, 10));
    assert_eq!((f.keys, f.replayed_answers), (2, 1));
}

#[test]
fn a_task_seen_completed_then_failed_is_caught() {
    let (mut h, s, a) = clean();
    let failed = task("task_A", TaskStatus::Failed, 1, true, Some(6));
    h.push(answer(Op::Poll, &failed, None, 200, 210, 200));
    let checked = check(&h, &s, &a);
    assert!(checked.of(Check::OneTerminalState).count() > 0);
    assert!(
        checked
            .of(Check::OneTerminalState)
            .all(|v| v.subject == "task_A" && v.detail.contains("completed and failed")),
        "{:#?}",
        checked.violations
    );
}

#[test]
fn a_terminal_task_read_back_as_processing_is_caught() {
    let (mut h, s, a) = clean();
    let processing = task("task_A", TaskStatus::Processing, 1, false, None);
    // Sent after the `completed` answer (received at 70) was read.
    h.push(answer(Op::Poll, &processing, None, 75, 78, 200));
    only(&check(&h, &s, &a), Check::TerminalUnchanged);
}

#[test]
fn a_read_overlapping_the_terminal_answer_is_not_a_regression() {
    let (mut h, s, a) = clean();
    let queued = task("task_A", TaskStatus::Queued, 1, false, None);
    // Sent at 65, before the `completed` answer was received (70), answered later: allowed.
    h.push(answer(Op::Poll, &queued, None, 65, 95, 200));
    let checked = check(&h, &s, &a);
    assert!(checked.passed(), "{:#?}", checked.violations);
}

#[test]
fn a_changed_completed_at_is_caught() {
    let (mut h, s, a) = clean();
    let again = task("task_A", TaskStatus::Completed, 1, false, Some(9));
    h.push(answer(Op::Poll, &again, None, 200, 210, 200));
    only(&check(&h, &s, &a), Check::TerminalUnchanged);
}

#[test]
fn a_lost_task_and_an_unfinished_one_are_caught() {
    let (h, mut s, mut a) = clean();
    // task_A vanished from the store (its credit with it), and an unknown task stays queued.
    s.retain(|t| t.id != "task_A");
    s.push(task("task_C", TaskStatus::Queued, 1, false, None));
    a[0].credits = 9;
    let checked = check(&h, &s, &a);
    let lost: Vec<_> = checked
        .of(Check::NoTaskLost)
        .map(|v| v.subject.clone())
        .collect();
    assert!(lost.contains(&"task_A".to_string()), "{lost:?}");
    assert!(lost.contains(&"task_C".to_string()), "{lost:?}");
}

#[test]
fn an_acknowledged_cancel_that_did_not_hold_is_caught() {
    let (h, mut s, _) = clean();
    // The store says task_B completed after its cancel was acknowledged (and charged it).
    s[1] = task("task_B", TaskStatus::Completed, 1, false, Some(3));
    let checked = check(&h, &s, &[account(10, 8)]);
    assert!(
        checked
            .of(Check::CancelsHeld)
            .any(|v| v.subject == "task_B"),
        "{:#?}",
        checked.violations
    );
}

#[test]
fn a_refused_cancel_that_ended_cancelled_is_caught() {
    let (mut h, mut s, _) = clean();
    let mut refused = answer(
        Op::Cancel,
        &task("task_A", TaskStatus::Completed, 1, false, Some(5)),
        None,
        72,
        73,
        409,
    );
    refused.seen = None;
    refused.error = Some("not_cancellable".into());
    h.push(refused);
    s[0] = task("task_A", TaskStatus::Cancelled, 1, true, Some(5));
    let checked = check(&h, &s, &[account(10, 10)]);
    assert!(
        checked
            .of(Check::CancelsHeld)
            .any(|v| v.subject == "task_A"),
        "{:#?}",
        checked.violations
    );
}

#[test]
fn a_refund_on_a_completed_task_is_caught() {
    let (h, mut s, _) = clean();
    s[0].cost.refunded = true;
    // The credits add up for what the store says; only the refund rule is broken.
    only(&check(&h, &s, &[account(10, 10)]), Check::Refunds);
}

#[test]
fn credits_that_do_not_add_up_are_caught() {
    let (h, s, _) = clean();
    let checked = check(&h, &s, &[account(10, 10)]);
    only(&checked, Check::Credits);
    assert!(
        checked.violations[0]
            .detail
            .contains("credits 10 + charged_not_refunded 1 = 11 != granted 10"),
        "{}",
        checked.violations[0]
    );
}

#[test]
fn one_key_answering_two_tasks_is_caught() {
    let (mut h, mut s, _) = clean();
    let other = task("task_D", TaskStatus::Completed, 1, false, Some(7));
    h.push(answer(Op::Submit, &other, Some("k1"), 120, 130, 202));
    s.push(other);
    only(&check(&h, &s, &[account(10, 8)]), Check::OneTaskPerKey);
}

#[test]
fn seen_reads_the_api_task_object() {
    let t = task("task_A", TaskStatus::Failed, 3, true, Some(4));
    let v = serde_json::json!({
        "task_id": "task_A",
        "status": "failed",
        "completed_at": rfc3339(time(4)),
        "cost": {"credits": 3, "refunded": true},
    });
    assert_eq!(Seen::from_view(&v), Some(Seen::from_task(&t)));
    assert_eq!(Seen::from_view(&serde_json::json!({"error": {}})), None);
}

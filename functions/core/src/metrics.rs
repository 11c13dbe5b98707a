//! Operational metrics as CloudWatch embedded metric format (EMF) lines.
//!
//! The core calls one function of this module at each decision point (a submit, a task's
//! first start, its end, a cancel, a webhook attempt, an upstream call). Each call writes one
//! JSON line to the installed [`MetricsSink`]; with no sink installed it does nothing.
//!
//! On AWS Lambda the sink is stdout ([`Stdout`], installed by the AWS runtime at cold start):
//! Lambda ships stdout to CloudWatch Logs, and CloudWatch Logs extracts the metrics from every
//! line that follows the specification, with no SDK call and no `cloudwatch:PutMetricData`
//! permission:
//! <https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html>,
//! <https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Lambda.html>.
//!
//! A line is a JSON object whose `_aws` member holds `Timestamp` (milliseconds since the Unix
//! epoch) and `CloudWatchMetrics`: one directive with the `Namespace` ([`namespace`]), the
//! `Dimensions` (an array of dimension sets, each an array of top-level key names; `[]` is the
//! metric without dimensions, the total) and the `Metrics` (`Name` and `Unit`). The metric
//! values and the dimension values are top-level members; every other top-level member is a
//! property, kept in the log line but not a metric (CloudWatch Logs Insights can query it).
//! Dimensions stay few (model, failure code, upstream provider and call): every distinct
//! combination is a custom metric billed monthly, so task ids are properties, never dimensions.
//!
//! The lines also carry `level` (`INFO`) and an RFC 3339 `timestamp`, which Lambda's JSON log
//! format reads for its application log level filter: a function whose log level is `WARN` or
//! stricter drops them, and with them the metrics (README, "Metrics and alarms").
//!
//! Metrics (namespace `tasklane`): `Submitted`, `QueueAge` (ms from a task's creation to its
//! first start) and `Completed` by `Model`; `Failed` by `Model` and by `Code`; `Refunded`
//! (credits given back by a failure or a cancel), `RunDuration` (ms from the first start to the
//! end), `Cancelled`; `WebhookDelivered`, `WebhookFailed`, `WebhookRetried`; `UpstreamLatency`
//! (ms of one upstream HTTP call) by `Provider` and `Call` (`start`, `check`).
//!
//! Off unless installed: `TASKLANE_METRICS=emf` turns stdout metrics on anywhere (locally they
//! would interleave with the console's log lines, so the default there is off),
//! `TASKLANE_METRICS=off` turns them off on AWS.

use std::io::Write;
use std::sync::{Arc, OnceLock, RwLock};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::config::ConfigError;
use crate::task::{AfterAttempt, Task, TaskStatus};

/// The CloudWatch namespace of every metric, unless [`NAMESPACE_ENV`] names another.
pub const NAMESPACE: &str = "tasklane";

/// The environment variable naming another namespace: template.yaml sets it to
/// `tasklane/<stack name>`, so two stacks in one account and Region (dev and prod) do not add
/// up in one metric, or set off each other's alarms.
pub const NAMESPACE_ENV: &str = "TASKLANE_METRICS_NAMESPACE";

/// The namespace lines are written with: [`NAMESPACE_ENV`], or [`NAMESPACE`].
pub fn namespace() -> &'static str {
    static NS: OnceLock<String> = OnceLock::new();
    NS.get_or_init(|| match std::env::var(NAMESPACE_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => NAMESPACE.to_string(),
    })
}

/// The environment variable that turns metrics on (`emf`) or off (`off`).
pub const ENV: &str = "TASKLANE_METRICS";

/// Where metric lines go.
pub trait MetricsSink: Send + Sync {
    /// Writes one EMF line (a JSON object without its newline).
    fn emit(&self, line: &str);
}

/// Writes each line to stdout, newline-terminated, in one write under stdout's lock (so it
/// never interleaves with a log line).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stdout;

impl MetricsSink for Stdout {
    fn emit(&self, line: &str) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&buf);
        let _ = out.flush();
    }
}

/// Whether metrics are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsMode {
    /// No metrics.
    Off,
    /// EMF lines on stdout.
    Emf,
}

impl MetricsMode {
    /// `value` of [`ENV`] (`emf` or `off`, any case), `default` when unset or empty; anything
    /// else is an error naming the variable.
    pub fn parse(value: Option<&str>, default: MetricsMode) -> Result<MetricsMode, ConfigError> {
        match value.map(str::trim) {
            None | Some("") => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "emf" => Ok(MetricsMode::Emf),
                "off" => Ok(MetricsMode::Off),
                _ => Err(ConfigError(format!(
                    "{ENV}={v:?} is not valid: use emf or off"
                ))),
            },
        }
    }

    /// [`MetricsMode::parse`] of the environment's [`ENV`].
    pub fn from_env(default: MetricsMode) -> Result<MetricsMode, ConfigError> {
        let value = std::env::var(ENV).ok();
        MetricsMode::parse(value.as_deref(), default)
    }
}

type Slot = RwLock<Option<Arc<dyn MetricsSink>>>;

static SINK: OnceLock<Slot> = OnceLock::new();

fn slot() -> &'static Slot {
    // Not installed explicitly: `TASKLANE_METRICS` decides, off by default (an invalid value
    // is off too; the AWS runtime validates it at cold start through `init`).
    SINK.get_or_init(|| {
        let mode = MetricsMode::from_env(MetricsMode::Off).unwrap_or(MetricsMode::Off);
        RwLock::new(sink_for(mode))
    })
}

fn sink_for(mode: MetricsMode) -> Option<Arc<dyn MetricsSink>> {
    match mode {
        MetricsMode::Off => None,
        MetricsMode::Emf => Some(Arc::new(Stdout)),
    }
}

/// Installs `sink` for the whole process (`None`: metrics off).
pub fn set_sink(sink: Option<Arc<dyn MetricsSink>>) {
    let slot = slot();
    match slot.write() {
        Ok(mut s) => *s = sink,
        Err(poisoned) => *poisoned.into_inner() = sink,
    }
}

/// Installs the sink [`ENV`] asks for, `default` when it is unset; returns the mode, or an
/// error naming the variable.
pub fn init(default: MetricsMode) -> Result<MetricsMode, ConfigError> {
    let mode = MetricsMode::from_env(default)?;
    set_sink(sink_for(mode));
    Ok(mode)
}

/// Whether a sink is installed.
pub fn enabled() -> bool {
    slot().read().map(|s| s.is_some()).unwrap_or(false)
}

/// A metric's unit, as CloudWatch names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `Count`.
    Count,
    /// `Milliseconds`.
    Milliseconds,
    /// `None` (a plain number, e.g. credits).
    None,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::None => "None",
        }
    }
}

/// One EMF event: metrics, their dimension sets, the dimensions' values and properties.
#[derive(Debug, Clone, Default)]
pub struct Event {
    dimension_sets: Vec<Vec<&'static str>>,
    metrics: Vec<(&'static str, Unit, f64)>,
    members: Map<String, Value>,
}

impl Event {
    /// An event whose metrics are aggregated by each of `sets` (`&[]` in it: the total).
    pub fn new(sets: &[&[&'static str]]) -> Event {
        Event {
            dimension_sets: sets.iter().map(|s| s.to_vec()).collect(),
            ..Event::default()
        }
    }

    /// Adds metric `name` with `value`.
    pub fn metric(mut self, name: &'static str, unit: Unit, value: f64) -> Event {
        self.members.insert(name.to_string(), json!(value));
        self.metrics.push((name, unit, value));
        self
    }

    /// Sets dimension `name` (a string, as EMF requires).
    pub fn dimension(mut self, name: &'static str, value: &str) -> Event {
        self.members.insert(name.to_string(), json!(value));
        self
    }

    /// Adds a property (not a metric: kept in the line, e.g. a task id).
    pub fn property(mut self, name: &'static str, value: impl Into<Value>) -> Event {
        self.members.insert(name.to_string(), value.into());
        self
    }

    /// The event as one EMF line, timestamped `at`.
    pub fn line(&self, at: DateTime<Utc>) -> String {
        let mut root = self.members.clone();
        let metrics: Vec<Value> = self
            .metrics
            .iter()
            .map(|(name, unit, _)| json!({"Name": name, "Unit": unit.as_str()}))
            .collect();
        root.insert(
            "_aws".into(),
            json!({
                "Timestamp": at.timestamp_millis(),
                "CloudWatchMetrics": [{
                    "Namespace": namespace(),
                    "Dimensions": self.dimension_sets,
                    "Metrics": metrics,
                }],
            }),
        );
        root.insert("level".into(), json!("INFO"));
        root.insert(
            "timestamp".into(),
            json!(at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        Value::Object(root).to_string()
    }

    /// Writes the event to the installed sink, if any.
    pub fn emit(self) {
        let sink = slot().read().ok().and_then(|s| s.clone());
        if let Some(sink) = sink {
            sink.emit(&self.line(Utc::now()));
        }
    }
}

fn millis(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64
}

/// A task was submitted: `Submitted` by model.
pub fn submitted(task: &Task) {
    Event::new(&[&["Model"], &[]])
        .metric("Submitted", Unit::Count, 1.0)
        .dimension("Model", &task.model)
        .property("task_id", task.id.as_str())
        .property("credits", task.cost.credits)
        .emit();
}

/// `claimed` is `before` moved to processing: on its first start, `QueueAge` by model (ms
/// from its creation to the start). Later attempts (a takeover, a deferred upstream start)
/// change nothing.
pub fn started(before: &Task, claimed: &Task) {
    let (None, Some(at)) = (before.started_at, claimed.started_at) else {
        return;
    };
    Event::new(&[&["Model"], &[]])
        .metric(
            "QueueAge",
            Unit::Milliseconds,
            millis(claimed.created_at, at),
        )
        .dimension("Model", &claimed.model)
        .property("task_id", claimed.id.as_str())
        .emit();
}

/// A task ended as `task`: `Completed` by model, or `Failed` by model and by failure code with
/// the credits `Refunded`; `RunDuration` (first start to end) either way.
pub fn finished(task: &Task) {
    let run = match (task.started_at, task.completed_at) {
        (Some(s), Some(e)) => Some(millis(s, e)),
        _ => None,
    };
    let event = match task.status {
        TaskStatus::Completed => {
            Event::new(&[&["Model"], &[]]).metric("Completed", Unit::Count, 1.0)
        }
        TaskStatus::Failed => {
            let code = task.error.as_ref().map_or("unknown", |e| e.code.as_str());
            let refunded = if task.cost.refunded {
                task.cost.credits
            } else {
                0
            };
            Event::new(&[&["Model"], &["Code"], &[]])
                .metric("Failed", Unit::Count, 1.0)
                .metric("Refunded", Unit::None, refunded as f64)
                .dimension("Code", code)
        }
        TaskStatus::Cancelled => return cancelled(task),
        TaskStatus::Queued | TaskStatus::Processing => return,
    };
    let event = match run {
        Some(ms) => event.metric("RunDuration", Unit::Milliseconds, ms),
        None => event,
    };
    event
        .dimension("Model", &task.model)
        .property("task_id", task.id.as_str())
        .emit();
}

/// A queued task was cancelled: `Cancelled` and the credits `Refunded`, by model.
pub fn cancelled(task: &Task) {
    let refunded = if task.cost.refunded {
        task.cost.credits
    } else {
        0
    };
    Event::new(&[&["Model"], &[]])
        .metric("Cancelled", Unit::Count, 1.0)
        .metric("Refunded", Unit::None, refunded as f64)
        .dimension("Model", &task.model)
        .property("task_id", task.id.as_str())
        .emit();
}

/// Webhook attempt `attempt` of task `task_id` got `status_code` and is followed by `next`:
/// `WebhookDelivered`, `WebhookFailed` (given up) or `WebhookRetried`.
pub fn webhook(task_id: &str, attempt: u32, status_code: Option<u16>, next: &AfterAttempt) {
    let name = match next {
        AfterAttempt::Delivered => "WebhookDelivered",
        AfterAttempt::Failed => "WebhookFailed",
        AfterAttempt::Retry(_) => "WebhookRetried",
    };
    Event::new(&[&[]])
        .metric(name, Unit::Count, 1.0)
        .property("task_id", task_id)
        .property("attempt", attempt)
        .property("status_code", status_code)
        .emit();
}

/// Awaits `call`, an upstream HTTP call (`start` or `check`) of `provider` for task `task_id`,
/// and records how long it took: `UpstreamLatency` by provider and call, with the outcome
/// (`ok` or `error`) as a property.
pub async fn upstream<T, E, F>(
    provider: &str,
    call: &'static str,
    task_id: &str,
    fut: F,
) -> F::Output
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let began = std::time::Instant::now();
    let out = fut.await;
    let ms = began.elapsed().as_secs_f64() * 1000.0;
    Event::new(&[&["Provider", "Call"], &["Provider"]])
        .metric("UpstreamLatency", Unit::Milliseconds, ms)
        .dimension("Provider", provider)
        .dimension("Call", call)
        .property("task_id", task_id)
        .property("outcome", if out.is_ok() { "ok" } else { "error" })
        .emit();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Value {
        let v: Value = serde_json::from_str(line).expect("an EMF line is JSON");
        assert!(v.is_object(), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
        v
    }

    #[test]
    fn an_event_is_one_emf_line_with_its_directive_values_and_properties() {
        let at = DateTime::parse_from_rfc3339("2026-11-30T12:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let line = Event::new(&[&["Model"], &["Code"], &[]])
            .metric("Failed", Unit::Count, 1.0)
            .metric("Refunded", Unit::None, 50.0)
            .dimension("Model", "veo3")
            .dimension("Code", "timeout")
            .property("task_id", "task_01JAAAAAAAAAAAAAAAAAAAAAAA")
            .line(at);
        let v = parse(&line);
        let aws = &v["_aws"];
        assert_eq!(aws["Timestamp"], json!(at.timestamp_millis()));
        assert_eq!(aws["Timestamp"], json!(1_796_040_000_123_i64));
        let d = &aws["CloudWatchMetrics"][0];
        assert_eq!(aws["CloudWatchMetrics"].as_array().unwrap().len(), 1);
        assert_eq!(d["Namespace"], "tasklane");
        assert_eq!(d["Dimensions"], json!([["Model"], ["Code"], []]));
        assert_eq!(
            d["Metrics"],
            json!([
                {"Name": "Failed", "Unit": "Count"},
                {"Name": "Refunded", "Unit": "None"}
            ])
        );
        // Values and dimension values at the top level, as the specification requires.
        assert_eq!(v["Failed"], json!(1.0));
        assert_eq!(v["Refunded"], json!(50.0));
        assert_eq!(v["Model"], "veo3");
        assert_eq!(v["Code"], "timeout");
        assert_eq!(v["task_id"], "task_01JAAAAAAAAAAAAAAAAAAAAAAA");
        // Lambda's JSON log format reads these.
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["timestamp"], "2026-11-30T12:00:00.123000Z");
        // Every dimension a set names is a string member of the line.
        for set in d["Dimensions"].as_array().unwrap() {
            for key in set.as_array().unwrap() {
                assert!(v[key.as_str().unwrap()].is_string(), "{key}");
            }
        }
    }

    #[test]
    fn the_core_events_name_their_metrics_and_keep_task_ids_out_of_the_dimensions() {
        let sink = Arc::new(Capture::default());
        set_sink(Some(sink.clone()));
        let created = DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let input = crate::task::TaskInput {
            prompt: None,
            duration: None,
            params: Map::new(),
        };
        let id = "task_01KB0000000000000000000001";
        let queued = Task::queued(id.into(), "acct", "veo3", input, 50, created);
        submitted(&queued);
        let mut claimed = queued.clone();
        claimed.status = TaskStatus::Processing;
        claimed.started_at = Some(created + chrono::Duration::milliseconds(1500));
        started(&queued, &claimed);
        started(&claimed, &claimed); // a later attempt: no second QueueAge
        let mut failed = claimed.clone();
        failed.status = TaskStatus::Failed;
        failed.completed_at = Some(created + chrono::Duration::milliseconds(4000));
        failed.cost.refunded = true;
        failed.error = Some(crate::task::TaskFailure {
            code: "timeout".into(),
            message: "too slow".into(),
        });
        finished(&failed);
        webhook(
            id,
            0,
            Some(503),
            &AfterAttempt::Retry(std::time::Duration::from_secs(5)),
        );
        set_sink(None);
        let lines: Vec<Value> = sink
            .lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| parse(l))
            .filter(|v| v["task_id"] == id)
            .collect();
        let names: Vec<String> = lines
            .iter()
            .map(|v| {
                let m = &v["_aws"]["CloudWatchMetrics"][0]["Metrics"];
                m.as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["Name"].as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join("+")
            })
            .collect();
        assert_eq!(
            names,
            [
                "Submitted",
                "QueueAge",
                "Failed+Refunded+RunDuration",
                "WebhookRetried"
            ]
        );
        assert_eq!(lines[0]["Model"], "veo3");
        assert_eq!(lines[1]["QueueAge"], json!(1500.0));
        assert_eq!(lines[2]["Code"], "timeout");
        assert_eq!(lines[2]["Refunded"], json!(50.0));
        assert_eq!(lines[2]["RunDuration"], json!(2500.0));
        assert_eq!(lines[3]["status_code"], 503);
        for v in &lines {
            let dims = v["_aws"]["CloudWatchMetrics"][0]["Dimensions"].to_string();
            assert!(!dims.contains("task_id"), "{dims}");
            assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Namespace"], "tasklane");
        }
    }

    #[derive(Default)]
    struct Capture {
        lines: std::sync::Mutex<Vec<String>>,
    }

    impl MetricsSink for Capture {
        fn emit(&self, line: &str) {
            self.lines.lock().unwrap().push(line.to_string());
        }
    }

    #[test]
    fn the_mode_is_emf_or_off_and_anything_else_names_the_variable() {
        use MetricsMode::*;
        assert_eq!(MetricsMode::parse(None, Off).unwrap(), Off);
        assert_eq!(MetricsMode::parse(None, Emf).unwrap(), Emf);
        assert_eq!(MetricsMode::parse(Some(""), Emf).unwrap(), Emf);
        assert_eq!(MetricsMode::parse(Some("EMF"), Off).unwrap(), Emf);
        assert_eq!(MetricsMode::parse(Some(" off "), Emf).unwrap(), Off);
        let e = MetricsMode::parse(Some("statsd"), Off).unwrap_err();
        assert!(e.to_string().contains("TASKLANE_METRICS"), "{e}");
    }
}

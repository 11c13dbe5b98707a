//! template.yaml keeps the limits that let it deploy on a new account and protect itself
//! (README, "Running on AWS at scale" / "Limits the template sets"):
//!
//! - no `ReservedConcurrentExecutions` (CloudFormation refuses it on an account whose
//!   unreserved concurrency would fall under 100, as on new accounts);
//! - stage throttling on the HTTP API (`DefaultRouteSettings`) from parameters whose defaults
//!   and maxima stay within API Gateway's account-level quota (10,000 requests/s, burst 5,000);
//! - every SQS queue that triggers a function hides a received message for at least six times
//!   that function's timeout (AWS's recommendation for SQS event sources);
//! - the sync-wait cap's largest value, plus the last AWS call of the wait, plus the answer,
//!   stays well under API Gateway's 30-second integration timeout;
//! - every function's AWS call timeout (`TASKLANE_AWS_TIMEOUT`) is below its own timeout.
//!
//! The template is read with a small reader of the YAML it uses (block mappings and lists,
//! folded scalars, comments); the CloudFormation tags (`!Ref X`) stay in the values as text.

use std::path::{Path, PathBuf};

/// API Gateway's default account-level throttling quota per Region (requests per second).
const ACCOUNT_RATE_QUOTA: f64 = 10_000.0;
/// API Gateway's default account-level burst quota per Region.
const ACCOUNT_BURST_QUOTA: f64 = 5_000.0;
/// API Gateway's integration timeout in seconds: 30 for an HTTP API, 29 by default for a REST
/// API; the smaller, so the template stays right behind either.
const INTEGRATION_TIMEOUT: f64 = 29.0;
/// Seconds a waiting request keeps spare under the integration timeout, after the cap, the
/// last AWS call and the answer.
const SPARE: f64 = 2.0;
/// Time to build the answer after the last read (a view and presigned URLs): generous.
const ANSWER: f64 = 1.0;

fn template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../template.yaml")
}

/// One `key: value` line of the template.
#[derive(Debug, Clone)]
struct Entry {
    /// Column of the key (a list item's `- ` counts as indentation).
    indent: usize,
    key: String,
    /// The value on the key's line, without quotes or a trailing comment; empty for a block.
    value: String,
    line: usize,
}

struct Template {
    entries: Vec<Entry>,
    text: String,
}

impl Template {
    fn read() -> Template {
        let path = template_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut entries = Vec::new();
        // A block scalar (`>-`, `|`) swallows every line indented deeper than its key.
        let mut scalar_of: Option<usize> = None;
        for (n, raw) in text.lines().enumerate() {
            let trimmed = raw.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let mut indent = raw.len() - trimmed.len();
            if let Some(col) = scalar_of {
                if indent > col {
                    continue;
                }
                scalar_of = None;
            }
            let mut body = trimmed;
            while let Some(rest) = body.strip_prefix("- ") {
                indent += 2;
                body = rest.trim_start();
            }
            let Some((key, value)) = body.split_once(':') else {
                continue;
            };
            if key.contains(' ') && !key.starts_with('"') || key.starts_with('{') {
                continue;
            }
            if !(value.is_empty() || value.starts_with(' ')) {
                continue;
            }
            let value = strip_comment(value.trim());
            if matches!(value, ">" | ">-" | "|" | "|-") {
                scalar_of = Some(indent);
            }
            entries.push(Entry {
                indent,
                key: key.trim_matches('"').to_string(),
                value: value.trim_matches('"').to_string(),
                line: n + 1,
            });
        }
        Template { entries, text }
    }

    /// The direct children of entry `at` (`None`: the top level).
    fn children(&self, at: Option<usize>) -> Vec<usize> {
        let (start, floor) = match at {
            Some(i) => (i + 1, Some(self.entries[i].indent)),
            None => (0, None),
        };
        let mut out = Vec::new();
        let mut level = None;
        for i in start..self.entries.len() {
            let indent = self.entries[i].indent;
            if floor.is_some_and(|f| indent <= f) {
                break;
            }
            match level {
                None => {
                    level = Some(indent);
                    out.push(i);
                }
                Some(l) if indent == l => out.push(i),
                Some(l) if indent < l => break,
                _ => {}
            }
        }
        out
    }

    /// The entry at `path` under `at`.
    fn find(&self, at: Option<usize>, path: &[&str]) -> Option<usize> {
        let mut at = at;
        for key in path {
            at = Some(
                self.children(at)
                    .into_iter()
                    .find(|&i| self.entries[i].key == *key)?,
            );
        }
        at
    }

    fn value(&self, at: Option<usize>, path: &[&str]) -> Option<&str> {
        self.find(at, path).map(|i| self.entries[i].value.as_str())
    }

    fn resource(&self, name: &str) -> usize {
        self.find(None, &["Resources", name])
            .unwrap_or_else(|| panic!("template.yaml has no resource {name}"))
    }

    /// The resources of `kind`, by name.
    fn resources(&self, kind: &str) -> Vec<(String, usize)> {
        let top = self
            .find(None, &["Resources"])
            .expect("a Resources section");
        self.children(Some(top))
            .into_iter()
            .filter(|&i| self.value(Some(i), &["Type"]) == Some(kind))
            .map(|i| (self.entries[i].key.clone(), i))
            .collect()
    }

    /// A parameter's `field` (Default, MaxValue…) as a number.
    fn parameter(&self, name: &str, field: &str) -> f64 {
        let v = self
            .value(None, &["Parameters", name, field])
            .unwrap_or_else(|| panic!("parameter {name} has no {field}"));
        v.parse()
            .unwrap_or_else(|_| panic!("parameter {name}'s {field} is not a number: {v:?}"))
    }

    /// A number, or a `!Ref` to a parameter (its `field`: Default or MaxValue).
    fn number(&self, value: &str, field: &str) -> f64 {
        match value.strip_prefix("!Ref ") {
            Some(p) => self.parameter(p.trim(), field),
            None => value
                .parse()
                .unwrap_or_else(|_| panic!("not a number or a !Ref: {value:?}")),
        }
    }

    /// A function's property, or the Globals' one.
    fn function_value(&self, function: usize, path: &[&str]) -> Option<String> {
        let mut own = vec!["Properties"];
        own.extend_from_slice(path);
        let mut global = vec!["Globals", "Function"];
        global.extend_from_slice(path);
        self.value(Some(function), &own)
            .or_else(|| self.value(None, &global))
            .map(str::to_string)
    }

    /// A function's timeout in seconds (its own, or the Globals').
    fn function_timeout(&self, function: usize) -> f64 {
        let t = self
            .function_value(function, &["Timeout"])
            .expect("a Timeout on the function or in Globals");
        self.number(&t, "Default")
    }

    /// A function's AWS call timeout (`TASKLANE_AWS_TIMEOUT`, its own or the Globals').
    fn aws_call_timeout(&self, function: usize) -> f64 {
        let t = self
            .function_value(
                function,
                &["Environment", "Variables", "TASKLANE_AWS_TIMEOUT"],
            )
            .expect("TASKLANE_AWS_TIMEOUT on the function or in Globals");
        t.parse()
            .unwrap_or_else(|_| panic!("TASKLANE_AWS_TIMEOUT is not a number: {t:?}"))
    }
}

fn strip_comment(value: &str) -> &str {
    match value.find(" #") {
        Some(i) if !value.starts_with('"') => value[..i].trim_end(),
        _ => value,
    }
}

#[test]
fn no_function_reserves_concurrency() {
    let t = Template::read();
    let found: Vec<usize> = t
        .entries
        .iter()
        .filter(|e| e.key == "ReservedConcurrentExecutions")
        .map(|e| e.line)
        .collect();
    assert!(
        found.is_empty(),
        "template.yaml sets ReservedConcurrentExecutions (lines {found:?}): CloudFormation \
         refuses it on accounts whose unreserved concurrency would fall under 100"
    );
    // The reader saw the functions at all (a broken reader must not pass this vacuously).
    assert!(t.resources("AWS::Serverless::Function").len() >= 9);
    assert!(t.text.contains("SweeperFunction:"));
}

#[test]
fn the_api_stage_is_throttled_within_the_account_quota() {
    let t = Template::read();
    let api = t.resource("Api");
    for (field, quota) in [
        ("ThrottlingRateLimit", ACCOUNT_RATE_QUOTA),
        ("ThrottlingBurstLimit", ACCOUNT_BURST_QUOTA),
    ] {
        let v = t
            .value(Some(api), &["Properties", "DefaultRouteSettings", field])
            .unwrap_or_else(|| panic!("the HTTP API has no DefaultRouteSettings.{field}"));
        let default = t.number(v, "Default");
        let max = t.number(v, "MaxValue");
        assert!(
            default >= 1.0 && default < quota,
            "{field} defaults to {default}: it must throttle below the account's {quota}"
        );
        assert!(
            max <= quota,
            "{field} may be set to {max}, over the account's {quota}"
        );
    }
}

#[test]
fn every_sqs_trigger_hides_a_message_six_times_its_function_timeout() {
    let t = Template::read();
    let mut checked = 0;
    for (name, function) in t.resources("AWS::Serverless::Function") {
        let Some(events) = t.find(Some(function), &["Properties", "Events"]) else {
            continue;
        };
        for event in t.children(Some(events)) {
            if t.value(Some(event), &["Type"]) != Some("SQS") {
                continue;
            }
            let queue_ref = t
                .value(Some(event), &["Properties", "Queue"])
                .expect("an SQS event's Queue");
            let queue = queue_ref
                .strip_prefix("!GetAtt ")
                .and_then(|q| q.strip_suffix(".Arn"))
                .unwrap_or_else(|| panic!("{name}: Queue is not !GetAtt <queue>.Arn: {queue_ref}"));
            let queue_at = t.resource(queue);
            // SQS's default visibility timeout is 30 s.
            let visibility = t
                .value(Some(queue_at), &["Properties", "VisibilityTimeout"])
                .map_or(30.0, |v| t.number(v, "Default"));
            let timeout = t.function_timeout(function);
            assert!(
                visibility >= 6.0 * timeout,
                "{queue} hides a message {visibility} s, less than 6 x {name}'s {timeout} s timeout"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "only {checked} SQS event sources found (the processor and the dead-letter function)"
    );
}

#[test]
fn the_sync_wait_cap_answers_well_under_the_integration_timeout() {
    let t = Template::read();
    let cap = t.parameter("SyncWaitCapSeconds", "MaxValue");
    for name in ["SyncWaitFunction", "SubmitFunction"] {
        let f = t.resource(name);
        let last_call = t.aws_call_timeout(f);
        let total = cap + last_call + ANSWER;
        assert!(
            total + SPARE <= INTEGRATION_TIMEOUT,
            "{name}: a wait of {cap} s, a last AWS call of {last_call} s and {ANSWER} s to \
             answer take {total} s: too close to API Gateway's {INTEGRATION_TIMEOUT} s"
        );
        let timeout = t.function_timeout(f);
        assert!(
            total < timeout,
            "{name}: its {timeout} s timeout ends the answer ({total} s)"
        );
    }
}

#[test]
fn every_aws_call_ends_before_its_function_does() {
    let t = Template::read();
    for (name, function) in t.resources("AWS::Serverless::Function") {
        let call = t.aws_call_timeout(function);
        let timeout = t.function_timeout(function);
        assert!(
            call > 0.0 && call <= timeout / 2.0,
            "{name}: an AWS call may take {call} s, over half its {timeout} s timeout"
        );
    }
}

impl Template {
    /// Every entry inside entry `at` (its whole block), in order.
    fn subtree(&self, at: usize) -> impl Iterator<Item = &Entry> {
        let floor = self.entries[at].indent;
        self.entries[at + 1..]
            .iter()
            .take_while(move |e| e.indent > floor)
    }

    /// Whether some entry inside `at` is `key: value`.
    fn has(&self, at: usize, key: &str, value: &str) -> bool {
        self.subtree(at).any(|e| e.key == key && e.value == value)
    }

    /// The alarms on `metric` of `namespace` (a plain alarm or one of a metric-math alarm's
    /// metrics) that name `dimension_value`, when given.
    fn alarms_on(
        &self,
        namespace: &str,
        metric: &str,
        dimension_value: Option<&str>,
    ) -> Vec<String> {
        self.resources("AWS::CloudWatch::Alarm")
            .into_iter()
            .filter(|&(_, i)| {
                self.has(i, "Namespace", namespace)
                    && self.has(i, "MetricName", metric)
                    && dimension_value.is_none_or(|v| self.has(i, "Value", v))
            })
            .map(|(name, _)| name)
            .collect()
    }
}

/// The alarms notify the operator's topic when one is given (README, "Metrics and alarms").
fn assert_notifies_the_alarm_topic(t: &Template, alarm: &str) {
    let at = t.resource(alarm);
    let actions = t
        .value(Some(at), &["Properties", "AlarmActions"])
        .unwrap_or_else(|| panic!("{alarm} has no AlarmActions"));
    assert!(
        actions.contains("HasAlarmTopic") && actions.contains("!Ref AlarmTopicArn"),
        "{alarm} does not notify AlarmTopicArn when it is set: {actions}"
    );
}

#[test]
fn every_function_has_an_errors_and_a_throttles_alarm_that_notifies_the_alarm_topic() {
    let t = Template::read();
    let functions = t.resources("AWS::Serverless::Function");
    assert!(functions.len() >= 9, "the reader found the functions");
    for (name, _) in &functions {
        for metric in ["Errors", "Throttles"] {
            let alarms = t.alarms_on("AWS/Lambda", metric, Some(&format!("!Ref {name}")));
            assert!(
                !alarms.is_empty(),
                "{name} has no alarm on its {metric} (AWS/Lambda, FunctionName: !Ref {name})"
            );
            for alarm in alarms {
                assert_notifies_the_alarm_topic(&t, &alarm);
            }
        }
    }
}

#[test]
fn the_queue_age_dead_letters_5xx_and_task_failures_raise_alarms() {
    let t = Template::read();
    let wanted = [
        (
            "AWS/SQS",
            "ApproximateAgeOfOldestMessage",
            Some("!GetAtt WorkQueue.QueueName"),
        ),
        (
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            Some("!GetAtt WorkDeadLetterQueue.QueueName"),
        ),
        ("AWS/ApiGateway", "5xx", Some("!Ref Api")),
        // The EMF metrics, in the namespace the functions are told to write to.
        ("!Sub tasklane/${AWS::StackName}", "Failed", None),
    ];
    for (namespace, metric, dimension) in wanted {
        let alarms = t.alarms_on(namespace, metric, dimension);
        assert!(
            !alarms.is_empty(),
            "no alarm on {namespace} {metric} {dimension:?}"
        );
        for alarm in alarms {
            assert_notifies_the_alarm_topic(&t, &alarm);
        }
    }
    assert_eq!(
        t.value(
            None,
            &[
                "Globals",
                "Function",
                "Environment",
                "Variables",
                "TASKLANE_METRICS_NAMESPACE"
            ]
        ),
        Some("!Sub tasklane/${AWS::StackName}"),
        "the functions write their metrics where the alarms read them"
    );
    assert_eq!(
        t.value(
            None,
            &[
                "Globals",
                "Function",
                "Environment",
                "Variables",
                "TASKLANE_METRICS"
            ]
        ),
        Some("emf")
    );
}

#[test]
fn the_dashboard_shows_the_task_metrics_and_every_function() {
    let t = Template::read();
    let dashboards = t.resources("AWS::CloudWatch::Dashboard");
    assert_eq!(dashboards.len(), 1, "one dashboard");
    let (name, at) = &dashboards[0];
    let key = &t.entries[t
        .find(Some(*at), &["Properties", "DashboardBody"])
        .unwrap_or_else(|| panic!("{name} has no DashboardBody"))];
    assert_eq!(key.value, "!Sub |", "the body is a !Sub block");
    // The block: every line after the key indented deeper than it.
    let body: Vec<&str> = t
        .text
        .lines()
        .skip(key.line)
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key.indent)
        .collect();
    // CloudFormation substitutes ${...}; what is left must be JSON.
    let mut json = String::new();
    let mut rest = body.join("\n");
    while let Some(i) = rest.find("${") {
        json.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("a closed ${...}") + i;
        json.push_str("SUB");
        rest = rest[end + 1..].to_string();
    }
    json.push_str(&rest);
    let body: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("the dashboard body is not JSON ({e}):\n{json}"));
    let widgets = body["widgets"].as_array().expect("widgets");
    let text = body.to_string();
    for metric in [
        "Submitted",
        "Completed",
        "Failed",
        "Refunded",
        "QueueAge",
        "RunDuration",
        "UpstreamLatency",
        "WebhookDelivered",
        "WebhookFailed",
        "WebhookRetried",
        "ApproximateAgeOfOldestMessage",
        "5xx",
    ] {
        assert!(
            text.contains(&format!("\"{metric}\"")) || text.contains(&format!("\\\"{metric}\\\"")),
            "the dashboard does not show {metric}"
        );
    }
    for (function, _) in t.resources("AWS::Serverless::Function") {
        let reference = format!("\"${{{function}}}\"");
        let shown = t
            .text
            .lines()
            .skip(key.line)
            .take(body_len(&t, key))
            .filter(|l| l.contains(&reference))
            .count();
        assert!(
            shown >= 2,
            "the dashboard shows {function}'s errors and throttles ({shown} lines name it)"
        );
    }
    assert!(widgets.len() >= 6, "{} widgets", widgets.len());
}

/// Lines of the block scalar under `key`.
fn body_len(t: &Template, key: &Entry) -> usize {
    t.text
        .lines()
        .skip(key.line)
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key.indent)
        .count()
}

#[test]
fn the_indexes_project_only_what_their_readers_need() {
    // A write that changes no projected attribute writes no index entry; with `ALL`, every
    // progress write, lease renewal and credit change also rewrote the item's index copies.
    let t = Template::read();
    let table = t.resource("TasksTable");
    let gsis = t
        .find(Some(table), &["Properties", "GlobalSecondaryIndexes"])
        .expect("the table has GlobalSecondaryIndexes");
    let mut seen = Vec::new();
    let mut index = String::new();
    for child in t.children(Some(gsis)) {
        let e = &t.entries[child];
        match e.key.as_str() {
            "IndexName" => index = e.value.clone(),
            "Projection" => {
                let kind = t.value(Some(child), &["ProjectionType"]).unwrap_or("");
                let attrs = t.value(Some(child), &["NonKeyAttributes"]).unwrap_or("");
                seen.push((index.clone(), kind.to_string(), attrs.to_string()));
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        vec![
            ("GSI1".into(), "INCLUDE".into(), "[status, model]".into()),
            ("GSI2".into(), "KEYS_ONLY".into(), String::new()),
        ]
    );
}

//! Workflow definitions: the declarative schema (YAML or JSON), parsing, and
//! validation that reports every problem with the step and field at fault.
//!
//! A definition is a DAG of steps (`needs`). A step may run only `when` a CEL
//! condition holds, map its `input` with CEL, retry with backoff, time out,
//! and hand a failure (`on_failure`) or a signal timeout (`on_timeout`) to a
//! handler step that takes its place.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::expr;

/// Most steps one definition may hold.
pub const STEPS_MAX: usize = 200;
/// Largest definition document, in bytes.
pub const DEFINITION_BYTES_MAX: usize = 256 * 1024;
/// Longest definition name, step id, handler or signal name, in bytes.
pub const NAME_LEN_MAX: usize = 128;
/// Most attempts a retry policy may ask for.
pub const ATTEMPTS_MAX: u32 = 100;
/// Longest step timeout of a task or HTTP step (1 hour).
pub const TASK_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Longest delay or signal wait (366 days).
pub const WAIT_MS_MAX: u64 = 366 * 24 * 3_600_000;

/// A workflow definition as a client publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub steps: Vec<Step>,
    /// The instance's output: a CEL mapping over `input` and `steps`.
    /// Default: the output of the only final step, or an object of the final
    /// steps' outputs by step id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// One node of a definition. Which fields apply depends on `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    /// Steps that must finish (completed or skipped) before this one runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// A CEL condition; the step is skipped when it is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// A CEL mapping producing the step's input: a string expression, or an
    /// object (or array) whose string leaves are expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Retries of a task or HTTP step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Bound on one attempt (task, HTTP) or on the wait (wait_signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Step that runs in this one's place when it fails for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,

    /// task: the handler to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// task: run by an external worker over HTTP (fetch-and-lock) instead of
    /// the queues.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,

    /// http: the URL to call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// http: GET, POST (default), PUT, PATCH or DELETE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// http: extra request headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,

    /// delay: how long to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,

    /// wait_signal: the signal's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// wait_signal: step that runs in this one's place when `timeout_ms` passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<String>,

    /// sub_workflow: the child definition's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// sub_workflow: the child definition's version (default: latest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
}

/// The kinds of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Runs a named handler on a worker (or an external worker).
    Task,
    /// Calls a URL from a worker.
    Http,
    /// A durable timer.
    Delay,
    /// Waits for a named signal sent to the instance.
    WaitSignal,
    /// Starts another definition as a child instance and takes its output.
    SubWorkflow,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Task => "task",
            StepKind::Http => "http",
            StepKind::Delay => "delay",
            StepKind::WaitSignal => "wait_signal",
            StepKind::SubWorkflow => "sub_workflow",
        }
    }

    pub fn parse(text: &str) -> Option<StepKind> {
        [
            StepKind::Task,
            StepKind::Http,
            StepKind::Delay,
            StepKind::WaitSignal,
            StepKind::SubWorkflow,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }

    /// True for the kinds a worker executes.
    pub fn runs_on_worker(self) -> bool {
        matches!(self, StepKind::Task | StepKind::Http)
    }
}

/// Retry with exponential backoff and jitter; the waits are durable timers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub multiplier: f64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 3,
            initial_delay_ms: 1_000,
            max_delay_ms: 60_000,
            multiplier: 2.0,
        }
    }
}

impl Retry {
    /// The wait before attempt `attempt + 1` after attempt `attempt` failed;
    /// `jitter` in [0, 1) spreads it by ±20 %.
    pub fn delay_ms(&self, attempt: u32, jitter: f64) -> u64 {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = (self.initial_delay_ms as f64) * self.multiplier.powi(exponent);
        let capped = base.min(self.max_delay_ms as f64);
        let spread = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        (capped * spread).round().max(1.0) as u64
    }
}

/// One validation problem, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Path of the field at fault, e.g. `steps[1].handler`.
    pub field: String,
    /// The step id at fault, when the problem belongs to one step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub message: String,
}

impl Definition {
    /// Parses and validates a JSON definition, returning every problem found.
    pub fn from_json(bytes: &[u8]) -> Result<Definition, Vec<Problem>> {
        check_size(bytes)?;
        let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
        let definition: Definition = serde_path_to_error::deserialize(deserializer)
            .map_err(|error| vec![problem(&path_of(&error), None, &error.inner().to_string())])?;
        definition.validate()?;
        Ok(definition)
    }

    /// Parses and validates a YAML definition, returning every problem found.
    pub fn from_yaml(bytes: &[u8]) -> Result<Definition, Vec<Problem>> {
        check_size(bytes)?;
        let value: Value = serde_yaml_ng::from_slice(bytes)
            .map_err(|error| vec![problem("", None, &format!("invalid YAML: {error}"))])?;
        let definition: Definition = serde_path_to_error::deserialize(value)
            .map_err(|error| vec![problem(&path_of(&error), None, &error.inner().to_string())])?;
        definition.validate()?;
        Ok(definition)
    }

    /// Checks names, references, the DAG, expressions, kinds and limits;
    /// returns all problems at once.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        check_name(&self.name, "name", None, &mut problems);
        if self.steps.is_empty() {
            problems.push(problem(
                "steps",
                None,
                "a definition needs at least one step",
            ));
        }
        if self.steps.len() > STEPS_MAX {
            problems.push(problem(
                "steps",
                None,
                &format!("{} steps exceed the limit of {STEPS_MAX}", self.steps.len()),
            ));
        }
        let mut index_of: HashMap<&str, usize> = HashMap::new();
        for (index, step) in self.steps.iter().enumerate() {
            let id_field = format!("steps[{index}].id");
            check_name(&step.id, &id_field, Some(&step.id), &mut problems);
            if index_of.insert(step.id.as_str(), index).is_some() {
                problems.push(problem(
                    &id_field,
                    Some(&step.id),
                    &format!("duplicate step id `{}`", step.id),
                ));
            }
        }
        let mut handled_by: HashMap<&str, &str> = HashMap::new();
        for (index, step) in self.steps.iter().enumerate() {
            self.check_step(index, step, &index_of, &mut handled_by, &mut problems);
        }
        for (index, step) in self.steps.iter().enumerate() {
            for (need_index, need) in step.needs.iter().enumerate() {
                if handled_by.contains_key(need.as_str()) {
                    problems.push(problem(
                        &format!("steps[{index}].needs[{need_index}]"),
                        Some(&step.id),
                        &format!(
                            "`{need}` is a handler step (it runs in place of `{}`); need that step instead",
                            handled_by[need.as_str()]
                        ),
                    ));
                }
            }
            if handled_by.contains_key(step.id.as_str()) && !step.needs.is_empty() {
                problems.push(problem(
                    &format!("steps[{index}].needs"),
                    Some(&step.id),
                    "a handler step (named by on_failure or on_timeout) cannot have needs",
                ));
            }
        }
        if let Some(cycle) = self.find_cycle(&index_of, &handled_by) {
            let first = &self.steps[index_of[cycle[0].as_str()]];
            problems.push(problem(
                &format!("steps[{}].needs", index_of[cycle[0].as_str()]),
                Some(&first.id),
                &format!("dependency cycle: {}", cycle.join(" -> ")),
            ));
        }
        let has_root = self
            .steps
            .iter()
            .any(|step| step.needs.is_empty() && !handled_by.contains_key(step.id.as_str()));
        if !self.steps.is_empty() && !has_root {
            problems.push(problem(
                "steps",
                None,
                "no step can start: every step needs another or is a handler",
            ));
        }
        if let Some(output) = &self.output {
            check_mapping(output, "output", None, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn check_step<'a>(
        &'a self,
        index: usize,
        step: &'a Step,
        index_of: &HashMap<&str, usize>,
        handled_by: &mut HashMap<&'a str, &'a str>,
        problems: &mut Vec<Problem>,
    ) {
        let at = |field: &str| format!("steps[{index}].{field}");
        let id = Some(step.id.as_str());
        let mut seen_needs = HashSet::new();
        for (need_index, need) in step.needs.iter().enumerate() {
            let field = format!("steps[{index}].needs[{need_index}]");
            if need == &step.id {
                problems.push(problem(&field, id, "a step cannot need itself"));
            } else if !index_of.contains_key(need.as_str()) {
                problems.push(problem(&field, id, &format!("needs unknown step `{need}`")));
            } else if !seen_needs.insert(need) {
                problems.push(problem(&field, id, &format!("`{need}` is listed twice")));
            }
        }
        if let Some(when) = &step.when {
            if let Err(error) = expr::compile(when) {
                problems.push(problem(
                    &at("when"),
                    id,
                    &format!("invalid CEL expression: {error}"),
                ));
            }
        }
        if let Some(input) = &step.input {
            check_mapping(input, &at("input"), id, problems);
        }
        for (field, target) in [
            ("on_failure", &step.on_failure),
            ("on_timeout", &step.on_timeout),
        ] {
            let Some(target) = target else { continue };
            if target == &step.id {
                problems.push(problem(&at(field), id, "a step cannot handle itself"));
            } else if !index_of.contains_key(target.as_str()) {
                problems.push(problem(&at(field), id, &format!("unknown step `{target}`")));
            } else if let Some(previous) = handled_by.insert(target.as_str(), step.id.as_str()) {
                problems.push(problem(
                    &at(field),
                    id,
                    &format!(
                        "`{target}` already handles `{previous}`; a handler step handles one step"
                    ),
                ));
            }
        }

        let kind = step.kind;
        let allowed: &[&str] = match kind {
            StepKind::Task => &["handler", "external", "retry", "timeout_ms"],
            StepKind::Http => &["url", "method", "headers", "retry", "timeout_ms"],
            StepKind::Delay => &["duration_ms"],
            StepKind::WaitSignal => &["signal", "timeout_ms", "on_timeout"],
            StepKind::SubWorkflow => &["definition", "version"],
        };
        let present = [
            ("handler", step.handler.is_some()),
            ("external", step.external),
            ("url", step.url.is_some()),
            ("method", step.method.is_some()),
            ("headers", step.headers.is_some()),
            ("duration_ms", step.duration_ms.is_some()),
            ("signal", step.signal.is_some()),
            ("on_timeout", step.on_timeout.is_some()),
            ("definition", step.definition.is_some()),
            ("version", step.version.is_some()),
            ("retry", step.retry.is_some()),
            ("timeout_ms", step.timeout_ms.is_some()),
        ];
        for (field, is_present) in present {
            if is_present && !allowed.contains(&field) {
                problems.push(problem(
                    &at(field),
                    id,
                    &format!("`{field}` does not apply to a {} step", kind.as_str()),
                ));
            }
        }
        let mut require = |field: &str, is_present: bool| {
            if !is_present {
                problems.push(problem(
                    &at(field),
                    id,
                    &format!("a {} step needs `{field}`", kind.as_str()),
                ));
            }
        };
        match kind {
            StepKind::Task => require("handler", step.handler.is_some()),
            StepKind::Http => require("url", step.url.is_some()),
            StepKind::Delay => require("duration_ms", step.duration_ms.is_some()),
            StepKind::WaitSignal => require("signal", step.signal.is_some()),
            StepKind::SubWorkflow => require("definition", step.definition.is_some()),
        }
        if step.on_timeout.is_some() && step.timeout_ms.is_none() {
            problems.push(problem(
                &at("on_timeout"),
                id,
                "on_timeout needs a `timeout_ms`",
            ));
        }
        if let Some(handler) = &step.handler {
            check_name(handler, &at("handler"), id, problems);
        }
        if let Some(signal) = &step.signal {
            check_name(signal, &at("signal"), id, problems);
        }
        if let Some(definition) = &step.definition {
            check_name(definition, &at("definition"), id, problems);
            if definition == &self.name {
                problems.push(problem(
                    &at("definition"),
                    id,
                    "a definition cannot start itself",
                ));
            }
        }
        if let Some(url) = &step.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2_048 {
                problems.push(problem(
                    &at("url"),
                    id,
                    "must be an http:// or https:// URL of at most 2048 bytes",
                ));
            }
        }
        if let Some(method) = &step.method {
            if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
                problems.push(problem(
                    &at("method"),
                    id,
                    &format!("unknown method `{method}`; use GET, POST, PUT, PATCH or DELETE"),
                ));
            }
        }
        let timeout_max = if kind == StepKind::WaitSignal {
            WAIT_MS_MAX
        } else {
            TASK_TIMEOUT_MS_MAX
        };
        if let Some(timeout_ms) = step.timeout_ms {
            if timeout_ms == 0 || timeout_ms > timeout_max {
                problems.push(problem(
                    &at("timeout_ms"),
                    id,
                    &format!("must be between 1 and {timeout_max}"),
                ));
            }
        }
        if let Some(duration_ms) = step.duration_ms {
            if duration_ms > WAIT_MS_MAX {
                problems.push(problem(
                    &at("duration_ms"),
                    id,
                    &format!("must be at most {WAIT_MS_MAX}"),
                ));
            }
        }
        if let Some(retry) = &step.retry {
            if retry.max_attempts == 0 || retry.max_attempts > ATTEMPTS_MAX {
                problems.push(problem(
                    &at("retry.max_attempts"),
                    id,
                    &format!("must be between 1 and {ATTEMPTS_MAX}"),
                ));
            }
            if retry.initial_delay_ms == 0 || retry.initial_delay_ms > retry.max_delay_ms {
                problems.push(problem(
                    &at("retry.initial_delay_ms"),
                    id,
                    "must be at least 1 and at most max_delay_ms",
                ));
            }
            if retry.max_delay_ms > WAIT_MS_MAX {
                problems.push(problem(
                    &at("retry.max_delay_ms"),
                    id,
                    &format!("must be at most {WAIT_MS_MAX}"),
                ));
            }
            if !(1.0..=10.0).contains(&retry.multiplier) {
                problems.push(problem(
                    &at("retry.multiplier"),
                    id,
                    "must be between 1 and 10",
                ));
            }
        }
    }

    /// A cycle through `needs` and handler links, as step ids, if any.
    fn find_cycle(
        &self,
        index_of: &HashMap<&str, usize>,
        handled_by: &HashMap<&str, &str>,
    ) -> Option<Vec<String>> {
        // Edges: a step depends on its needs; a handler depends on the step it handles.
        let edges = |step: &Step| -> Vec<usize> {
            let mut targets: Vec<usize> = step
                .needs
                .iter()
                .filter(|need| **need != step.id)
                .filter_map(|need| index_of.get(need.as_str()).copied())
                .collect();
            if let Some(handled) = handled_by.get(step.id.as_str()) {
                targets.extend(index_of.get(handled).copied());
            }
            targets
        };
        // 0 = unvisited, 1 = on the stack, 2 = done.
        let mut mark = vec![0u8; self.steps.len()];
        let mut stack: Vec<usize> = Vec::new();
        fn visit(
            node: usize,
            steps: &[Step],
            edges: &dyn Fn(&Step) -> Vec<usize>,
            mark: &mut [u8],
            stack: &mut Vec<usize>,
        ) -> Option<Vec<String>> {
            mark[node] = 1;
            stack.push(node);
            for next in edges(&steps[node]) {
                if mark[next] == 1 {
                    let start = stack.iter().position(|&n| n == next).unwrap_or(0);
                    let mut cycle: Vec<String> = stack[start..]
                        .iter()
                        .map(|&n| steps[n].id.clone())
                        .collect();
                    cycle.push(steps[next].id.clone());
                    return Some(cycle);
                }
                if mark[next] == 0 {
                    if let Some(cycle) = visit(next, steps, edges, mark, stack) {
                        return Some(cycle);
                    }
                }
            }
            stack.pop();
            mark[node] = 2;
            None
        }
        for node in 0..self.steps.len() {
            if mark[node] == 0 {
                if let Some(cycle) = visit(node, &self.steps, &edges, &mut mark, &mut stack) {
                    return Some(cycle);
                }
            }
        }
        None
    }

    /// The step with this id.
    pub fn step(&self, step_id: &str) -> Option<&Step> {
        self.steps.iter().find(|step| step.id == step_id)
    }

    /// The step that `step_id` hands a failure or a timeout to, if any.
    pub fn handler_of(&self, step_id: &str, timed_out: bool) -> Option<&Step> {
        let step = self.step(step_id)?;
        let target = if timed_out {
            step.on_timeout.as_ref().or(step.on_failure.as_ref())
        } else {
            step.on_failure.as_ref()
        };
        target.and_then(|target| self.step(target))
    }

    /// Ids of steps that run only in place of another (named by on_failure or on_timeout).
    pub fn handler_steps(&self) -> HashSet<&str> {
        self.steps
            .iter()
            .flat_map(|step| [step.on_failure.as_deref(), step.on_timeout.as_deref()])
            .flatten()
            .collect()
    }
}

impl Step {
    /// The handler name a worker looks up (the kind for built-in kinds).
    pub fn handler_name(&self) -> &str {
        match self.kind {
            StepKind::Task => self.handler.as_deref().unwrap_or_default(),
            other => other.as_str(),
        }
    }

    /// The retry policy in force: the step's, or the default for worker kinds.
    pub fn retry_policy(&self) -> Retry {
        match (&self.retry, self.kind.runs_on_worker()) {
            (Some(retry), _) => retry.clone(),
            (None, true) => Retry::default(),
            (None, false) => Retry {
                max_attempts: 1,
                ..Retry::default()
            },
        }
    }
}

fn check_size(bytes: &[u8]) -> Result<(), Vec<Problem>> {
    if bytes.len() > DEFINITION_BYTES_MAX {
        return Err(vec![problem(
            "",
            None,
            &format!(
                "the definition has {} bytes; the limit is {DEFINITION_BYTES_MAX}",
                bytes.len()
            ),
        )]);
    }
    Ok(())
}

fn path_of<E>(error: &serde_path_to_error::Error<E>) -> String {
    let path = error.path().to_string();
    if path == "." { String::new() } else { path }
}

fn check_mapping(mapping: &Value, field: &str, step: Option<&str>, problems: &mut Vec<Problem>) {
    match mapping {
        Value::String(source) => {
            if let Err(error) = expr::compile(source) {
                problems.push(problem(
                    field,
                    step,
                    &format!("invalid CEL expression: {error}"),
                ));
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                check_mapping(item, &format!("{field}[{index}]"), step, problems);
            }
        }
        Value::Object(fields) => {
            for (key, item) in fields {
                check_mapping(item, &format!("{field}.{key}"), step, problems);
            }
        }
        _ => {}
    }
}

fn check_name(value: &str, field: &str, step: Option<&str>, problems: &mut Vec<Problem>) {
    if value.is_empty() {
        problems.push(problem(field, step, "must not be empty"));
    } else if value.len() > NAME_LEN_MAX {
        problems.push(problem(
            field,
            step,
            &format!("longer than {NAME_LEN_MAX} bytes"),
        ));
    } else if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        problems.push(problem(
            field,
            step,
            &format!("`{value}` may hold only letters, digits, `_`, `-` and `.`"),
        ));
    }
}

fn problem(field: &str, step: Option<&str>, message: &str) -> Problem {
    Problem {
        field: field.to_owned(),
        step: step.map(str::to_owned),
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `yaml` and compares its problems to `(field, step, message part)`.
    fn check(yaml: &str, expected: &[(&str, Option<&str>, &str)]) {
        let problems = Definition::from_yaml(yaml.as_bytes())
            .err()
            .unwrap_or_default();
        let got: Vec<(&str, Option<&str>, &str)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.step.as_deref(), p.message.as_str()))
            .collect();
        assert_eq!(got.len(), expected.len(), "problems: {problems:#?}");
        for ((field, step, message), (want_field, want_step, want_message)) in
            got.iter().zip(expected)
        {
            assert_eq!((field, step), (want_field, want_step), "{message}");
            assert!(
                message.contains(want_message),
                "{message:?} lacks {want_message:?}"
            );
        }
    }

    #[test]
    fn valid_dag_parses() {
        check(
            "name: admission
steps:
  - { id: register, kind: task, handler: echo }
  - { id: bed, kind: task, handler: echo, needs: [register] }
  - { id: pharmacy, kind: http, url: 'http://127.0.0.1/x', needs: [register], retry: { max_attempts: 5 } }
  - { id: confirm, kind: task, handler: echo, needs: [bed, pharmacy], when: 'steps.bed.output.ok == true' }
  - { id: settle, kind: delay, duration_ms: 10, needs: [confirm] }
  - { id: ack, kind: wait_signal, signal: nurse_ack, timeout_ms: 1000, on_timeout: escalate, needs: [settle] }
  - { id: escalate, kind: task, handler: page }
  - { id: child, kind: sub_workflow, definition: discharge, needs: [ack] }
",
            &[],
        );
    }

    #[test]
    fn json_and_yaml_agree() {
        let json = r#"{"name":"x","steps":[{"id":"a","kind":"task","handler":"echo"}]}"#;
        assert_eq!(
            Definition::from_json(json.as_bytes()).unwrap(),
            Definition::from_yaml(json.as_bytes()).unwrap()
        );
    }

    #[test]
    fn unknown_field_names_its_path() {
        check(
            "name: x\nsteps: [{ id: a, kind: task, handler: echo, retries: 3 }]",
            &[("steps[0].retries", None, "unknown field `retries`")],
        );
    }

    #[test]
    fn unknown_kind_names_its_path() {
        check(
            "name: x\nsteps: [{ id: a, kind: teleport }]",
            &[("steps[0].kind", None, "unknown variant `teleport`")],
        );
    }

    #[test]
    fn every_problem_is_reported() {
        check(
            "name: bad name\nsteps:\n  - { id: a, kind: task }\n  - { id: a, kind: task, handler: echo }",
            &[
                ("name", None, "may hold only"),
                ("steps[1].id", Some("a"), "duplicate step id `a`"),
                ("steps[0].handler", Some("a"), "a task step needs `handler`"),
            ],
        );
    }

    #[test]
    fn missing_and_self_references() {
        check(
            "name: x\nsteps:\n  - { id: a, kind: task, handler: h, needs: [ghost, a] }\n  - { id: b, kind: task, handler: h }",
            &[
                ("steps[0].needs[0]", Some("a"), "needs unknown step `ghost`"),
                ("steps[0].needs[1]", Some("a"), "a step cannot need itself"),
            ],
        );
    }

    #[test]
    fn cycles_are_named() {
        check(
            "name: x\nsteps:\n  - { id: root, kind: task, handler: h }\n  - { id: a, kind: task, handler: h, needs: [c] }\n  - { id: b, kind: task, handler: h, needs: [a] }\n  - { id: c, kind: task, handler: h, needs: [b] }",
            &[(
                "steps[1].needs",
                Some("a"),
                "dependency cycle: a -> c -> b -> a",
            )],
        );
    }

    #[test]
    fn bad_expressions_are_reported_where_they_are() {
        check(
            "name: x\nsteps:\n  - { id: a, kind: task, handler: h, when: 'input.x ==', input: { y: 'input.(' } }",
            &[
                ("steps[0].when", Some("a"), "invalid CEL expression"),
                ("steps[0].input.y", Some("a"), "invalid CEL expression"),
            ],
        );
    }

    #[test]
    fn fields_of_other_kinds_are_refused() {
        check(
            "name: x\nsteps:\n  - { id: a, kind: delay, duration_ms: 5, handler: h, retry: {} }\n  - { id: b, kind: http }",
            &[
                (
                    "steps[0].handler",
                    Some("a"),
                    "`handler` does not apply to a delay step",
                ),
                (
                    "steps[0].retry",
                    Some("a"),
                    "`retry` does not apply to a delay step",
                ),
                ("steps[1].url", Some("b"), "a http step needs `url`"),
            ],
        );
    }

    #[test]
    fn handler_steps_are_checked() {
        check(
            "name: x\nsteps:\n  - { id: a, kind: task, handler: h, on_failure: fix }\n  - { id: fix, kind: task, handler: h, needs: [a] }\n  - { id: b, kind: task, handler: h, needs: [fix] }",
            &[
                (
                    "steps[1].needs",
                    Some("fix"),
                    "a handler step (named by on_failure or on_timeout) cannot have needs",
                ),
                ("steps[2].needs[0]", Some("b"), "`fix` is a handler step"),
            ],
        );
    }

    #[test]
    fn limits_are_enforced() {
        let steps: Vec<String> = (0..=STEPS_MAX)
            .map(|i| format!("{{id: s{i}, kind: task, handler: h}}"))
            .collect();
        check(
            &format!("name: x\nsteps: [{}]", steps.join(",")),
            &[("steps", None, "201 steps exceed the limit of 200")],
        );
        check(
            "name: x\nsteps: [{ id: a, kind: task, handler: h, retry: { max_attempts: 0 }, timeout_ms: 0 }]",
            &[
                ("steps[0].timeout_ms", Some("a"), "must be between 1"),
                (
                    "steps[0].retry.max_attempts",
                    Some("a"),
                    "must be between 1 and 100",
                ),
            ],
        );
        let big = format!(
            "name: x\ndescription: '{}'\nsteps: []",
            "x".repeat(DEFINITION_BYTES_MAX)
        );
        check(&big, &[("", None, "the limit is 262144")]);
    }

    #[test]
    fn empty_steps_and_malformed_documents() {
        check(
            "name: x\nsteps: []",
            &[("steps", None, "at least one step")],
        );
        let problems = Definition::from_json(br#"{"name":"x","steps":["#).unwrap_err();
        assert!(problems[0].message.contains("EOF"), "{problems:?}");
        check("name: [unclosed", &[("", None, "invalid YAML")]);
    }

    #[test]
    fn retry_backoff_grows_and_is_capped() {
        let retry = Retry {
            max_attempts: 10,
            initial_delay_ms: 100,
            max_delay_ms: 1_000,
            multiplier: 2.0,
        };
        let delays: Vec<u64> = (1..=6)
            .map(|attempt| retry.delay_ms(attempt, 0.5))
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(retry.delay_ms(1, 0.0), 80);
        assert_eq!(retry.delay_ms(1, 0.999_999), 120);
    }
}

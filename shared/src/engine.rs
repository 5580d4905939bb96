//! The engine's decisions, as plain functions: given a definition and the
//! task runs an instance has so far, which steps start (or are skipped or
//! retried) now and whether the instance has ended.
//!
//! Rules:
//! - A step starts when every step it `needs` is completed or skipped. It is
//!   skipped when all its needs were skipped, or when its `when` is false.
//! - Its input is its `input` mapping, else: the instance input (no needs),
//!   the output of its one need, or an object of its needs' outputs by id.
//! - A failed attempt that is retryable is retried, after a backoff, until
//!   the step's `max_attempts`; a step that failed for good hands over to its
//!   `on_failure` step, a signal wait that timed out to its `on_timeout` (else
//!   `on_failure`) step; the handler step then stands in for it (its output is
//!   the step's output). Without a handler, the instance fails.
//! - The instance completes when every step that is not a handler has
//!   completed or been skipped; its output is the `output` mapping, else the
//!   output of its only final step, else an object of final steps' outputs.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::definition::Definition;
use crate::expr::{self, Scope};

/// The state of one task run, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Waiting to be dispatched to a queue, or fetched by an external worker.
    Ready,
    /// Published to a queue; a worker will settle it.
    Dispatched,
    /// Fetched and locked by an external worker.
    Locked,
    /// Waiting for a timer, a signal or a child instance.
    Waiting,
    Completed,
    Failed,
    Skipped,
    Cancelled,
    /// A signal wait whose timeout passed.
    TimedOut,
}

impl RunState {
    pub const ALL: [RunState; 9] = [
        RunState::Ready,
        RunState::Dispatched,
        RunState::Locked,
        RunState::Waiting,
        RunState::Completed,
        RunState::Failed,
        RunState::Skipped,
        RunState::Cancelled,
        RunState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Ready => "ready",
            RunState::Dispatched => "dispatched",
            RunState::Locked => "locked",
            RunState::Waiting => "waiting",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::Skipped => "skipped",
            RunState::Cancelled => "cancelled",
            RunState::TimedOut => "timed_out",
        }
    }

    pub fn parse(text: &str) -> Option<RunState> {
        RunState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// True while the run may still change.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            RunState::Ready | RunState::Dispatched | RunState::Locked | RunState::Waiting
        )
    }
}

/// One task run of an instance, as the engine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub step_id: String,
    pub attempt: i32,
    pub state: RunState,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// For a failed run: may another attempt succeed?
    pub retryable: bool,
}

/// A run to create.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub step_id: String,
    pub attempt: i32,
    pub input: Value,
    /// Backoff before a retry attempt may run; 0 for now.
    pub wait_ms: u64,
    /// Recorded as skipped rather than run.
    pub skipped: bool,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Completed { output: Value },
    Failed { error: String },
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub starts: Vec<Start>,
    pub end: Option<End>,
}

/// How a step stands, following handler steps that stand in for it.
#[derive(Debug, Clone, PartialEq)]
enum Status {
    NotStarted,
    Active,
    Done(Value),
    Skipped,
    Failed {
        step_id: String,
        error: String,
    },
    RetryDue {
        step_id: String,
        attempt: i32,
        input: Value,
        wait_ms: u64,
    },
    HandlerDue {
        step_id: String,
        input: Value,
    },
}

/// Decides what starts and whether the instance ended. `jitter` in [0, 1)
/// spreads retry backoffs.
pub fn plan(definition: &Definition, instance_input: &Value, runs: &[Run], jitter: f64) -> Plan {
    let mut latest: HashMap<&str, &Run> = HashMap::new();
    for run in runs {
        let entry = latest.entry(run.step_id.as_str()).or_insert(run);
        if run.attempt > entry.attempt {
            *entry = run;
        }
    }
    let handlers = definition.handler_steps();
    let mut planner = Planner {
        definition,
        instance_input,
        latest,
        planned: HashMap::new(),
        starts: Vec::new(),
        jitter,
    };

    // A step that failed for good, with no handler, fails the instance.
    for step in definition
        .steps
        .iter()
        .filter(|step| !handlers.contains(step.id.as_str()))
    {
        if let Status::Failed { step_id, error } = planner.effective(&step.id) {
            let error = if step_id == step.id {
                format!("step `{step_id}` failed: {error}")
            } else {
                format!(
                    "step `{}` failed: its handler `{step_id}` failed: {error}",
                    step.id
                )
            };
            return Plan {
                starts: Vec::new(),
                end: Some(End::Failed { error }),
            };
        }
    }

    loop {
        let mut changed = false;
        for step in definition
            .steps
            .iter()
            .filter(|step| !handlers.contains(step.id.as_str()))
        {
            match planner.effective(&step.id) {
                Status::NotStarted => {
                    let needs: Vec<Status> = step
                        .needs
                        .iter()
                        .map(|need| planner.effective(need))
                        .collect();
                    if !needs
                        .iter()
                        .all(|need| matches!(need, Status::Done(_) | Status::Skipped))
                    {
                        continue;
                    }
                    let all_skipped =
                        !needs.is_empty() && needs.iter().all(|need| *need == Status::Skipped);
                    match planner.decide(&step.id, all_skipped) {
                        Ok(start) => planner.add(start),
                        Err(error) => {
                            return Plan {
                                starts: Vec::new(),
                                end: Some(End::Failed { error }),
                            };
                        }
                    }
                    changed = true;
                }
                Status::RetryDue {
                    step_id,
                    attempt,
                    input,
                    wait_ms,
                } => {
                    planner.add(Start {
                        step_id,
                        attempt,
                        input,
                        wait_ms,
                        skipped: false,
                    });
                    changed = true;
                }
                Status::HandlerDue { step_id, input } => {
                    let input = match planner.handler_input(&step_id, input) {
                        Ok(input) => input,
                        Err(error) => {
                            return Plan {
                                starts: Vec::new(),
                                end: Some(End::Failed { error }),
                            };
                        }
                    };
                    planner.add(Start {
                        step_id,
                        attempt: 1,
                        input,
                        wait_ms: 0,
                        skipped: false,
                    });
                    changed = true;
                }
                Status::Active | Status::Done(_) | Status::Skipped | Status::Failed { .. } => {}
            }
        }
        if !changed {
            break;
        }
    }

    let finished = definition
        .steps
        .iter()
        .filter(|step| !handlers.contains(step.id.as_str()))
        .all(|step| {
            matches!(
                planner.effective(&step.id),
                Status::Done(_) | Status::Skipped
            )
        });
    let end = if finished {
        Some(match planner.output() {
            Ok(output) => End::Completed { output },
            Err(error) => End::Failed { error },
        })
    } else {
        None
    };
    Plan {
        starts: planner.starts,
        end,
    }
}

struct Planner<'a> {
    definition: &'a Definition,
    instance_input: &'a Value,
    latest: HashMap<&'a str, &'a Run>,
    planned: HashMap<String, usize>,
    starts: Vec<Start>,
    jitter: f64,
}

impl Planner<'_> {
    fn add(&mut self, start: Start) {
        self.planned
            .insert(start.step_id.clone(), self.starts.len());
        self.starts.push(start);
    }

    /// The step's own status, ignoring handlers; `timed_out` tells a signal
    /// timeout from a failure.
    fn own(&self, step_id: &str) -> (Status, bool) {
        if let Some(&index) = self.planned.get(step_id) {
            return (
                if self.starts[index].skipped {
                    Status::Skipped
                } else {
                    Status::Active
                },
                false,
            );
        }
        let Some(run) = self.latest.get(step_id) else {
            return (Status::NotStarted, false);
        };
        let failed = |error: &str| Status::Failed {
            step_id: step_id.to_owned(),
            error: error.to_owned(),
        };
        match run.state {
            state if state.is_pending() => (Status::Active, false),
            RunState::Completed => (
                Status::Done(run.output.clone().unwrap_or(Value::Null)),
                false,
            ),
            RunState::Skipped => (Status::Skipped, false),
            RunState::Cancelled => (failed("cancelled"), false),
            RunState::TimedOut => (failed(run.error.as_deref().unwrap_or("timed out")), true),
            _ => {
                let policy = self
                    .definition
                    .step(step_id)
                    .map(|step| step.retry_policy())
                    .unwrap_or_default();
                let attempt = u32::try_from(run.attempt).unwrap_or(u32::MAX);
                if run.retryable && attempt < policy.max_attempts {
                    let status = Status::RetryDue {
                        step_id: step_id.to_owned(),
                        attempt: run.attempt + 1,
                        input: run.input.clone(),
                        wait_ms: policy.delay_ms(attempt, self.jitter),
                    };
                    (status, false)
                } else {
                    (failed(run.error.as_deref().unwrap_or("failed")), false)
                }
            }
        }
    }

    /// The status of a step with handler steps standing in for it.
    fn effective(&self, step_id: &str) -> Status {
        self.effective_bounded(step_id, self.definition.steps.len())
    }

    fn effective_bounded(&self, step_id: &str, depth_left: usize) -> Status {
        let (status, timed_out) = self.own(step_id);
        let Status::Failed { .. } = &status else {
            return status;
        };
        let Some(handler) = self.definition.handler_of(step_id, timed_out) else {
            return status;
        };
        if depth_left == 0 {
            return status;
        }
        match self.effective_bounded(&handler.id, depth_left - 1) {
            Status::NotStarted => {
                let (error, input) = match (&status, self.latest.get(step_id)) {
                    (Status::Failed { error, .. }, Some(run)) => (error.clone(), run.input.clone()),
                    (Status::Failed { error, .. }, None) => (error.clone(), Value::Null),
                    _ => (String::new(), Value::Null),
                };
                Status::HandlerDue {
                    step_id: handler.id.clone(),
                    input: json!({ "step": step_id, "error": error, "timed_out": timed_out, "input": input }),
                }
            }
            other => other,
        }
    }

    /// `{ id: { state, output, error } }` for every step with a status.
    fn scope_steps(&self) -> Value {
        let mut steps = Map::new();
        for step in &self.definition.steps {
            let (state, output, error) = match self.effective(&step.id) {
                Status::NotStarted => continue,
                Status::Done(output) => ("completed", output, Value::Null),
                Status::Skipped => ("skipped", Value::Null, Value::Null),
                Status::Failed { error, .. } => ("failed", Value::Null, Value::String(error)),
                _ => ("running", Value::Null, Value::Null),
            };
            steps.insert(
                step.id.clone(),
                json!({ "state": state, "output": output, "error": error }),
            );
        }
        Value::Object(steps)
    }

    fn output_of(&self, step_id: &str) -> Value {
        match self.effective(step_id) {
            Status::Done(output) => output,
            _ => Value::Null,
        }
    }

    /// Start, or skip, a step whose needs are all finished.
    fn decide(&self, step_id: &str, all_needs_skipped: bool) -> Result<Start, String> {
        let step = self.definition.step(step_id).expect("planned steps exist");
        let start = |input: Value, skipped: bool| Start {
            step_id: step_id.to_owned(),
            attempt: 1,
            input,
            wait_ms: 0,
            skipped,
        };
        if all_needs_skipped {
            return Ok(start(Value::Null, true));
        }
        let steps = self.scope_steps();
        let scope = Scope {
            input: self.instance_input,
            steps: &steps,
        };
        if let Some(when) = &step.when {
            let holds = expr::condition(when, scope)
                .map_err(|error| format!("step `{step_id}`: when: {error}"))?;
            if !holds {
                return Ok(start(Value::Null, true));
            }
        }
        let input = match (&step.input, step.needs.as_slice()) {
            (Some(mapping), _) => expr::mapping(mapping, scope)
                .map_err(|error| format!("step `{step_id}`: input: {error}"))?,
            (None, []) => self.instance_input.clone(),
            (None, [need]) => self.output_of(need),
            (None, needs) => Value::Object(
                needs
                    .iter()
                    .map(|need| (need.clone(), self.output_of(need)))
                    .collect(),
            ),
        };
        Ok(start(input, false))
    }

    fn handler_input(&self, handler_id: &str, default: Value) -> Result<Value, String> {
        let step = self.definition.step(handler_id).expect("handlers exist");
        match &step.input {
            None => Ok(default),
            Some(mapping) => {
                let steps = self.scope_steps();
                let scope = Scope {
                    input: self.instance_input,
                    steps: &steps,
                };
                expr::mapping(mapping, scope)
                    .map_err(|error| format!("step `{handler_id}`: input: {error}"))
            }
        }
    }

    fn output(&self) -> Result<Value, String> {
        if let Some(mapping) = &self.definition.output {
            let steps = self.scope_steps();
            let scope = Scope {
                input: self.instance_input,
                steps: &steps,
            };
            return expr::mapping(mapping, scope).map_err(|error| format!("output: {error}"));
        }
        let handlers = self.definition.handler_steps();
        let needed: std::collections::HashSet<&str> = self
            .definition
            .steps
            .iter()
            .flat_map(|step| step.needs.iter().map(String::as_str))
            .collect();
        let sinks: Vec<&str> = self
            .definition
            .steps
            .iter()
            .map(|step| step.id.as_str())
            .filter(|id| !needed.contains(id) && !handlers.contains(id))
            .collect();
        Ok(match sinks.as_slice() {
            [only] => self.output_of(only),
            many => Value::Object(
                many.iter()
                    .filter(|id| self.effective(id) != Status::Skipped)
                    .map(|id| ((*id).to_owned(), self.output_of(id)))
                    .collect(),
            ),
        })
    }
}

/// The idempotency key of a step of an instance: stable across redeliveries
/// and retries, and handed to the handler.
pub fn idempotency_key(instance_id: uuid::Uuid, step_id: &str) -> String {
    format!("{instance_id}:{step_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(yaml: &str) -> Definition {
        Definition::from_yaml(yaml.as_bytes()).unwrap()
    }

    fn run(step_id: &str, attempt: i32, state: RunState, output: Value) -> Run {
        Run {
            step_id: step_id.into(),
            attempt,
            state,
            input: json!({ "in": step_id }),
            output: Some(output),
            error: (state == RunState::Failed || state == RunState::TimedOut)
                .then(|| "boom".to_owned()),
            retryable: true,
        }
    }

    /// Plans and returns (started step:attempt, skipped steps, end).
    fn check(
        definition: &Definition,
        input: Value,
        runs: &[Run],
    ) -> (Vec<String>, Vec<String>, Option<End>) {
        let plan = plan(definition, &input, runs, 0.5);
        let started = plan
            .starts
            .iter()
            .filter(|s| !s.skipped)
            .map(|s| format!("{}:{}", s.step_id, s.attempt))
            .collect();
        let skipped = plan
            .starts
            .iter()
            .filter(|s| s.skipped)
            .map(|s| s.step_id.clone())
            .collect();
        (started, skipped, plan.end)
    }

    const FAN: &str = "name: fan
steps:
  - { id: a, kind: task, handler: h }
  - { id: b, kind: task, handler: h, needs: [a] }
  - { id: c, kind: task, handler: h, needs: [a], when: 'input.urgent' }
  - { id: d, kind: task, handler: h, needs: [b, c] }
  - { id: e, kind: task, handler: h, needs: [c] }
";

    #[test]
    fn roots_start_with_the_instance_input() {
        let definition = definition(FAN);
        let plan = plan(&definition, &json!({ "urgent": true }), &[], 0.5);
        assert_eq!(plan.starts.len(), 1);
        assert_eq!(plan.starts[0].input, json!({ "urgent": true }));
    }

    #[test]
    fn fan_out_runs_branches_in_parallel() {
        let definition = definition(FAN);
        let runs = [run("a", 1, RunState::Completed, json!(1))];
        assert_eq!(
            check(&definition, json!({ "urgent": true }), &runs),
            (vec!["b:1".into(), "c:1".into()], vec![], None)
        );
    }

    #[test]
    fn false_condition_skips_and_skips_cascade_but_joins_run() {
        let definition = definition(FAN);
        let runs = [
            run("a", 1, RunState::Completed, json!(1)),
            run("b", 1, RunState::Completed, json!(2)),
        ];
        // c is skipped; e needs only c, so it is skipped too; d joins b (done) and c (skipped).
        assert_eq!(
            check(&definition, json!({ "urgent": false }), &runs),
            (vec!["d:1".into()], vec!["c".into(), "e".into()], None)
        );
    }

    #[test]
    fn join_waits_for_every_need_and_gets_their_outputs() {
        let definition = definition(FAN);
        let mut runs = vec![
            run("a", 1, RunState::Completed, json!(1)),
            run("b", 1, RunState::Completed, json!("b-out")),
            run("c", 1, RunState::Dispatched, json!(null)),
        ];
        assert_eq!(
            check(&definition, json!({ "urgent": true }), &runs),
            (vec![], vec![], None)
        );
        runs[2] = run("c", 1, RunState::Completed, json!("c-out"));
        let plan = plan(&definition, &json!({ "urgent": true }), &runs, 0.5);
        let d = plan.starts.iter().find(|s| s.step_id == "d").unwrap();
        assert_eq!(d.input, json!({ "b": "b-out", "c": "c-out" }));
    }

    #[test]
    fn completion_takes_the_final_steps_outputs() {
        let definition = definition(FAN);
        let runs = [
            run("a", 1, RunState::Completed, json!(1)),
            run("b", 1, RunState::Completed, json!(2)),
            run("c", 1, RunState::Completed, json!(3)),
            run("d", 1, RunState::Completed, json!("d")),
            run("e", 1, RunState::Completed, json!("e")),
        ];
        assert_eq!(
            check(&definition, json!({ "urgent": true }), &runs).2,
            Some(End::Completed {
                output: json!({ "d": "d", "e": "e" })
            })
        );
    }

    #[test]
    fn retryable_failure_retries_with_backoff_then_fails() {
        let definition = definition(
            "name: r\nsteps:\n  - { id: a, kind: task, handler: h, retry: { max_attempts: 2, initial_delay_ms: 100 } }",
        );
        let plan = plan(
            &definition,
            &json!({}),
            &[run("a", 1, RunState::Failed, json!(null))],
            0.5,
        );
        assert_eq!(
            plan.starts,
            [Start {
                step_id: "a".into(),
                attempt: 2,
                input: json!({ "in": "a" }),
                wait_ms: 100,
                skipped: false
            }]
        );
        let runs = [
            run("a", 1, RunState::Failed, json!(null)),
            run("a", 2, RunState::Failed, json!(null)),
        ];
        assert_eq!(
            check(&definition, json!({}), &runs).2,
            Some(End::Failed {
                error: "step `a` failed: boom".into()
            })
        );
        let mut terminal = run("a", 1, RunState::Failed, json!(null));
        terminal.retryable = false;
        assert_eq!(
            check(&definition, json!({}), &[terminal]).2,
            Some(End::Failed {
                error: "step `a` failed: boom".into()
            })
        );
    }

    #[test]
    fn handler_steps_stand_in_for_failed_or_timed_out_steps() {
        let definition = definition(
            "name: h
steps:
  - { id: ack, kind: wait_signal, signal: nurse_ack, timeout_ms: 10, on_timeout: escalate }
  - { id: escalate, kind: task, handler: page, retry: { max_attempts: 1 } }
  - { id: record, kind: task, handler: h, needs: [ack] }
",
        );
        let timed_out = run("ack", 1, RunState::TimedOut, json!(null));
        let plan = plan(
            &definition,
            &json!({}),
            std::slice::from_ref(&timed_out),
            0.5,
        );
        assert_eq!(plan.starts.len(), 1);
        assert_eq!(plan.starts[0].step_id, "escalate");
        assert_eq!(
            plan.starts[0].input,
            json!({ "step": "ack", "error": "boom", "timed_out": true, "input": { "in": "ack" } })
        );
        let runs = [
            timed_out.clone(),
            run("escalate", 1, RunState::Completed, json!("paged")),
        ];
        let plan = plan_of(&definition, &runs);
        assert_eq!(plan.starts[0].step_id, "record");
        assert_eq!(
            plan.starts[0].input,
            json!("paged"),
            "the handler's output stands for the step's"
        );
        let runs = [timed_out, run("escalate", 1, RunState::Failed, json!(null))];
        assert_eq!(
            check(&definition, json!({}), &runs).2,
            Some(End::Failed {
                error: "step `ack` failed: its handler `escalate` failed: boom".into()
            })
        );
    }

    fn plan_of(definition: &Definition, runs: &[Run]) -> Plan {
        plan(definition, &json!({}), runs, 0.5)
    }

    #[test]
    fn mappings_and_output_use_cel() {
        let definition = definition(
            "name: m
steps:
  - { id: score, kind: task, handler: h }
  - { id: notify, kind: task, handler: h, needs: [score], when: 'steps.score.output.risk == \"high\"', input: { who: 'input.patient', score: 'steps.score.output.value' } }
output: { risk: 'steps.score.output.risk', notified: 'steps.notify.state == \"completed\"' }
",
        );
        let runs = [run(
            "score",
            1,
            RunState::Completed,
            json!({ "risk": "high", "value": 7 }),
        )];
        let plan = plan(&definition, &json!({ "patient": "p-9" }), &runs, 0.5);
        assert_eq!(plan.starts[0].input, json!({ "who": "p-9", "score": 7 }));
        let runs = [
            runs[0].clone(),
            run("notify", 1, RunState::Completed, json!(null)),
        ];
        assert_eq!(
            check(&definition, json!({ "patient": "p-9" }), &runs).2,
            Some(End::Completed {
                output: json!({ "risk": "high", "notified": true })
            })
        );
    }

    #[test]
    fn a_failing_condition_fails_the_instance_with_its_step() {
        let definition = definition(
            "name: c\nsteps:\n  - { id: a, kind: task, handler: h, when: 'input.missing.deeper' }",
        );
        let (_, _, end) = check(&definition, json!({}), &[]);
        let Some(End::Failed { error }) = end else {
            panic!("{end:?}")
        };
        assert!(error.starts_with("step `a`: when:"), "{error}");
    }
}

//! State transitions of an instance when one of its task runs finishes.
//!
//! Pure functions: given the definition and the outcome of a step, decide what
//! the instance does next. The store applies the decision in one transaction.

use serde_json::Value;

use crate::definition::{Definition, Step};

/// How a task run ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded { output: Value },
    Failed { error: String },
}

/// What the instance does after a step finishes.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition<'a> {
    /// Make `step` ready with `input`.
    Next { step: &'a Step, input: Value },
    /// The instance completed with `output`.
    Complete { output: Value },
    /// The instance failed with `error`.
    Fail { error: String },
}

/// Decides the next transition after `step_id` ended with `outcome`.
pub fn after_step<'a>(
    definition: &'a Definition,
    step_id: &str,
    outcome: &Outcome,
) -> Transition<'a> {
    match outcome {
        Outcome::Failed { error } => Transition::Fail {
            error: format!("step `{step_id}` failed: {error}"),
        },
        Outcome::Succeeded { output } => match definition.step_after(step_id) {
            Some(step) => Transition::Next {
                step,
                input: output.clone(),
            },
            None => Transition::Complete {
                output: output.clone(),
            },
        },
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
    use serde_json::json;

    fn definition() -> Definition {
        Definition::from_json(
            br#"{"name":"d","steps":[{"id":"a","kind":"task","handler":"h"},{"id":"b","kind":"task","handler":"h"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn success_moves_to_next_step_with_output_as_input() {
        let definition = definition();
        let outcome = Outcome::Succeeded {
            output: json!({"x": 1}),
        };
        match after_step(&definition, "a", &outcome) {
            Transition::Next { step, input } => {
                assert_eq!(step.id, "b");
                assert_eq!(input, json!({"x": 1}));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn success_of_last_step_completes() {
        let definition = definition();
        let outcome = Outcome::Succeeded { output: json!(7) };
        assert_eq!(
            after_step(&definition, "b", &outcome),
            Transition::Complete { output: json!(7) }
        );
    }

    #[test]
    fn failure_fails_the_instance_naming_the_step() {
        let definition = definition();
        let outcome = Outcome::Failed {
            error: "boom".into(),
        };
        assert_eq!(
            after_step(&definition, "a", &outcome),
            Transition::Fail {
                error: "step `a` failed: boom".into()
            }
        );
    }

    #[test]
    fn idempotency_key_is_stable() {
        let id = uuid::Uuid::nil();
        assert_eq!(idempotency_key(id, "a"), idempotency_key(id, "a"));
        assert_ne!(idempotency_key(id, "a"), idempotency_key(id, "b"));
    }
}

//! Workflow definitions: the declarative schema, its parsing and its validation.
//!
//! A definition is a named list of steps. In this version steps run in order;
//! each step's output is the next step's input. Validation collects every
//! problem it finds, each naming the step and field at fault.

use serde::{Deserialize, Serialize};

/// Most steps one definition may hold.
pub const STEPS_MAX: usize = 200;
/// Longest definition name, step id or handler name, in bytes.
pub const NAME_LEN_MAX: usize = 128;

/// A workflow definition as a client publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub steps: Vec<Step>,
}

/// One node of a definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    /// The handler a `task` step runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
}

/// The kinds of step this version executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Task,
}

/// One validation problem, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// JSON path of the field at fault, e.g. `steps[1].handler`.
    pub field: String,
    /// The step id at fault, when the problem belongs to one step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub message: String,
}

impl Definition {
    /// Parses and validates a JSON definition, returning every problem found.
    pub fn from_json(bytes: &[u8]) -> Result<Definition, Vec<Problem>> {
        let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
        let definition: Definition =
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                let field = error.path().to_string();
                vec![Problem {
                    field: if field == "." { String::new() } else { field },
                    step: None,
                    message: error.inner().to_string(),
                }]
            })?;
        definition.validate()?;
        Ok(definition)
    }

    /// Checks names, ids, handlers and limits; returns all problems at once.
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
        let mut seen = std::collections::HashSet::new();
        for (index, step) in self.steps.iter().enumerate() {
            let step_name = Some(step.id.as_str());
            check_name(
                &step.id,
                &format!("steps[{index}].id"),
                step_name,
                &mut problems,
            );
            if !seen.insert(step.id.as_str()) {
                problems.push(problem(
                    &format!("steps[{index}].id"),
                    step_name,
                    &format!("duplicate step id `{}`", step.id),
                ));
            }
            match (step.kind, &step.handler) {
                (StepKind::Task, None) => problems.push(problem(
                    &format!("steps[{index}].handler"),
                    step_name,
                    "a task step needs a handler",
                )),
                (StepKind::Task, Some(handler)) => check_name(
                    handler,
                    &format!("steps[{index}].handler"),
                    step_name,
                    &mut problems,
                ),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The step that runs first.
    pub fn first_step(&self) -> &Step {
        debug_assert!(!self.steps.is_empty(), "validated definitions have steps");
        &self.steps[0]
    }

    /// The step that follows `step_id`, or `None` when it is the last.
    pub fn step_after(&self, step_id: &str) -> Option<&Step> {
        let index = self.steps.iter().position(|step| step.id == step_id)?;
        self.steps.get(index + 1)
    }

    /// The step with this id.
    pub fn step(&self, step_id: &str) -> Option<&Step> {
        self.steps.iter().find(|step| step.id == step_id)
    }
}

impl Step {
    /// The handler name a worker looks up for this step.
    pub fn handler_name(&self) -> &str {
        self.handler.as_deref().unwrap_or_default()
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

    fn check(json: &str, expected: &[(&str, Option<&str>, &str)]) {
        let result = Definition::from_json(json.as_bytes());
        let problems = result.err().unwrap_or_default();
        let got: Vec<(&str, Option<&str>, &str)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.step.as_deref(), p.message.as_str()))
            .collect();
        assert_eq!(got.len(), expected.len(), "problems: {problems:?}");
        for ((field, step, message), (want_field, want_step, want_message)) in
            got.iter().zip(expected)
        {
            assert_eq!(field, want_field);
            assert_eq!(step, want_step);
            assert!(
                message.contains(want_message),
                "{message:?} lacks {want_message:?}"
            );
        }
    }

    #[test]
    fn valid_definition_parses() {
        check(
            r#"{"name":"admission","steps":[{"id":"a","kind":"task","handler":"echo"}]}"#,
            &[],
        );
    }

    #[test]
    fn unknown_field_names_its_path() {
        check(
            r#"{"name":"x","steps":[{"id":"a","kind":"task","handler":"echo","retries":3}]}"#,
            &[("steps[0].retries", None, "unknown field `retries`")],
        );
    }

    #[test]
    fn unknown_kind_names_its_path() {
        check(
            r#"{"name":"x","steps":[{"id":"a","kind":"teleport"}]}"#,
            &[("steps[0].kind", None, "unknown variant `teleport`")],
        );
    }

    #[test]
    fn every_problem_is_reported() {
        check(
            r#"{"name":"bad name","steps":[
                {"id":"a","kind":"task"},
                {"id":"a","kind":"task","handler":"echo"}]}"#,
            &[
                ("name", None, "may hold only"),
                ("steps[0].handler", Some("a"), "needs a handler"),
                ("steps[1].id", Some("a"), "duplicate step id `a`"),
            ],
        );
    }

    #[test]
    fn empty_steps_rejected() {
        check(
            r#"{"name":"x","steps":[]}"#,
            &[("steps", None, "at least one step")],
        );
    }

    #[test]
    fn malformed_json_rejected() {
        check(r#"{"name":"x","steps":["#, &[("steps", None, "EOF")]);
    }

    #[test]
    fn step_after_walks_in_order() {
        let definition = Definition::from_json(
            br#"{"name":"x","steps":[{"id":"a","kind":"task","handler":"h"},{"id":"b","kind":"task","handler":"h"}]}"#,
        )
        .unwrap();
        assert_eq!(definition.first_step().id, "a");
        assert_eq!(definition.step_after("a").map(|s| s.id.as_str()), Some("b"));
        assert_eq!(definition.step_after("b"), None);
        assert_eq!(definition.step_after("zz"), None);
    }
}

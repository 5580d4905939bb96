//! Conditions and data mappings in CEL (the Common Expression Language),
//! evaluated over the instance input and earlier steps' outputs.
//!
//! In an expression, `input` is the instance's input and `steps.<id>` holds
//! `output` and `state` of every step that has finished.

use serde_json::Value;

/// Compiles a CEL expression, or says why it does not parse.
pub fn compile(source: &str) -> Result<cel::Program, String> {
    cel::Program::compile(source).map_err(|error| {
        error
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    })
}

/// The variables an expression sees.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The instance input.
    pub input: &'a Value,
    /// `{ step_id: { "output": ..., "state": ... } }`.
    pub steps: &'a Value,
}

/// Evaluates one expression to a JSON value.
pub fn evaluate(source: &str, scope: Scope<'_>) -> Result<Value, String> {
    let program = compile(source)?;
    let mut context = cel::Context::default();
    context.add_variable_from_value("input", to_cel(scope.input));
    context.add_variable_from_value("steps", to_cel(scope.steps));
    let value = program
        .execute(&context)
        .map_err(|error| format!("`{source}`: {error}"))?;
    value
        .json()
        .map_err(|error| format!("`{source}`: result is not JSON: {error}"))
}

/// JSON to CEL, with every integer that fits an `int` as `int` (not
/// `uint`), so `input.count * 2` works as a user expects.
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(flag) => cel::Value::Bool(*flag),
        Value::Number(number) => match (number.as_i64(), number.as_u64()) {
            (Some(int), _) => cel::Value::Int(int),
            (None, Some(uint)) => cel::Value::UInt(uint),
            _ => cel::Value::Float(number.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(text) => cel::Value::String(std::sync::Arc::new(text.clone())),
        Value::Array(items) => {
            cel::Value::List(std::sync::Arc::new(items.iter().map(to_cel).collect()))
        }
        Value::Object(fields) => {
            let map: std::collections::HashMap<String, cel::Value> = fields
                .iter()
                .map(|(key, item)| (key.clone(), to_cel(item)))
                .collect();
            cel::Value::from(map)
        }
    }
}

/// Evaluates a condition; anything but a boolean is an error.
pub fn condition(source: &str, scope: Scope<'_>) -> Result<bool, String> {
    match evaluate(source, scope)? {
        Value::Bool(holds) => Ok(holds),
        other => Err(format!("`{source}` gave {other}, not a boolean")),
    }
}

/// Evaluates a mapping: a string is an expression; arrays and objects are
/// mapped leaf by leaf; other JSON values are literals.
pub fn mapping(mapping: &Value, scope: Scope<'_>) -> Result<Value, String> {
    match mapping {
        Value::String(source) => evaluate(source, scope),
        Value::Array(items) => items
            .iter()
            .map(|item| mapping_of(item, scope))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(fields) => fields
            .iter()
            .map(|(key, item)| mapping_of(item, scope).map(|value| (key.clone(), value)))
            .collect::<Result<serde_json::Map<_, _>, _>>()
            .map(Value::Object),
        literal => Ok(literal.clone()),
    }
}

fn mapping_of(item: &Value, scope: Scope<'_>) -> Result<Value, String> {
    mapping(item, scope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(source: &str, expected: Value) {
        let input = json!({ "patient": "p-1", "vitals": { "spo2": 91, "heart_rate": 130 }, "tags": ["icu"] });
        let steps =
            json!({ "score": { "output": { "score": 7, "risk": "high" }, "state": "completed" } });
        let scope = Scope {
            input: &input,
            steps: &steps,
        };
        assert_eq!(evaluate(source, scope).unwrap(), expected, "{source}");
    }

    #[test]
    fn expressions_see_input_and_steps() {
        check("input.patient", json!("p-1"));
        check(
            "input.vitals.spo2 < 92 && steps.score.output.risk == 'high'",
            json!(true),
        );
        check("steps.score.output.score + 1", json!(8));
        check("'icu' in input.tags", json!(true));
        check("size(input.tags)", json!(1));
        check("has(input.missing)", json!(false));
    }

    #[test]
    fn mappings_keep_literals_and_map_strings() {
        let input = json!({ "a": 2 });
        let steps = json!({});
        let scope = Scope {
            input: &input,
            steps: &steps,
        };
        let mapped = mapping(
            &json!({ "doubled": "input.a * 2", "fixed": 5, "list": ["input.a", true] }),
            scope,
        )
        .unwrap();
        assert_eq!(
            mapped,
            json!({ "doubled": 4, "fixed": 5, "list": [2, true] })
        );
    }

    #[test]
    fn errors_name_the_expression() {
        let input = json!({});
        let steps = json!({});
        let scope = Scope {
            input: &input,
            steps: &steps,
        };
        assert!(
            condition("input.x", scope)
                .unwrap_err()
                .contains("`input.x`")
        );
        assert_eq!(condition("1 == 1", scope), Ok(true));
        assert!(
            condition("1 + 1", scope)
                .unwrap_err()
                .contains("not a boolean")
        );
    }
}

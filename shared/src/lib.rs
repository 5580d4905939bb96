//! Ward's domain model and wire types: definitions, expressions, the engine's
//! decisions, schedules, and the messages and API bodies that cross process
//! boundaries. This crate does no I/O.

pub mod definition;
pub mod engine;
pub mod expr;
pub mod schedule;
pub mod settings;
pub mod trace;
pub mod wire;

pub use definition::{Definition, Problem, Step, StepKind};

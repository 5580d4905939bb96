//! Ward's domain model and wire types: definitions, state transitions and the
//! messages and API bodies that cross process boundaries. This crate does no I/O.

pub mod definition;
pub mod settings;
pub mod transition;
pub mod wire;

pub use definition::{Definition, Problem, Step};
pub use transition::Transition;

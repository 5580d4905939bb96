//! Placeholder library target so the integration-test package builds; the tests live in `it/`.

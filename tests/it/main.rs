//! Ward's integration tests: one binary, one module per area, all against
//! the real Postgres, RabbitMQ and etcd. Each test runs in its own sandbox
//! (schema, queue prefix, etcd prefix) so tests run in parallel.

mod acks;
mod api;
mod autoscale;
mod batching;
mod bench;
mod chaos;
mod cli;
mod election;
mod examples;
mod execution;
mod external;
mod isolation;
mod leases;
mod membership;
mod ops;
mod prometheus;
mod sandbox;
mod schedules;
mod shutdown;
mod tenancy;
mod trace_context;
mod workflow;

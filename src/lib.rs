//! workerpool-operator: run queue consumers on Kubernetes the way Supervisor runs them on a VM,
//! and roll them to new code without cutting a message in half.

pub mod agent;
pub mod api;
pub mod controller;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod stopflag;
pub mod telemetry;

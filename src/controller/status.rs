//! Building the pool's status from a plan. Pure: the same facts give the same status, so the
//! controller writes nothing at steady state.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::{WorkerPoolStatus, condition};
use crate::controller::plan::{Plan, Settings};
use crate::controller::validate::SpecError;

/// What the reconcile found, for the status.
pub enum Outcome<'a> {
    Planned { plan: &'a Plan, settings: &'a Settings },
    Invalid(&'a SpecError),
}

pub fn build(
    outcome: Outcome,
    generation: Option<i64>,
    selector: String,
    previous: Option<&WorkerPoolStatus>,
    now: Timestamp,
) -> WorkerPoolStatus {
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        // Keep the transition time while the status stays the same: no churn at steady state.
        let last_transition_time = previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_ && c.status == status))
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    };
    match outcome {
        Outcome::Invalid(error) => {
            let message = format!("invalid spec: {error}");
            let keep = previous.cloned().unwrap_or_default();
            WorkerPoolStatus {
                observed_generation: generation,
                selector: Some(selector),
                conditions: vec![
                    condition(condition::READY, false, "InvalidSpec", message.clone()),
                    condition(condition::PROGRESSING, false, "InvalidSpec", message.clone()),
                    condition(condition::ROLLOUT_COMPLETE, false, "InvalidSpec", message),
                ],
                ..keep
            }
        }
        Outcome::Planned { plan, settings } => {
            let c = &plan.counts;
            let complete = plan.rollout_complete(settings);
            let rolling = c.outdated > 0;
            let available = c.ready.saturating_sub(c.draining).max(c.updated_ready) >= settings.replicas;
            let progress = format!(
                "{} of {} workers updated and ready, {} draining, {} outdated",
                c.updated_ready, settings.replicas, c.draining, c.outdated
            );
            let (progressing_reason, progressing_message) = if rolling {
                ("RolloutInProgress", format!("rolling out revision {}: {progress}", settings.revision))
            } else if !complete {
                ("Scaling", progress.clone())
            } else {
                ("Idle", format!("all {} workers run revision {}", settings.replicas, settings.revision))
            };
            WorkerPoolStatus {
                observed_generation: generation,
                replicas: count(c.replicas),
                ready_replicas: count(c.ready),
                updated_replicas: count(c.updated),
                draining_replicas: count(c.draining),
                current_revision: Some(plan.current_revision.clone()),
                update_revision: Some(settings.revision.clone()),
                selector: Some(selector),
                conditions: vec![
                    condition(
                        condition::READY,
                        complete,
                        if complete { "AllWorkersReady" } else { "NotAllWorkersReady" },
                        progress.clone(),
                    ),
                    condition(
                        condition::AVAILABLE,
                        available,
                        if available { "MinimumWorkersReady" } else { "TooFewWorkersReady" },
                        format!("{} workers ready, {} wanted", c.ready, settings.replicas),
                    ),
                    condition(condition::PROGRESSING, !complete, progressing_reason, progressing_message),
                    condition(
                        condition::ROLLOUT_COMPLETE,
                        complete,
                        if complete { "AllWorkersUpdated" } else { "RolloutInProgress" },
                        progress,
                    ),
                ],
            }
        }
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Strategy;
    use crate::controller::plan::{Phase, WorkerPod, plan};
    use crate::stopflag::StopFlag;
    use k8s_openapi::jiff::SignedDuration;

    fn settings() -> Settings {
        Settings {
            replicas: 1,
            revision: "r1".into(),
            strategy: Strategy::Rolling,
            max_surge: 1,
            drain_timeout: SignedDuration::from_secs(60),
        }
    }

    fn ready_pod() -> WorkerPod {
        WorkerPod {
            name: "a".into(),
            revision: "r1".into(),
            phase: Phase::Live,
            ready: true,
            created: Timestamp::UNIX_EPOCH,
            drain_started_at: None,
        }
    }

    #[test]
    fn same_facts_give_the_same_status_later() {
        let s = settings();
        let flag = StopFlag { revision: Some("r1".into()), ..Default::default() };
        let p = plan(&s, &[ready_pod()], &flag, Timestamp::UNIX_EPOCH, None);
        let first =
            build(Outcome::Planned { plan: &p, settings: &s }, Some(1), "x=y".into(), None, Timestamp::UNIX_EPOCH);
        let later = Timestamp::from_second(1000).unwrap();
        let second = build(Outcome::Planned { plan: &p, settings: &s }, Some(1), "x=y".into(), Some(&first), later);
        assert_eq!(first, second);
        let complete = first.conditions.iter().find(|c| c.type_ == condition::ROLLOUT_COMPLETE).unwrap();
        assert_eq!(complete.status, "True");
    }

    #[test]
    fn invalid_spec_sets_ready_false_with_the_field() {
        let error = SpecError { field: "spec.consumer.container".into(), message: "no container named \"x\"".into() };
        let status = build(Outcome::Invalid(&error), Some(2), "x=y".into(), None, Timestamp::UNIX_EPOCH);
        let ready = status.conditions.iter().find(|c| c.type_ == condition::READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
        assert!(ready.message.contains("spec.consumer.container"));
        assert_eq!(status.observed_generation, Some(2));
    }
}

//! Leader election on a `coordination.k8s.io/v1` Lease, so that two controller replicas can run
//! and only one reconciles. The decision is a pure function; the loop around it is thin.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

/// How long a lease is valid without renewal; a crashed leader is replaced after this.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews, and a candidate retries.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take (or keep) the lease.
    Take,
    /// Somebody else holds a valid lease.
    Wait,
}

/// May `me` hold the lease now?
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else { return Decision::Take };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return Decision::Take;
    }
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(renewed) if renewed.0 + duration > now => Decision::Wait,
        _ => Decision::Take,
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: String) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.into(), identity }
    }

    /// Tries once to take or renew the lease; true when this replica holds it afterwards.
    /// Writes are conditional on the version read, so two candidates never both win.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        if decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now) == Decision::Wait {
            return Ok(false);
        }
        let previous = current.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
        let taking_over = previous.holder_identity.as_deref() != Some(&self.identity);
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            renew_time: Some(MicroTime(now)),
            acquire_time: if taking_over { Some(MicroTime(now)) } else { previous.acquire_time.clone() },
            lease_transitions: Some(
                previous.lease_transitions.unwrap_or(0) + i32::from(taking_over && current.is_some()),
            ),
            ..Default::default()
        };
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(lease) => {
                if taking_over {
                    info!(lease = %lease.name_any(), identity = %self.identity, "became the leader");
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false), // another replica wrote first
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_hold().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!("leader election: {e}"),
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews the lease until it is lost (or cannot be renewed before it expires); then returns.
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_hold().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("lost the leader lease to another replica");
                    return;
                }
                Err(e) => warn!("cannot renew the leader lease: {e}"),
            }
            // Stop before the lease can expire, so two leaders never overlap.
            if last_renewed.elapsed() > LEASE_DURATION - RENEW_EVERY * 2 {
                warn!("could not renew the leader lease in time");
                return;
            }
        }
    }

    /// Gives the lease up on a clean shutdown, so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else { return };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
            warn!("cannot release the leader lease: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_seconds_ago: i64) -> LeaseSpec {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_seconds_ago))),
            ..Default::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn free_or_own_lease_is_taken() {
        assert_eq!(decide(None, "a", now()), Decision::Take);
        assert_eq!(decide(Some(&lease("", 1)), "a", now()), Decision::Take);
        assert_eq!(decide(Some(&lease("a", 1)), "a", now()), Decision::Take);
    }

    #[test]
    fn a_valid_lease_of_another_replica_is_respected() {
        assert_eq!(decide(Some(&lease("b", 5)), "a", now()), Decision::Wait);
    }

    #[test]
    fn an_expired_lease_is_taken_over() {
        assert_eq!(decide(Some(&lease("b", 16)), "a", now()), Decision::Take);
    }
}

//! The stop flag: the ConfigMap `<pool>-stop-flag`, the only channel from controller to agents.
//! The Kubernetes twin of Symfony's `messenger:stop-workers` cache flag. Pure: parsing,
//! rendering and the agent's verdict; the I/O lives in the controller and the agent.
//!
//! | key                  | meaning for an agent |
//! |----------------------|----------------------|
//! | `revision`           | the pool's current revision: a worker of any other revision stops after its current message and exits 0, unless its pod is listed in `keep` |
//! | `keep`               | old-revision pods that keep consuming for now (`Surge`: until enough new workers are Ready) |
//! | `drain`              | pods that stop after their current message and exit 0 (scale-in, surge steps) |
//! | `restartRequestedAt` | RFC 3339: a consumer started before it stops after its current message and is restarted in place |
//!
//! Lists are one pod name per line.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;

pub const REVISION: &str = "revision";
pub const KEEP: &str = "keep";
pub const DRAIN: &str = "drain";
pub const RESTART_REQUESTED_AT: &str = "restartRequestedAt";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopFlag {
    pub revision: Option<String>,
    pub keep: BTreeSet<String>,
    pub drain: BTreeSet<String>,
    pub restart_requested_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stop flag key {key:?}: {message}")]
pub struct FlagError {
    pub key: &'static str,
    pub message: String,
}

/// What one worker should do, given the flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep consuming.
    Continue,
    /// Finish the current message, exit, and be started again in the same pod.
    RestartInPlace,
    /// Finish the current message, exit, and do not start again: the agent exits 0.
    Retire,
}

/// Who is asking: the agent's identity, from the downward API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    pub pod: String,
    pub revision: String,
}

impl StopFlag {
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, FlagError> {
        let restart_requested_at = match data.get(RESTART_REQUESTED_AT).map(|s| s.trim()).filter(|s| !s.is_empty()) {
            None => None,
            Some(text) => Some(text.parse::<Timestamp>().map_err(|e| FlagError {
                key: RESTART_REQUESTED_AT,
                message: format!("{text:?} is not an RFC 3339 time: {e}"),
            })?),
        };
        Ok(Self {
            revision: data.get(REVISION).map(|s| s.trim().to_string()).filter(|s| !s.is_empty()),
            keep: names(data.get(KEEP)),
            drain: names(data.get(DRAIN)),
            restart_requested_at,
        })
    }

    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        if let Some(revision) = &self.revision {
            data.insert(REVISION.to_string(), revision.clone());
        }
        if !self.keep.is_empty() {
            data.insert(KEEP.to_string(), join(&self.keep));
        }
        if !self.drain.is_empty() {
            data.insert(DRAIN.to_string(), join(&self.drain));
        }
        if let Some(at) = self.restart_requested_at {
            data.insert(RESTART_REQUESTED_AT.to_string(), at.to_string());
        }
        data
    }

    /// The agent's rule. `consumer_started_at` is when the running consumer process started.
    pub fn verdict(&self, me: &Worker, consumer_started_at: Timestamp) -> Verdict {
        let superseded = self.revision.as_ref().is_some_and(|r| *r != me.revision) && !self.keep.contains(&me.pod);
        if superseded || self.drain.contains(&me.pod) {
            Verdict::Retire
        } else if self.restart_requested_at.is_some_and(|at| at > consumer_started_at) {
            Verdict::RestartInPlace
        } else {
            Verdict::Continue
        }
    }
}

fn names(value: Option<&String>) -> BTreeSet<String> {
    value
        .map(|v| {
            v.split(|c: char| c == '\n' || c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn join(names: &BTreeSet<String>) -> String {
    names.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Worker {
        Worker { pod: "emails-abc".into(), revision: "r1".into() }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn round_trips_through_configmap_data() {
        let flag = StopFlag {
            revision: Some("r2".into()),
            keep: ["a".to_string(), "b".to_string()].into(),
            drain: ["c".to_string()].into(),
            restart_requested_at: Some(ts("2026-01-02T03:04:05Z")),
        };
        assert_eq!(StopFlag::from_data(&flag.to_data()).unwrap(), flag);
    }

    #[test]
    fn same_revision_continues() {
        let flag = StopFlag { revision: Some("r1".into()), ..Default::default() };
        assert_eq!(flag.verdict(&me(), ts("2026-01-01T00:00:00Z")), Verdict::Continue);
    }

    #[test]
    fn other_revision_retires_unless_kept() {
        let mut flag = StopFlag { revision: Some("r2".into()), ..Default::default() };
        assert_eq!(flag.verdict(&me(), ts("2026-01-01T00:00:00Z")), Verdict::Retire);
        flag.keep.insert("emails-abc".into());
        assert_eq!(flag.verdict(&me(), ts("2026-01-01T00:00:00Z")), Verdict::Continue);
    }

    #[test]
    fn drained_pod_retires() {
        let flag =
            StopFlag { revision: Some("r1".into()), drain: ["emails-abc".to_string()].into(), ..Default::default() };
        assert_eq!(flag.verdict(&me(), ts("2026-01-01T00:00:00Z")), Verdict::Retire);
    }

    #[test]
    fn restart_request_applies_only_to_older_consumers() {
        let flag = StopFlag { restart_requested_at: Some(ts("2026-01-01T12:00:00Z")), ..Default::default() };
        assert_eq!(flag.verdict(&me(), ts("2026-01-01T11:00:00Z")), Verdict::RestartInPlace);
        assert_eq!(flag.verdict(&me(), ts("2026-01-01T12:00:01Z")), Verdict::Continue);
    }

    #[test]
    fn bad_time_names_the_key() {
        let data = BTreeMap::from([(RESTART_REQUESTED_AT.to_string(), "yesterday".to_string())]);
        assert_eq!(StopFlag::from_data(&data).unwrap_err().key, RESTART_REQUESTED_AT);
    }

    #[test]
    fn lists_accept_newlines_commas_and_spaces() {
        let data = BTreeMap::from([(DRAIN.to_string(), "a\nb, c d".to_string())]);
        assert_eq!(StopFlag::from_data(&data).unwrap().drain.len(), 4);
    }
}

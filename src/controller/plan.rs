//! The rollout planner: (settings, observed pods, current stop flag, now) → actions. Pure.
//!
//! All rollout state lives in the cluster: the stop flag (target revision, which old pods are
//! kept, which pods drain) and the pods (revision label, phase, drain-start annotation). So a
//! controller restarted mid-rollout plans from the same facts and picks up where it stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::Strategy;
use crate::stopflag::StopFlag;

/// What the planner needs to know about the pool's spec.
#[derive(Clone, Debug)]
pub struct Settings {
    pub replicas: usize,
    pub revision: String,
    pub strategy: Strategy,
    pub max_surge: usize,
    pub drain_timeout: SignedDuration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Pending or Running, not being deleted.
    Live,
    /// Has a deletionTimestamp: the kubelet is stopping it.
    Terminating,
    Succeeded,
    Failed,
}

/// One worker pod as the planner sees it.
#[derive(Clone, Debug)]
pub struct WorkerPod {
    pub name: String,
    pub revision: String,
    pub phase: Phase,
    pub ready: bool,
    pub created: Timestamp,
    pub drain_started_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// The worker exited (drained, or its agent gave up); remove the finished pod.
    Ended(Phase),
    /// Still busy `drain_timeout` after its drain began.
    DrainTimeout { draining_for: Duration },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Live pods.
    pub replicas: usize,
    pub ready: usize,
    /// Live pods of the target revision.
    pub updated: usize,
    /// Live pods told to stop after their current message.
    pub draining: usize,
    /// Live pods of the target revision that consume and are Ready.
    pub updated_ready: usize,
    /// Live or terminating pods of other revisions.
    pub outdated: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The stop flag as it must be (written first, before any pod is touched).
    pub flag: StopFlag,
    /// New pods of the target revision to create.
    pub create: usize,
    /// Draining pods to stamp with the time their drain began.
    pub mark_draining: Vec<String>,
    pub delete: Vec<(String, DeleteReason)>,
    /// When to look again even if nothing changes (drain deadlines, crash back-off).
    pub requeue_after: Option<Duration>,
    pub counts: Counts,
    /// The revision the outdated workers run (the most common one), or the target when none are left.
    pub current_revision: String,
}

impl Plan {
    pub fn rollout_complete(&self, settings: &Settings) -> bool {
        self.counts.outdated == 0 && self.counts.draining == 0 && self.counts.updated_ready == settings.replicas
    }
}

pub fn plan(
    settings: &Settings,
    pods: &[WorkerPod],
    current: &StopFlag,
    now: Timestamp,
    creation_blocked_until: Option<Timestamp>,
) -> Plan {
    let target = &settings.revision;
    let live: Vec<&WorkerPod> = pods.iter().filter(|p| p.phase == Phase::Live).collect();
    let is_new = |p: &WorkerPod| &p.revision == target;
    let rollout_starts = current.revision.as_ref() != Some(target);

    // Old pods kept consuming (Surge only) until enough new workers are Ready.
    let mut keep = BTreeSet::new();
    if settings.strategy == Strategy::Surge {
        let was_consuming = |p: &WorkerPod| {
            !current.drain.contains(&p.name)
                && (current.keep.contains(&p.name)
                    || (rollout_starts && current.revision.as_ref() == Some(&p.revision)))
        };
        let mut candidates: Vec<&WorkerPod> = live.iter().copied().filter(|p| !is_new(p) && was_consuming(p)).collect();
        candidates.sort_by_key(|p| (!p.ready, p.name.clone()));
        let new_ready = live.iter().filter(|p| is_new(p) && p.ready && !current.drain.contains(&p.name)).count();
        let keep_count = settings.replicas.saturating_sub(new_ready);
        keep.extend(candidates.into_iter().take(keep_count).map(|p| p.name.clone()));
    }

    // Scale-in: drain the excess, not-ready first, then the youngest.
    let live_names: BTreeSet<&String> = live.iter().map(|p| &p.name).collect();
    let mut drain: BTreeSet<String> = current.drain.iter().filter(|n| live_names.contains(n)).cloned().collect();
    let consumes =
        |p: &WorkerPod, drain: &BTreeSet<String>| (is_new(p) || keep.contains(&p.name)) && !drain.contains(&p.name);
    // (Kept old workers are already capped by `keep_count`; only new ones can be in excess.)
    let mut consuming_new: Vec<&WorkerPod> =
        live.iter().copied().filter(|p| is_new(p) && consumes(p, &drain)).collect();
    if consuming_new.len() > settings.replicas {
        consuming_new.sort_by_key(|p| (p.ready, std::cmp::Reverse(p.created), p.name.clone()));
        let excess = consuming_new.len() - settings.replicas;
        drain.extend(consuming_new.drain(..excess).map(|p| p.name.clone()));
    }

    let flag = StopFlag {
        revision: Some(target.clone()),
        keep: keep.clone(),
        drain,
        restart_requested_at: current.restart_requested_at,
    };

    // Draining pods: stamp when it began; delete those past the timeout.
    let draining: Vec<&WorkerPod> = live.iter().copied().filter(|p| !consumes(p, &flag.drain)).collect();
    let mut mark_draining = Vec::new();
    let mut delete = Vec::new();
    let mut deadlines = Vec::new();
    for pod in &draining {
        let Some(started) = pod.drain_started_at else {
            mark_draining.push(pod.name.clone());
            deadlines.push(settings.drain_timeout);
            continue;
        };
        let draining_for = now.duration_since(started);
        if draining_for >= settings.drain_timeout {
            let draining_for = Duration::try_from(draining_for).unwrap_or_default();
            delete.push((pod.name.clone(), DeleteReason::DrainTimeout { draining_for }));
        } else {
            deadlines.push(settings.drain_timeout - draining_for);
        }
    }
    for pod in pods.iter().filter(|p| matches!(p.phase, Phase::Succeeded | Phase::Failed)) {
        delete.push((pod.name.clone(), DeleteReason::Ended(pod.phase)));
    }

    // New pods.
    let consuming_new = live.iter().filter(|p| is_new(p) && consumes(p, &flag.drain)).count();
    let consuming_all = live.iter().filter(|p| consumes(p, &flag.drain)).count();
    let outdated_live = live.iter().filter(|p| !is_new(p)).count();
    let outdated_terminating = pods.iter().filter(|p| p.phase == Phase::Terminating && !is_new(p)).count();
    let wanted = match settings.strategy {
        // A slot is free once its old worker has drained and exited.
        Strategy::Rolling => settings.replicas.saturating_sub(consuming_all + outdated_live),
        Strategy::Surge => settings
            .replicas
            .saturating_sub(consuming_new)
            .min((settings.replicas + settings.max_surge).saturating_sub(live.len())),
        // Never two versions at once: wait until every old worker is gone.
        Strategy::Recreate if outdated_live + outdated_terminating > 0 => 0,
        Strategy::Recreate => settings.replicas.saturating_sub(consuming_new),
    };
    let blocked = creation_blocked_until.filter(|until| *until > now);
    let create = if blocked.is_some() { 0 } else { wanted };
    if let (Some(until), true) = (blocked, wanted > 0) {
        deadlines.push(until.duration_since(now));
    }

    let mut by_revision: BTreeMap<&String, usize> = BTreeMap::new();
    for pod in live.iter().filter(|p| !is_new(p)) {
        *by_revision.entry(&pod.revision).or_default() += 1;
    }
    let current_revision =
        by_revision.into_iter().max_by_key(|(_, n)| *n).map(|(r, _)| r.clone()).unwrap_or_else(|| target.clone());

    let counts = Counts {
        replicas: live.len(),
        ready: live.iter().filter(|p| p.ready).count(),
        updated: live.iter().filter(|p| is_new(p)).count(),
        draining: draining.len(),
        updated_ready: live.iter().filter(|p| is_new(p) && p.ready && consumes(p, &flag.drain)).count(),
        outdated: outdated_live + outdated_terminating,
    };
    let requeue_after =
        deadlines.into_iter().min().map(|d| Duration::try_from(d).unwrap_or_default() + Duration::from_millis(200));
    Plan { flag, create, mark_draining, delete, requeue_after, counts, current_revision }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn settings(replicas: usize, strategy: Strategy) -> Settings {
        Settings {
            replicas,
            revision: "new".into(),
            strategy,
            max_surge: 1,
            drain_timeout: SignedDuration::from_secs(60),
        }
    }

    fn pod(name: &str, revision: &str) -> WorkerPod {
        WorkerPod {
            name: name.into(),
            revision: revision.into(),
            phase: Phase::Live,
            ready: true,
            created: t(0),
            drain_started_at: None,
        }
    }

    fn flag(revision: &str) -> StopFlag {
        StopFlag { revision: Some(revision.into()), ..Default::default() }
    }

    #[test]
    fn empty_pool_creates_replicas_and_writes_the_revision() {
        let plan = plan(&settings(3, Strategy::Rolling), &[], &StopFlag::default(), t(0), None);
        assert_eq!(plan.create, 3);
        assert_eq!(plan.flag.revision.as_deref(), Some("new"));
        assert!(!plan.rollout_complete(&settings(3, Strategy::Rolling)));
    }

    #[test]
    fn steady_state_does_nothing() {
        let s = settings(2, Strategy::Rolling);
        let pods = [pod("a", "new"), pod("b", "new")];
        let plan = plan(&s, &pods, &flag("new"), t(0), None);
        assert_eq!((plan.create, plan.delete.len(), plan.mark_draining.len()), (0, 0, 0));
        assert_eq!(plan.flag, flag("new"));
        assert!(plan.rollout_complete(&s));
        assert_eq!(plan.requeue_after, None);
    }

    #[test]
    fn rolling_drains_all_old_and_fills_slots_as_they_free() {
        let s = settings(2, Strategy::Rolling);
        let pods = [pod("a", "old"), pod("b", "old")];
        let p = plan(&s, &pods, &flag("old"), t(0), None);
        assert_eq!(p.flag.revision.as_deref(), Some("new"));
        assert!(p.flag.keep.is_empty());
        assert_eq!(p.create, 0, "no slot is free before an old worker has exited");
        assert_eq!(p.mark_draining, ["a", "b"]);
        assert_eq!(p.counts.draining, 2);

        let mut a = pod("a", "old");
        a.phase = Phase::Succeeded;
        let p = plan(&s, &[a, pod("b", "old")], &flag("new"), t(5), None);
        assert_eq!(p.create, 1);
        assert_eq!(p.delete, [("a".to_string(), DeleteReason::Ended(Phase::Succeeded))]);
    }

    #[test]
    fn recreate_waits_for_every_old_worker() {
        let s = settings(2, Strategy::Recreate);
        let mut a = pod("a", "old");
        a.phase = Phase::Succeeded;
        let p = plan(&s, &[a, pod("b", "old")], &flag("new"), t(0), None);
        assert_eq!(p.create, 0);
        let mut b = pod("b", "old");
        b.phase = Phase::Terminating;
        assert_eq!(plan(&s, &[b], &flag("new"), t(0), None).create, 0, "a terminating old pod still blocks");
        assert_eq!(plan(&s, &[], &flag("new"), t(0), None).create, 2);
    }

    #[test]
    fn surge_keeps_old_workers_until_new_ones_are_ready() {
        let s = settings(2, Strategy::Surge);
        let old = [pod("a", "old"), pod("b", "old")];
        let p = plan(&s, &old, &flag("old"), t(0), None);
        assert_eq!(
            p.flag.keep,
            BTreeSet::from(["a".to_string(), "b".to_string()]),
            "kept in the same write as the revision"
        );
        assert_eq!(p.create, 1, "maxSurge 1");
        assert!(p.mark_draining.is_empty());

        // One new pod, not Ready yet: keep both old ones.
        let mut n1 = pod("n1", "new");
        n1.ready = false;
        let p = plan(&s, &[pod("a", "old"), pod("b", "old"), n1.clone()], &p.flag, t(1), None);
        assert_eq!(p.flag.keep.len(), 2);
        assert_eq!(p.create, 0);

        // Ready: release one old worker.
        n1.ready = true;
        let p = plan(&s, &[pod("a", "old"), pod("b", "old"), n1.clone()], &p.flag, t(2), None);
        assert_eq!(p.flag.keep, BTreeSet::from(["a".to_string()]));
        assert_eq!(p.mark_draining, ["b"]);
        assert_eq!(p.create, 0, "b still occupies the surge slot");

        // b exited: its slot goes to a second new pod; a still consumes.
        let p = plan(&s, &[pod("a", "old"), n1.clone()], &p.flag, t(3), None);
        assert_eq!(p.create, 1);
        assert_eq!(p.flag.keep.len(), 1);
    }

    #[test]
    fn surge_never_re_keeps_a_released_worker() {
        let s = settings(2, Strategy::Surge);
        let current = StopFlag { keep: ["a".to_string()].into(), ..flag("new") };
        let p = plan(&s, &[pod("a", "old"), pod("b", "old")], &current, t(0), None);
        assert_eq!(p.flag.keep, BTreeSet::from(["a".to_string()]));
    }

    #[test]
    fn drain_timeout_deletes_the_pod_and_says_how_long() {
        let s = settings(1, Strategy::Rolling);
        let mut a = pod("a", "old");
        a.drain_started_at = Some(t(0));
        let p = plan(&s, &[a.clone()], &flag("new"), t(30), None);
        assert!(p.delete.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_millis(30_200)));
        let p = plan(&s, &[a], &flag("new"), t(61), None);
        assert_eq!(p.delete, [("a".to_string(), DeleteReason::DrainTimeout { draining_for: Duration::from_secs(61) })]);
    }

    #[test]
    fn scale_in_drains_not_ready_then_youngest() {
        let s = settings(2, Strategy::Rolling);
        let mut young = pod("young", "new");
        young.created = t(100);
        let mut unready = pod("unready", "new");
        unready.ready = false;
        let pods = [pod("x", "new"), young, unready, pod("y", "new")];
        let p = plan(&s, &pods, &flag("new"), t(200), None);
        assert_eq!(p.flag.drain, BTreeSet::from(["unready".to_string(), "young".to_string()]));
        assert_eq!(p.create, 0);
        assert_eq!(p.counts.draining, 2);
    }

    #[test]
    fn drained_pods_leave_the_list_when_gone() {
        let s = settings(1, Strategy::Rolling);
        let current = StopFlag { drain: ["gone".to_string()].into(), ..flag("new") };
        let p = plan(&s, &[pod("a", "new")], &current, t(0), None);
        assert!(p.flag.drain.is_empty());
    }

    #[test]
    fn second_change_mid_rollout_rolls_to_the_newest() {
        let s = settings(2, Strategy::Rolling);
        let pods = [pod("a", "old"), pod("m", "middle")];
        let p = plan(&s, &pods, &flag("middle"), t(0), None);
        assert_eq!(p.flag.revision.as_deref(), Some("new"));
        assert_eq!(p.counts.draining, 2, "the middle revision drains too");
        assert_eq!(p.create, 0);
    }

    #[test]
    fn crash_back_off_delays_creation() {
        let s = settings(1, Strategy::Rolling);
        let p = plan(&s, &[], &flag("new"), t(0), Some(t(10)));
        assert_eq!(p.create, 0);
        assert_eq!(p.requeue_after, Some(Duration::from_millis(10_200)));
        assert_eq!(plan(&s, &[], &flag("new"), t(11), Some(t(10))).create, 1);
    }

    #[test]
    fn restart_request_is_preserved() {
        let s = settings(1, Strategy::Rolling);
        let current = StopFlag { restart_requested_at: Some(t(5)), ..flag("new") };
        assert_eq!(plan(&s, &[pod("a", "new")], &current, t(6), None).flag.restart_requested_at, Some(t(5)));
    }
}

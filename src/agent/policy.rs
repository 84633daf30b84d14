//! What an exit of the consumer means and what follows it: exit-code names, the crash back-off,
//! and the counters the agent reports. Pure.

use std::time::Duration;

use crate::api::Preset;

/// What an exit code says about how the consumer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// 0: a limit was reached or the consumer was asked to stop.
    Graceful,
    /// 12: Laravel's `queue:work --memory` exit.
    MemoryLimit,
    /// 137 (128 + SIGKILL): the OOM killer, or a SIGKILL.
    Killed,
    /// 255: a PHP fatal error.
    PhpFatal,
    /// 126/127: the command could not be executed.
    CannotExecute,
    /// Anything else, including other signals (128 + N).
    Other,
}

impl ExitKind {
    pub const ALL: [ExitKind; 6] =
        [Self::Graceful, Self::MemoryLimit, Self::Killed, Self::PhpFatal, Self::CannotExecute, Self::Other];

    pub fn of(code: i32) -> Self {
        match code {
            0 => Self::Graceful,
            12 => Self::MemoryLimit,
            137 => Self::Killed,
            255 => Self::PhpFatal,
            126 | 127 => Self::CannotExecute,
            _ => Self::Other,
        }
    }

    /// Short name, for counters and log fields.
    pub fn name(self) -> &'static str {
        match self {
            Self::Graceful => "graceful",
            Self::MemoryLimit => "memory_limit",
            Self::Killed => "killed",
            Self::PhpFatal => "php_fatal",
            Self::CannotExecute => "cannot_execute",
            Self::Other => "other",
        }
    }

    /// For humans reading the log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Graceful => "graceful exit (limit reached or asked to stop)",
            Self::MemoryLimit => "memory limit reached (Laravel exit 12)",
            Self::Killed => "killed (OOM killer or SIGKILL)",
            Self::PhpFatal => "PHP fatal error",
            Self::CannotExecute => "command cannot be executed",
            Self::Other => "error",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).expect("every kind is listed")
    }
}

/// Whether an exit is a normal recycle (restart at once) rather than a crash (restart after back-off).
/// Laravel's `queue:work` exits 12 when it reached its `--memory` limit: that is its way of recycling.
pub fn is_clean_exit(preset: Preset, code: i32) -> bool {
    code == 0 || (preset == Preset::Laravel && code == 12)
}

/// The name of signal `n` (for "killed by SIGSEGV" in logs).
pub fn signal_name(n: i32) -> String {
    nix::sys::signal::Signal::try_from(n).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {n}"))
}

/// Exponential back-off: `initial`, doubling up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self { initial, max, next: initial }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// What to do after the consumer ended by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    RestartNow,
    RestartAfter(Duration),
    /// Too many crashes in a row: the agent exits with the consumer's code.
    GiveUp,
}

#[derive(Clone, Debug)]
pub struct CrashPolicy {
    backoff: Backoff,
    healthy_after: Duration,
    /// 0: never give up.
    max_consecutive: u32,
    consecutive: u32,
}

impl CrashPolicy {
    pub fn new(initial: Duration, max: Duration, healthy_after: Duration, max_consecutive: u32) -> Self {
        Self { backoff: Backoff::new(initial, max), healthy_after, max_consecutive, consecutive: 0 }
    }

    /// Crashes in a row so far.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// A clean exit (or a restart the agent asked for): the next crash starts the count afresh.
    pub fn reset(&mut self) {
        self.consecutive = 0;
        self.backoff.reset();
    }

    pub fn on_exit(&mut self, clean: bool, ran_for: Duration) -> Decision {
        if clean {
            self.reset();
            return Decision::RestartNow;
        }
        if ran_for >= self.healthy_after {
            self.reset();
        }
        self.consecutive += 1;
        if self.max_consecutive > 0 && self.consecutive >= self.max_consecutive {
            Decision::GiveUp
        } else {
            Decision::RestartAfter(self.backoff.next_delay())
        }
    }
}

/// What the agent reports in its summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub starts: u32,
    /// Clean exits followed by an immediate restart.
    pub recycles: u32,
    pub crashes: u32,
    /// Restarts the stop flag asked for (`restartRequestedAt`).
    pub restarts_in_place: u32,
    /// Reparented orphans the agent reaped.
    pub orphans_reaped: u32,
    exits: [u32; ExitKind::ALL.len()],
}

impl Counters {
    pub fn count_exit(&mut self, code: i32) {
        self.exits[ExitKind::of(code).index()] += 1;
    }

    pub fn exits(&self, kind: ExitKind) -> u32 {
        self.exits[kind.index()]
    }

    /// `graceful=3 memory_limit=0 …`
    pub fn exits_summary(&self) -> String {
        ExitKind::ALL.iter().map(|k| format!("{}={}", k.name(), self.exits(*k))).collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn exit_codes_are_named() {
        assert_eq!(ExitKind::of(0), ExitKind::Graceful);
        assert_eq!(ExitKind::of(12), ExitKind::MemoryLimit);
        assert_eq!(ExitKind::of(137), ExitKind::Killed);
        assert_eq!(ExitKind::of(255), ExitKind::PhpFatal);
        assert_eq!(ExitKind::of(127), ExitKind::CannotExecute);
        assert_eq!(ExitKind::of(1), ExitKind::Other);
        assert_eq!(ExitKind::of(139), ExitKind::Other);
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(99), "signal 99");
    }

    #[test]
    fn laravel_memory_exit_is_a_recycle_only_for_laravel() {
        assert!(is_clean_exit(Preset::Symfony, 0));
        assert!(is_clean_exit(Preset::Laravel, 12));
        assert!(!is_clean_exit(Preset::Symfony, 12));
        assert!(!is_clean_exit(Preset::Laravel, 1));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(S, 30 * S);
        let seq: Vec<u64> = (0..7).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.next_delay(), S);
        // an initial longer than the maximum is capped
        assert_eq!(Backoff::new(5 * S, 2 * S).next_delay(), 2 * S);
    }

    #[test]
    fn crashes_back_off_and_give_up_after_the_maximum() {
        let mut p = CrashPolicy::new(S, 4 * S, 60 * S, 4);
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(S));
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(2 * S));
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(4 * S));
        assert_eq!(p.on_exit(false, S), Decision::GiveUp);
    }

    #[test]
    fn clean_exit_restarts_at_once_and_resets_the_count() {
        let mut p = CrashPolicy::new(S, 30 * S, 60 * S, 3);
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(S));
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(2 * S));
        assert_eq!(p.on_exit(true, S), Decision::RestartNow);
        assert_eq!(p.consecutive(), 0);
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(S));
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let mut p = CrashPolicy::new(S, 30 * S, 60 * S, 3);
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(S));
        assert_eq!(p.on_exit(false, S), Decision::RestartAfter(2 * S));
        assert_eq!(p.on_exit(false, 61 * S), Decision::RestartAfter(S));
        assert_eq!(p.consecutive(), 1);
    }

    #[test]
    fn zero_maximum_never_gives_up() {
        let mut p = CrashPolicy::new(S, 2 * S, 60 * S, 0);
        for _ in 0..100 {
            assert_ne!(p.on_exit(false, S), Decision::GiveUp);
        }
    }

    #[test]
    fn counters_count_by_kind() {
        let mut c = Counters::default();
        c.count_exit(0);
        c.count_exit(0);
        c.count_exit(137);
        assert_eq!(c.exits(ExitKind::Graceful), 2);
        assert_eq!(c.exits(ExitKind::Killed), 1);
        assert!(c.exits_summary().starts_with("graceful=2 memory_limit=0 killed=1"));
    }
}

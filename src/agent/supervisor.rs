//! The supervision loop: check the flag, start the consumer, watch it (signals, SIGCHLD, flag
//! changes), decide what follows its exit, and leave nothing behind.

use std::path::Path;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::api::StopSignal;
use crate::stopflag::{StopFlag, Verdict};

use super::arguments::{MemoryNote, Rng};
use super::cgroup::{self, ContainerLimit};
use super::flag::{self, FlagGate};
use super::policy::{self, Counters, CrashPolicy, Decision, ExitKind};
use super::process::{self, Exit};
use super::settings::Settings;

/// How long the first start waits for the stop flag (API list or files) before going without.
const FIRST_FLAG_TIMEOUT: Duration = Duration::from_secs(5);
/// How often children are reaped even without SIGCHLD (a safety net; SIGCHLD does the work).
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// While the consumer's leader has exited but the rest of its group finishes.
const GROUP_POLL: Duration = Duration::from_millis(100);

/// Runs the agent; returns its exit code.
pub async fn run(settings: Settings) -> i32 {
    let since = Instant::now();
    let mut events = match Events::new() {
        Ok(events) => events,
        Err(error) => {
            error!(%error, "cannot install signal handlers");
            return 1;
        }
    };
    process::become_subreaper();

    let gate = match &settings.flag {
        Some(target) => {
            let (tx, rx) = watch::channel(None);
            tokio::spawn(flag::run_source(target.clone(), tx));
            events.flag = Some(rx);
            Some(FlagGate::new(target.worker.clone()))
        }
        None => {
            info!(
                reason = settings.no_flag_reason.as_deref().unwrap_or("-"),
                "running without a stop flag (outside a WorkerPool pod)"
            );
            None
        }
    };
    let mut supervisor = Supervisor {
        policy: CrashPolicy::new(
            settings.backoff_initial,
            settings.backoff_max,
            settings.healthy_after,
            settings.max_consecutive_crashes,
        ),
        stop_signal: nix_signal(settings.stop_signal),
        settings,
        events,
        gate,
        counters: Counters::default(),
        rng: Rng::from_entropy(),
        memory_note: None,
    };
    let code = supervisor.supervise().await;

    let leftovers = process::terminate_leftovers(supervisor.settings.leftover_grace);
    let c = &supervisor.counters;
    info!(
        exit_code = code,
        starts = c.starts,
        recycles = c.recycles,
        crashes = c.crashes,
        restarts_in_place = c.restarts_in_place,
        orphans_reaped = c.orphans_reaped,
        leftovers_stopped = leftovers,
        exits = %c.exits_summary(),
        uptime = ?since.elapsed(),
        "agent exiting"
    );
    code
}

pub fn nix_signal(signal: StopSignal) -> Signal {
    match signal {
        StopSignal::Term => Signal::SIGTERM,
        StopSignal::Int => Signal::SIGINT,
        StopSignal::Quit => Signal::SIGQUIT,
        StopSignal::Hup => Signal::SIGHUP,
        StopSignal::Usr1 => Signal::SIGUSR1,
        StopSignal::Usr2 => Signal::SIGUSR2,
    }
}

/// Why a running consumer was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    /// The agent got SIGTERM/SIGINT/SIGQUIT: the container is stopping.
    Shutdown(&'static str),
    /// The stop flag retired this worker.
    Retire,
    /// The stop flag asked for a restart in place.
    RestartInPlace,
}

/// How one run of the consumer ended.
struct Run {
    pid: Option<Pid>,
    code: i32,
    signal: Option<i32>,
    ran_for: Duration,
    stop: Option<StopReason>,
}

enum Event {
    Stop(&'static str),
    Child,
    Flag,
    Timer,
}

/// Everything the agent waits for: its own signals, SIGCHLD, flag changes, a deadline.
struct Events {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    child: tokio::signal::unix::Signal,
    flag: Option<watch::Receiver<Option<StopFlag>>>,
}

impl Events {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            child: signal(SignalKind::child())?,
            flag: None,
        })
    }

    async fn next(&mut self, deadline: Instant) -> Event {
        let Self { term, int, quit, child, flag } = self;
        let flag_changed = async {
            let changed = match flag {
                Some(rx) => rx.changed().await.is_ok(),
                None => false,
            };
            if !changed {
                // no flag, or its source is gone: never
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            _ = term.recv() => Event::Stop("SIGTERM"),
            _ = int.recv() => Event::Stop("SIGINT"),
            _ = quit.recv() => Event::Stop("SIGQUIT"),
            _ = child.recv() => Event::Child,
            _ = flag_changed => Event::Flag,
            _ = tokio::time::sleep_until(deadline) => Event::Timer,
        }
    }

    /// A stop signal that arrived while nothing was waiting for it.
    fn stop_pending(&mut self) -> Option<&'static str> {
        if self.term.recv().now_or_never().is_some() {
            Some("SIGTERM")
        } else if self.int.recv().now_or_never().is_some() {
            Some("SIGINT")
        } else if self.quit.recv().now_or_never().is_some() {
            Some("SIGQUIT")
        } else {
            None
        }
    }

    fn current_flag(&mut self) -> Option<StopFlag> {
        self.flag.as_mut().and_then(|rx| rx.borrow_and_update().clone())
    }

    fn flag_known(&self) -> bool {
        self.flag.as_ref().is_none_or(|rx| rx.borrow().is_some())
    }
}

struct Supervisor {
    settings: Settings,
    events: Events,
    gate: Option<FlagGate>,
    policy: CrashPolicy,
    counters: Counters,
    rng: Rng,
    stop_signal: Signal,
    memory_note: Option<MemoryNote>,
}

impl Supervisor {
    async fn supervise(&mut self) -> i32 {
        if let Some(code) = self.wait_for_first_flag().await {
            return code;
        }
        loop {
            if let Some(name) = self.events.stop_pending() {
                info!(signal = name, "received {name} before the consumer started: exiting");
                return 0;
            }
            if self.retired_before_start() {
                return 0;
            }
            let run = self.run_once().await;
            if let Some(code) = self.after(run).await {
                return code;
            }
        }
    }

    /// Starts the consumer and watches it until it has ended.
    async fn run_once(&mut self) -> Run {
        let argv = self.argv();
        let started = Instant::now();
        let started_at = Timestamp::now();
        self.counters.starts += 1;
        match process::spawn(&argv) {
            Ok(pid) => {
                info!(pid = pid.as_raw(), run = self.counters.starts, command = ?argv, "consumer started");
                self.watch(pid, started, started_at).await
            }
            Err(e) => {
                error!(run = self.counters.starts, "cannot execute {:?}: {}", argv[0], process::describe_io_error(&e));
                Run {
                    pid: None,
                    code: process::spawn_error_code(&e),
                    signal: None,
                    ran_for: Duration::ZERO,
                    stop: None,
                }
            }
        }
    }

    /// What follows a run: `Some(code)` ends the agent.
    async fn after(&mut self, run: Run) -> Option<i32> {
        self.counters.count_exit(run.code);
        let kind = ExitKind::of(run.code);
        if let Some(pid) = run.pid {
            let how = match run.signal {
                Some(n) => format!("killed by {}", policy::signal_name(n)),
                None => kind.describe().to_string(),
            };
            let clean = policy::is_clean_exit(self.settings.limits.preset, run.code);
            if clean || run.stop.is_some() {
                info!(pid = pid.as_raw(), code = run.code, kind = kind.name(), ran_for = ?run.ran_for, "consumer exited: {how}");
            } else {
                warn!(pid = pid.as_raw(), code = run.code, kind = kind.name(), ran_for = ?run.ran_for, "consumer exited: {how}");
            }
        }
        match run.stop {
            Some(StopReason::Shutdown(name)) => {
                info!(code = run.code, "consumer stopped after {name}; exiting with its status");
                return Some(run.code);
            }
            Some(StopReason::Retire) => {
                info!("consumer stopped: this worker is retired by the stop flag; exiting 0");
                return Some(0);
            }
            Some(StopReason::RestartInPlace) => {
                self.counters.restarts_in_place += 1;
                self.policy.reset();
                info!("restarting the consumer in place, as the stop flag asked");
                return None;
            }
            None => {}
        }
        let clean = policy::is_clean_exit(self.settings.limits.preset, run.code);
        if !clean {
            self.counters.crashes += 1;
        }
        match self.policy.on_exit(clean, run.ran_for) {
            Decision::RestartNow => {
                self.counters.recycles += 1;
                None
            }
            Decision::GiveUp => {
                error!(
                    code = run.code,
                    crashes = self.policy.consecutive(),
                    "the consumer crashed {} times in a row: giving up, exiting with its code",
                    self.policy.consecutive()
                );
                Some(run.code)
            }
            Decision::RestartAfter(delay) => {
                warn!(crashes_in_a_row = self.policy.consecutive(), "restarting the consumer in {delay:?} (back-off)");
                self.back_off(delay).await
            }
        }
    }

    /// The command line for this start: the command, then the limit arguments.
    fn argv(&mut self) -> Vec<String> {
        let (limits, note) = self.settings.limits.resolve(self.rng.unit(), || {
            let env = std::env::var(cgroup::MEMORY_LIMIT_ENV).ok();
            cgroup::container_memory_limit(Path::new(cgroup::CGROUP_ROOT), env.as_deref())
        });
        if self.memory_note != Some(note) {
            match note {
                MemoryNote::NotAuto => {}
                MemoryNote::Auto { limit, bytes } => {
                    let source = match limit {
                        ContainerLimit::Cgroup(_) => "cgroup",
                        _ => cgroup::MEMORY_LIMIT_ENV,
                    };
                    info!(
                        container_limit_mib = limit.bytes().unwrap_or_default() >> 20,
                        source,
                        percent = self.settings.limits.memory_auto_percent,
                        consumer_limit_mib = bytes >> 20,
                        "memory: auto"
                    );
                }
                MemoryNote::AutoUnresolved => warn!(
                    "memory: auto, but the container's memory limit is unknown (cgroup unlimited or unreadable, {} unset): starting the consumer without a memory limit",
                    cgroup::MEMORY_LIMIT_ENV
                ),
            }
            self.memory_note = Some(note);
        }
        let mut argv = self.settings.command.clone();
        match self.settings.limits.render(&limits) {
            Ok(args) => argv.extend(args),
            // checked at startup; only reachable through a bug
            Err(error) => error!(%error, "cannot render the limit arguments; starting without them"),
        }
        argv
    }

    /// Before every start: a retired worker does not start again.
    fn retired_before_start(&mut self) -> bool {
        let flag = self.events.current_flag();
        let Some(gate) = self.gate.as_mut() else { return false };
        if gate.before_start(flag.as_ref(), Timestamp::now()) == Verdict::Retire {
            info!(
                flag_revision = flag.as_ref().and_then(|f| f.revision.as_deref()).unwrap_or("-"),
                "the stop flag retires this worker: not starting the consumer"
            );
            true
        } else {
            false
        }
    }

    async fn wait_for_first_flag(&mut self) -> Option<i32> {
        let deadline = Instant::now() + FIRST_FLAG_TIMEOUT;
        while !self.events.flag_known() {
            if Instant::now() >= deadline {
                warn!("no stop flag after {FIRST_FLAG_TIMEOUT:?}: starting the consumer anyway");
                return None;
            }
            match self.events.next(deadline).await {
                Event::Stop(name) => {
                    info!(signal = name, "received {name} before the consumer started: exiting");
                    return Some(0);
                }
                Event::Child | Event::Timer => {
                    self.reap_orphans(None);
                }
                Event::Flag => {}
            }
        }
        None
    }

    /// Watches the consumer `pid` until it has exited; when it was asked to stop, until its whole
    /// process group has (a `sh -c` wrapper may die before the process doing the work).
    async fn watch(&mut self, pid: Pid, started: Instant, started_at: Timestamp) -> Run {
        let mut stop: Option<StopReason> = None;
        let mut leader: Option<Exit> = None;
        let mut told_waiting = false;
        loop {
            if let Some(exit) = leader {
                if stop.is_none() || !process::group_exists(pid) {
                    return Run {
                        pid: Some(pid),
                        code: exit.code,
                        signal: exit.signal,
                        ran_for: started.elapsed(),
                        stop,
                    };
                }
                if !told_waiting {
                    info!(pgid = pid.as_raw(), "the consumer exited; waiting for the rest of its process group");
                    told_waiting = true;
                }
            }
            let wait = if leader.is_some() { GROUP_POLL } else { REAP_INTERVAL };
            match self.events.next(Instant::now() + wait).await {
                Event::Stop(name) => {
                    if stop.is_some() {
                        info!(signal = name, "received {name}; the consumer is already stopping");
                    } else {
                        info!(
                            signal = name,
                            pgid = pid.as_raw(),
                            "received {name}: sending {} to the consumer's process group; it exits after its current message",
                            self.stop_signal.as_str()
                        );
                        process::signal_group(pid, self.stop_signal);
                    }
                    if stop != Some(StopReason::Retire) {
                        stop = Some(StopReason::Shutdown(name));
                    }
                }
                Event::Child | Event::Timer => {
                    if let Some(exit) = self.reap_orphans(Some(pid)) {
                        leader = Some(exit);
                    }
                }
                Event::Flag => {
                    let flag = self.events.current_flag();
                    let Some(gate) = self.gate.as_mut() else { continue };
                    let verdict = gate.while_running(flag.as_ref(), started_at);
                    let request = match (verdict, stop) {
                        (Verdict::RestartInPlace, None) => Some(StopReason::RestartInPlace),
                        (Verdict::Retire, None | Some(StopReason::RestartInPlace)) => Some(StopReason::Retire),
                        _ => None,
                    };
                    let Some(request) = request else { continue };
                    if stop.is_none() {
                        let why = match request {
                            StopReason::Retire => "the stop flag retires this worker",
                            _ => "the stop flag asks for a restart in place",
                        };
                        info!(
                            pgid = pid.as_raw(),
                            "{why}: sending {} to the consumer's process group; it exits after its current message",
                            self.stop_signal.as_str()
                        );
                        process::signal_group(pid, self.stop_signal);
                    } else {
                        info!("the stop flag retires this worker: it will not restart");
                    }
                    stop = Some(request);
                }
            }
        }
    }

    /// Reaps every ended child; returns the exit of `leader` if it is among them.
    fn reap_orphans(&mut self, leader: Option<Pid>) -> Option<Exit> {
        let mut found = None;
        for exit in process::reap() {
            if Some(exit.pid) == leader {
                found = Some(exit);
            } else {
                self.counters.orphans_reaped += 1;
                debug!(pid = exit.pid.as_raw(), code = exit.code, "reaped an orphan");
            }
        }
        found
    }

    /// Waits `delay` before the next start; `Some(code)` ends the agent.
    async fn back_off(&mut self, delay: Duration) -> Option<i32> {
        let deadline = Instant::now() + delay;
        while Instant::now() < deadline {
            match self.events.next(deadline).await {
                Event::Stop(name) => {
                    info!(signal = name, "received {name} while waiting to restart the consumer: exiting");
                    return Some(0);
                }
                Event::Child | Event::Timer => {
                    self.reap_orphans(None);
                }
                Event::Flag => {
                    if self.retired_before_start() {
                        return Some(0);
                    }
                }
            }
        }
        None
    }
}

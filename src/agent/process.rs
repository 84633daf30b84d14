//! Processes: starting the consumer in its own process group, reaping every child (the
//! consumer and reparented orphans) with our own `waitpid(-1)` loop, signalling groups, and
//! leaving nothing behind.
//!
//! The agent never calls `Child::wait`: all reaping goes through [`reap`], so the consumer's
//! status and the orphans' are collected in one place.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

/// How a reaped process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub pid: Pid,
    /// The exit code, or 128 + N when killed by signal N.
    pub code: i32,
    pub signal: Option<i32>,
}

/// Starts `argv` as the leader of a new process group (its pgid is its pid).
pub fn spawn(argv: &[String]) -> std::io::Result<Pid> {
    let (program, args) = argv.split_first().ok_or_else(|| std::io::Error::other("empty command"))?;
    let child = std::process::Command::new(program).args(args).process_group(0).spawn()?;
    // Dropping `Child` neither waits nor kills: `reap` collects it.
    Ok(Pid::from_raw(child.id() as i32))
}

/// The shell's code for a command that could not be started: 127 not found, 126 otherwise.
pub fn spawn_error_code(error: &std::io::Error) -> i32 {
    if error.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 }
}

/// `No such file or directory`, without the `(os error 2)`.
pub fn describe_io_error(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(n) => Errno::from_raw(n).desc().to_string(),
        None => error.to_string(),
    }
}

/// Reaps every child that has ended, without blocking.
pub fn reap() -> Vec<Exit> {
    let mut exits = Vec::new();
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exits.push(Exit { pid, code, signal: None }),
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                exits.push(Exit { pid, code: 128 + signal as i32, signal: Some(signal as i32) })
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(error) => {
                warn!(%error, "waitpid failed");
                break;
            }
        }
    }
    exits
}

/// Sends `signal` to every process of group `pgid`. False when the group is gone.
pub fn signal_group(pgid: Pid, signal: Signal) -> bool {
    match killpg(pgid, signal) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(error) => {
            warn!(%error, pgid = pgid.as_raw(), signal = signal.as_str(), "cannot signal the process group");
            true
        }
    }
}

/// Whether any process (zombies included) is still in group `pgid`.
pub fn group_exists(pgid: Pid) -> bool {
    !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

/// Makes orphans come to us when we are not PID 1 (tests, `docker run --init`-less debugging).
pub fn become_subreaper() {
    if std::process::id() == 1 {
        return;
    }
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        warn!(%error, "cannot become a child subreaper: orphans of the consumer will not be reaped by the agent");
    }
}

/// One line of `/proc/<pid>/stat`, the fields the agent needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
}

/// Parses `/proc/<pid>/stat` (the command name may hold spaces and parentheses).
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let pid = line.split_whitespace().next()?.parse().ok()?;
    let rest = &line[line.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid, pgrp })
}

/// Every process visible in /proc.
pub fn processes() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|line| parse_stat(&line))
        .collect()
}

/// Live (non-zombie) processes descending from this one. Every process a consumer started is
/// one: orphans are reparented to us (PID 1 or child subreaper).
pub fn descendants() -> Vec<ProcStat> {
    let me = std::process::id() as i32;
    let all = processes();
    let mut family = vec![me];
    let mut found = Vec::new();
    // /proc is not ordered by ancestry: repeat until no new descendant turns up.
    loop {
        let before = found.len();
        for p in &all {
            if family.contains(&p.ppid) && !family.contains(&p.pid) {
                family.push(p.pid);
                found.push(*p);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found.retain(|p| p.state != 'Z');
    found
}

/// Ends whatever the consumers left behind: SIGTERM, up to `grace` for it to work, then SIGKILL;
/// reaps them all. Returns how many processes had to be stopped.
pub fn terminate_leftovers(grace: Duration) -> usize {
    reap();
    let found = descendants();
    if found.is_empty() {
        return 0;
    }
    info!(processes = found.len(), "stopping processes left behind by the consumer (SIGTERM)");
    send_all(&found, Signal::SIGTERM);
    if wait_gone(grace) {
        return found.len();
    }
    warn!(processes = descendants().len(), "processes still running after {grace:?}: SIGKILL");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // again and again: a process may fork while it is being killed
        send_all(&descendants(), Signal::SIGKILL);
        if wait_gone(Duration::from_millis(100)) {
            break;
        }
        if Instant::now() >= deadline {
            warn!(processes = descendants().len(), "processes survived SIGKILL");
            break;
        }
    }
    found.len()
}

fn send_all(processes: &[ProcStat], signal: Signal) {
    for p in processes {
        let _ = kill(Pid::from_raw(p.pid), signal);
    }
}

fn wait_gone(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        for exit in reap() {
            debug!(pid = exit.pid.as_raw(), code = exit.code, "reaped");
        }
        if descendants().is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let line = "1234 (sh -c (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(line), Some(ProcStat { pid: 1234, state: 'S', ppid: 1, pgrp: 1234 }));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn sees_this_process() {
        let me = std::process::id() as i32;
        assert!(processes().iter().any(|p| p.pid == me));
    }

    #[test]
    fn spawn_errors_get_shell_codes() {
        let err = spawn(&["/nonexistent/consumer".to_string()]).unwrap_err();
        assert_eq!(spawn_error_code(&err), 127);
        assert_eq!(describe_io_error(&err), "No such file or directory");
        let err = spawn(&["/proc/self/stat".to_string()]).unwrap_err();
        assert_eq!(spawn_error_code(&err), 126);
    }
}

//! The agent with real processes: the built `workerpool` binary supervising `sh` consumers.
//!
//! Outside a cluster the agent has no in-cluster config, so it reads the stop flag from the
//! files in `--flag-dir`: the tests write those files. Every process a test starts carries a
//! marker in its environment; a test fails if any is left behind, and kills them if so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const MARK_VAR: &str = "WORKERPOOL_AGENT_TEST_MARK";

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "wp-agent-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.join("flag")).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running agent; killed (with everything it started) on drop.
struct Agent {
    child: Child,
    dir: TempDir,
    mark: String,
    started: Instant,
    status: Option<ExitStatus>,
}

fn agent_command(dir: &Path, mark: &str, options: &[&str], consumer: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_workerpool"));
    cmd.arg("agent")
        .args(["--flag-dir", dir.join("flag").to_str().unwrap()])
        .args(["--pool", "p", "--revision", "r1", "--pod-name", "pod-a", "--namespace", "ns"])
        .args(options)
        .arg("--")
        .args(consumer)
        .env("D", dir)
        .env(MARK_VAR, mark)
        .env("NO_COLOR", "1")
        .env("WORKERPOOL_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("WORKERPOOL_MEMORY_LIMIT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    cmd
}

impl Agent {
    fn start(tag: &str, options: &[&str], consumer: &[&str]) -> Self {
        Self::start_with(TempDir::new(tag), options, consumer)
    }

    fn start_with(dir: TempDir, options: &[&str], consumer: &[&str]) -> Self {
        let mark = dir.0.file_name().unwrap().to_str().unwrap().to_string();
        let child = agent_command(&dir.0, &mark, options, consumer).spawn().expect("the agent starts");
        Self { child, dir, mark, started: Instant::now(), status: None }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("stderr")).unwrap_or_default()
    }

    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(name)).unwrap_or_default().lines().map(str::to_string).collect()
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args(["-s", signal, &self.pid().to_string()]).status().unwrap().success();
        assert!(ok, "kill -s {signal} failed");
    }

    /// Writes a flag key the way kubelet updates a mounted ConfigMap: atomically.
    fn write_flag(&self, key: &str, value: &str) {
        let tmp = self.path(&format!("flag/.{key}.tmp"));
        std::fs::write(&tmp, value).unwrap();
        std::fs::rename(&tmp, self.path(&format!("flag/{key}"))).unwrap();
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
            if self.status.is_none() {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.status
    }

    /// Waits for the agent's exit and checks it left nothing behind; returns its exit code.
    fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self
            .wait(timeout)
            .unwrap_or_else(|| panic!("the agent did not exit within {timeout:?}; stderr:\n{}", self.stderr()));
        let left = marked_processes(&self.mark);
        assert!(left.is_empty(), "processes left behind: {left:?}; stderr:\n{}", self.stderr());
        status.code().unwrap_or_else(|| panic!("agent killed by a signal: {status:?}"))
    }

    /// PIDs of the agent's children that are zombies.
    fn zombie_children(&self) -> Vec<i32> {
        proc_stats().into_iter().filter(|(_, state, ppid)| *ppid == self.pid() && *state == 'Z').map(|p| p.0).collect()
    }

    /// Live descendants of the agent.
    fn descendants(&self) -> Vec<i32> {
        let all = proc_stats();
        let mut family = vec![self.pid()];
        loop {
            let before = family.len();
            for (pid, state, ppid) in &all {
                if family.contains(ppid) && !family.contains(pid) && *state != 'Z' {
                    family.push(*pid);
                }
            }
            if family.len() == before {
                break;
            }
        }
        family.split_off(1)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in marked_processes(&self.mark) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// (pid, state, ppid) of every process.
fn proc_stats() -> Vec<(i32, char, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, state, ppid));
    }
    out
}

/// Processes (zombies aside) whose environment holds this test's marker.
fn marked_processes(mark: &str) -> Vec<i32> {
    let needle = format!("{MARK_VAR}={mark}");
    proc_stats()
        .into_iter()
        .filter(|(_, state, _)| *state != 'Z')
        .filter(|(pid, _, _)| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
                .unwrap_or(false)
        })
        .map(|p| p.0)
        .collect()
}

fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nanos(lines: &[String]) -> Vec<u128> {
    lines.iter().filter_map(|l| l.trim().parse().ok()).collect()
}

fn gaps_ms(stamps: &[u128]) -> Vec<f64> {
    stamps.windows(2).map(|w| (w[1] - w[0]) as f64 / 1e6).collect()
}

/// A consumer handling "messages" of 0.3 s that ignore SIGTERM; on SIGTERM it finishes the
/// current one, logs `done` and exits 0.
const MESSAGE_LOOP: &str = r#"
echo start >> "$D/log"
trap 'stop=1' TERM
while [ -z "$stop" ]; do
  sh -c 'trap "" TERM; sleep 0.3'
done
echo done >> "$D/log"
exit 0
"#;

#[test]
fn restarts_at_once_after_a_clean_exit() {
    let mut agent = Agent::start("recycle", &[], &["sh", "-c", r#"date +%s%N >> "$D/starts""#]);
    std::thread::sleep(Duration::from_secs(2));
    agent.signal("TERM");
    agent.exit_code(Duration::from_secs(5));
    let starts = nanos(&agent.lines("starts"));
    assert!(starts.len() >= 20, "only {} runs in 2 s; stderr:\n{}", starts.len(), agent.stderr());
    let mut gaps = gaps_ms(&starts);
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    assert!(median < 100.0, "median gap between starts {median:.1} ms");
    assert!(agent.stderr().contains("recycles="), "{}", agent.stderr());
}

#[test]
fn backs_off_after_crashes_and_exits_with_the_consumers_code() {
    let mut agent = Agent::start(
        "crash",
        &["--backoff-initial", "100ms", "--backoff-max", "10s", "--max-consecutive-crashes", "4"],
        &["sh", "-c", r#"date +%s%N >> "$D/starts"; exit 3"#],
    );
    assert_eq!(agent.exit_code(Duration::from_secs(10)), 3);
    let starts = nanos(&agent.lines("starts"));
    assert_eq!(starts.len(), 4, "stderr:\n{}", agent.stderr());
    let gaps = gaps_ms(&starts);
    assert!(gaps[0] >= 90.0 && gaps[1] >= 190.0 && gaps[2] >= 390.0, "gaps {gaps:?}");
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "gaps do not grow: {gaps:?}");
    let stderr = agent.stderr();
    assert!(stderr.contains("giving up"), "{stderr}");
    assert!(stderr.contains("crashes=4"), "{stderr}");
}

#[test]
fn a_nonexistent_command_backs_off_instead_of_looping() {
    let mut agent = Agent::start(
        "enoent",
        &["--backoff-initial", "100ms", "--max-consecutive-crashes", "4"],
        &["/nonexistent/consumer", "messenger:consume"],
    );
    assert_eq!(agent.exit_code(Duration::from_secs(10)), 127);
    assert!(agent.started.elapsed() >= Duration::from_millis(650), "too fast: {:?}", agent.started.elapsed());
    let stderr = agent.stderr();
    let lines = stderr.lines().filter(|l| l.contains("cannot execute")).collect::<Vec<_>>();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(lines[0].contains("/nonexistent/consumer") && lines[0].contains("No such file or directory"), "{stderr}");
}

#[test]
fn sigterm_goes_through_a_shell_wrapper_and_the_message_finishes() {
    let dir = TempDir::new("sigterm-wrapper");
    let consumer = r#"
trap 'echo got-term >> "$D/log"' TERM
echo started >> "$D/log"
sh -c 'trap "" TERM; sleep 1'
echo finished >> "$D/log"
exit 0
"#;
    std::fs::write(dir.0.join("consumer.sh"), consumer).unwrap();
    // The wrapper does not forward signals and dies of SIGTERM: the group signal reaches the consumer.
    let mut agent =
        Agent::start_with(dir, &[], &["sh", "-c", r#"sh "$D/consumer.sh"; echo wrapper-after >> "$D/log""#]);
    assert!(wait_for(Duration::from_secs(5), || agent.lines("log").contains(&"started".to_string())));
    let signalled = Instant::now();
    agent.signal("TERM");
    let code = agent.exit_code(Duration::from_secs(5));
    let log = agent.lines("log");
    assert_eq!(log, ["started", "got-term", "finished"], "stderr:\n{}", agent.stderr());
    assert!(signalled.elapsed() >= Duration::from_millis(500), "the agent did not wait for the message");
    assert_eq!(code, 143, "the wrapper (the consumer's process) was killed by SIGTERM");
}

#[test]
fn sigterm_exits_with_the_consumers_status() {
    let dir = TempDir::new("sigterm");
    std::fs::write(dir.0.join("consumer.sh"), MESSAGE_LOOP).unwrap();
    let mut agent = Agent::start_with(dir, &[], &["sh", "-c", r#"exec sh "$D/consumer.sh""#]);
    assert!(wait_for(Duration::from_secs(5), || !agent.lines("log").is_empty()));
    agent.signal("INT");
    assert_eq!(agent.exit_code(Duration::from_secs(5)), 0);
    assert_eq!(agent.lines("log"), ["start", "done"]);
}

#[test]
fn orphans_are_reaped() {
    let consumer = r#"
if [ -e "$D/ran" ]; then exec sleep 30; fi
touch "$D/ran"
sleep 0.2 &
(sleep 0.4 &)
exit 0
"#;
    let mut agent = Agent::start("orphans", &[], &["sh", "-c", consumer]);
    // the second run is `sleep 30`; the first run's children have ended by then
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(agent.zombie_children(), Vec::<i32>::new(), "zombies; stderr:\n{}", agent.stderr());
    assert_eq!(agent.descendants().len(), 1, "only the second run should be left");
    agent.signal("TERM");
    agent.exit_code(Duration::from_secs(5));
    let stderr = agent.stderr();
    assert!(stderr.contains("orphans_reaped=2"), "{stderr}");
}

#[test]
fn restart_requested_at_restarts_in_place_after_the_message() {
    let dir = TempDir::new("restart");
    std::fs::write(dir.0.join("consumer.sh"), MESSAGE_LOOP).unwrap();
    std::fs::write(dir.0.join("flag/revision"), "r1").unwrap();
    let mut agent = Agent::start_with(dir, &[], &["sh", "-c", r#"exec sh "$D/consumer.sh""#]);
    assert!(wait_for(Duration::from_secs(5), || agent.lines("log") == ["start"]));
    agent.write_flag("restartRequestedAt", &k8s_openapi::jiff::Timestamp::now().to_string());
    assert!(
        wait_for(Duration::from_secs(5), || agent.lines("log").len() >= 3),
        "no restart; stderr:\n{}",
        agent.stderr()
    );
    assert_eq!(agent.lines("log"), ["start", "done", "start"]);
    // once per request: the running consumer is left alone
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(agent.lines("log"), ["start", "done", "start"]);
    agent.signal("TERM");
    assert_eq!(agent.exit_code(Duration::from_secs(5)), 0);
    assert!(agent.stderr().contains("restarts_in_place=1"), "{}", agent.stderr());
}

fn assert_retired_by(key: &str, value: &str) {
    let dir = TempDir::new("retire");
    std::fs::write(dir.0.join("consumer.sh"), MESSAGE_LOOP).unwrap();
    std::fs::write(dir.0.join("flag/revision"), "r1").unwrap();
    let mut agent = Agent::start_with(dir, &[], &["sh", "-c", r#"sh "$D/consumer.sh""#]);
    assert!(wait_for(Duration::from_secs(5), || agent.lines("log") == ["start"]));
    agent.write_flag(key, value);
    assert_eq!(agent.exit_code(Duration::from_secs(5)), 0, "stderr:\n{}", agent.stderr());
    assert_eq!(agent.lines("log"), ["start", "done"], "stderr:\n{}", agent.stderr());
    assert!(agent.stderr().contains("retire"), "{}", agent.stderr());
}

#[test]
fn a_new_revision_retires_the_worker_after_its_message() {
    assert_retired_by("revision", "r2");
}

#[test]
fn a_drain_listing_the_pod_retires_the_worker_after_its_message() {
    assert_retired_by("drain", "pod-x\npod-a\n");
}

#[test]
fn a_retired_worker_does_not_start() {
    let dir = TempDir::new("retired");
    std::fs::write(dir.0.join("flag/revision"), "r2").unwrap();
    let mut agent = Agent::start_with(dir, &[], &["sh", "-c", r#"echo start >> "$D/log""#]);
    assert_eq!(agent.exit_code(Duration::from_secs(5)), 0);
    assert!(agent.lines("log").is_empty());
    assert!(agent.stderr().contains("not starting the consumer"), "{}", agent.stderr());
}

#[test]
fn an_unparseable_flag_is_ignored() {
    let dir = TempDir::new("badflag");
    std::fs::write(dir.0.join("consumer.sh"), MESSAGE_LOOP).unwrap();
    let mut agent = Agent::start_with(dir, &[], &["sh", "-c", r#"sh "$D/consumer.sh""#]);
    assert!(wait_for(Duration::from_secs(5), || agent.lines("log") == ["start"]));
    agent.write_flag("restartRequestedAt", "yesterday");
    assert!(wait_for(Duration::from_secs(3), || agent.stderr().contains("unparseable")), "{}", agent.stderr());
    assert!(agent.stderr().contains("restartRequestedAt"));
    assert_eq!(agent.lines("log"), ["start"], "the consumer keeps running");
    // a good flag afterwards still works
    agent.write_flag("restartRequestedAt", "");
    agent.write_flag("revision", "r2");
    assert_eq!(agent.exit_code(Duration::from_secs(5)), 0);
    assert_eq!(agent.lines("log"), ["start", "done"]);
}

#[test]
fn limit_arguments_are_appended_with_jitter() {
    let mut agent = Agent::start(
        "limits",
        &["--messages", "10", "--time-limit-seconds", "100", "--jitter-percent", "20", "--memory", "64Mi"],
        &["sh", "-c", r#"echo "$@" >> "$D/args"; [ $(wc -l < "$D/args") -ge 5 ] && exec sleep 30; exit 0"#, "sh"],
    );
    assert!(wait_for(Duration::from_secs(5), || agent.lines("args").len() >= 5));
    agent.signal("TERM");
    agent.exit_code(Duration::from_secs(5));
    for line in agent.lines("args") {
        let args: Vec<&str> = line.split(' ').collect();
        assert_eq!(args[0], "--limit=10", "{line}");
        let seconds: u32 = args[1].strip_prefix("--time-limit=").unwrap().parse().unwrap();
        assert!((80..=120).contains(&seconds), "{line}");
        assert_eq!(args[2], "--memory-limit=64M", "{line}");
    }
}

#[test]
fn bad_input_exits_2_before_starting_anything() {
    let dir = TempDir::new("badinput");
    let run = |options: &[&str], consumer: &[&str]| {
        let mut cmd = agent_command(&dir.0, "bad-input", options, consumer);
        if consumer.is_empty() {
            // no `--` at all
            cmd = Command::new(env!("CARGO_BIN_EXE_workerpool"));
            cmd.arg("agent").args(options).env("NO_COLOR", "1");
        }
        let out = cmd.stderr(Stdio::piped()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, stderr) = run(&["--pool", "p"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("COMMAND"), "{stderr}");
    let (code, stderr) = run(&["--memory", "lots"], &["sh", "-c", r#"echo start >> "$D/log""#]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--memory"), "{stderr}");
    let (code, stderr) = run(&["--preset", "rails"], &["true"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown preset"), "{stderr}");
    let (code, stderr) = run(&["--stop-signal", "SIGSTOP"], &["true"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown signal"), "{stderr}");
    let (code, stderr) = run(&["--preset", "custom", "--messages", "5"], &["true"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--messages-arg"), "{stderr}");
    assert!(!dir.0.join("log").exists(), "nothing may start");
}

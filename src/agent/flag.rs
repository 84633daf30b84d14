//! The stop flag as the agent sees it: a watch on the ConfigMap `<pool>-stop-flag` over the API,
//! the mounted files as the fallback, and the rule that turns a flag into one action per request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::stopflag::{self, StopFlag, Verdict, Worker};

/// How often the mounted files are read when the API is not usable.
pub const FILE_POLL: Duration = Duration::from_secs(1);
/// How long the files wait for the API to answer its first list before they are used.
pub const API_GRACE: Duration = Duration::from_secs(2);

/// Where this agent's flag lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlagTarget {
    pub worker: Worker,
    pub pool: String,
    /// `None`: the namespace of the in-cluster config (the service account's).
    pub namespace: Option<String>,
    pub dir: PathBuf,
}

impl FlagTarget {
    pub fn configmap(&self) -> String {
        crate::api::stop_flag_name(&self.pool)
    }
}

/// The flag keys, one file each in the mounted ConfigMap.
const KEYS: [&str; 4] = [stopflag::REVISION, stopflag::KEEP, stopflag::DRAIN, stopflag::RESTART_REQUESTED_AT];

/// Reads the mounted ConfigMap: one file per key; absent files (or an absent directory) are
/// absent keys.
pub fn read_flag_dir(dir: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut data = BTreeMap::new();
    for key in KEYS {
        match std::fs::read_to_string(dir.join(key)) {
            Ok(text) => {
                data.insert(key.to_string(), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(key).display()))),
        }
    }
    Ok(data)
}

/// Keeps the last good flag: an unparseable one is logged once (naming the key) and ignored.
#[derive(Debug, Default)]
pub struct FlagTracker {
    last_good: Option<StopFlag>,
    last_bad: Option<BTreeMap<String, String>>,
}

impl FlagTracker {
    /// The new flag if `data` parses and differs from the last good one.
    pub fn update(&mut self, data: BTreeMap<String, String>, source: &str) -> Option<StopFlag> {
        match StopFlag::from_data(&data) {
            Ok(flag) => {
                self.last_bad = None;
                if self.last_good.as_ref() == Some(&flag) {
                    return None;
                }
                self.last_good = Some(flag.clone());
                Some(flag)
            }
            Err(error) => {
                if self.last_bad.as_ref() != Some(&data) {
                    warn!(key = error.key, %error, source, "ignoring an unparseable stop flag; keeping the last good one");
                    self.last_bad = Some(data);
                }
                None
            }
        }
    }
}

/// Turns flag verdicts into actions, once per request: a `restartRequestedAt` the agent has
/// acted on (or started a consumer after) never triggers again, even with clocks that disagree.
#[derive(Clone, Debug)]
pub struct FlagGate {
    me: Worker,
    handled_restart: Option<Timestamp>,
}

impl FlagGate {
    pub fn new(me: Worker) -> Self {
        Self { me, handled_restart: None }
    }

    /// Before a start: `Retire` means do not start. A pending restart request is satisfied by the
    /// start itself.
    pub fn before_start(&mut self, flag: Option<&StopFlag>, now: Timestamp) -> Verdict {
        match self.verdict(flag, now) {
            Verdict::Retire => Verdict::Retire,
            Verdict::RestartInPlace | Verdict::Continue => {
                if let Some(at) = flag.and_then(|f| f.restart_requested_at) {
                    self.handled_restart = Some(self.handled_restart.map_or(at, |h| h.max(at)));
                }
                Verdict::Continue
            }
        }
    }

    /// While a consumer started at `started_at` runs. `RestartInPlace` is returned once per request.
    pub fn while_running(&mut self, flag: Option<&StopFlag>, started_at: Timestamp) -> Verdict {
        let verdict = self.verdict(flag, started_at);
        if verdict == Verdict::RestartInPlace {
            let at = flag.and_then(|f| f.restart_requested_at);
            if at.is_some() && at <= self.handled_restart {
                return Verdict::Continue;
            }
            self.handled_restart = at;
        }
        verdict
    }

    fn verdict(&self, flag: Option<&StopFlag>, started_at: Timestamp) -> Verdict {
        flag.map_or(Verdict::Continue, |f| f.verdict(&self.me, started_at))
    }
}

/// Keeps `tx` up to date with the flag, forever: the API watch when it works, the files otherwise.
pub async fn run_source(target: FlagTarget, tx: watch::Sender<Option<StopFlag>>) {
    let api = incluster_client(&target);
    run_source_with(target, api, tx).await
}

/// A client from the in-cluster config, and the namespace to watch in.
fn incluster_client(target: &FlagTarget) -> Result<(kube::Client, String), String> {
    let config = kube::Config::incluster().map_err(|e| e.to_string())?;
    let namespace = target.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
    Ok((client, namespace))
}

/// [`run_source`] with a given client (`Err`: why there is none, files only).
pub async fn run_source_with(
    target: FlagTarget,
    api: Result<(kube::Client, String), String>,
    tx: watch::Sender<Option<StopFlag>>,
) {
    use futures::StreamExt;
    use kube::runtime::watcher::Event;

    let mut tracker = FlagTracker::default();
    let publish = |flag: Option<StopFlag>, source: &str| {
        if let Some(flag) = flag {
            info!(
                source,
                revision = flag.revision.as_deref().unwrap_or("-"),
                keep = flag.keep.len(),
                drain = flag.drain.len(),
                restart_requested_at = %flag.restart_requested_at.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                "stop flag"
            );
            tx.send_replace(Some(flag));
        }
    };

    let mut stream = match api {
        Ok((client, namespace)) => {
            info!(configmap = target.configmap(), namespace, "watching the stop flag over the Kubernetes API");
            Some(api_stream(client, &namespace, &target.configmap()))
        }
        Err(reason) => {
            info!(
                dir = %target.dir.display(),
                "no in-cluster Kubernetes API ({reason}); reading the stop flag from the mounted files every second"
            );
            None
        }
    };
    let started = tokio::time::Instant::now();
    let mut api_ok = false;
    let mut api_failed = stream.is_none();
    let mut listing: Option<BTreeMap<String, String>> = None;
    let mut file_error: Option<String> = None;
    let mut poll = tokio::time::interval(FILE_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let next_api = async {
            match stream.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        let use_files = tokio::select! {
            event = next_api => {
                match event {
                    Some(Ok(Event::Init)) => listing = Some(BTreeMap::new()),
                    Some(Ok(Event::InitApply(cm))) => listing = Some(cm.data.unwrap_or_default()),
                    Some(Ok(Event::InitDone)) => {
                        if api_failed {
                            info!("stop flag: the API watch works again");
                        }
                        api_ok = true;
                        api_failed = false;
                        publish(tracker.update(listing.take().unwrap_or_default(), "api"), "api");
                    }
                    Some(Ok(Event::Apply(cm))) => {
                        api_ok = true;
                        publish(tracker.update(cm.data.unwrap_or_default(), "api"), "api");
                    }
                    Some(Ok(Event::Delete(_))) => publish(tracker.update(BTreeMap::new(), "api"), "api"),
                    Some(Err(error)) => {
                        if api_ok || !api_failed {
                            warn!(%error, dir = %target.dir.display(), "stop flag: the API watch failed; reading the mounted files until it recovers");
                        }
                        api_ok = false;
                        api_failed = true;
                    }
                    None => {
                        stream = None;
                        api_ok = false;
                        api_failed = true;
                    }
                }
                // Fall back at once on a failure rather than at the next tick.
                !api_ok && api_failed
            }
            _ = poll.tick() => !api_ok && (api_failed || started.elapsed() >= API_GRACE),
        };
        if use_files {
            match read_flag_dir(&target.dir) {
                Ok(data) => {
                    file_error = None;
                    publish(tracker.update(data, "files"), "files");
                }
                Err(error) => {
                    let text = error.to_string();
                    if file_error.as_ref() != Some(&text) {
                        warn!(error = text, "stop flag: cannot read the mounted files; keeping the last good flag");
                        file_error = Some(text);
                    }
                }
            }
        }
    }
}

type FlagStream = futures::stream::BoxStream<
    'static,
    Result<kube::runtime::watcher::Event<k8s_openapi::api::core::v1::ConfigMap>, kube::runtime::watcher::Error>,
>;

/// A watch on the one ConfigMap, by field selector (RBAC grants get/list/watch on that name only).
fn api_stream(client: kube::Client, namespace: &str, name: &str) -> FlagStream {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config).default_backoff().boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::cgroup::tests::TempDir;

    fn me() -> Worker {
        Worker { pod: "pod-a".into(), revision: "r1".into() }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn restart_at(at: &str) -> StopFlag {
        StopFlag { revision: Some("r1".into()), restart_requested_at: Some(ts(at)), ..Default::default() }
    }

    #[test]
    fn reads_one_file_per_key_and_tolerates_an_absent_dir() {
        let dir = TempDir::new("flagdir");
        std::fs::write(dir.0.join("revision"), "r2\n").unwrap();
        std::fs::write(dir.0.join("drain"), "pod-a\npod-b\n").unwrap();
        std::fs::write(dir.0.join("unrelated"), "x").unwrap();
        let data = read_flag_dir(&dir.0).unwrap();
        assert_eq!(data.len(), 2);
        let flag = StopFlag::from_data(&data).unwrap();
        assert_eq!(flag.revision.as_deref(), Some("r2"));
        assert!(flag.drain.contains("pod-a"));
        assert!(read_flag_dir(&dir.0.join("absent")).unwrap().is_empty());
    }

    #[test]
    fn tracker_keeps_the_last_good_flag() {
        let mut t = FlagTracker::default();
        let good = BTreeMap::from([("revision".to_string(), "r1".to_string())]);
        assert!(t.update(good.clone(), "test").is_some());
        assert!(t.update(good.clone(), "test").is_none(), "unchanged flag is not republished");
        let bad = BTreeMap::from([("restartRequestedAt".to_string(), "soon".to_string())]);
        assert!(t.update(bad.clone(), "test").is_none());
        assert!(t.update(bad, "test").is_none());
        let newer = BTreeMap::from([("revision".to_string(), "r2".to_string())]);
        assert_eq!(t.update(newer, "test").unwrap().revision.as_deref(), Some("r2"));
    }

    #[test]
    fn gate_without_a_flag_continues() {
        let mut g = FlagGate::new(me());
        assert_eq!(g.before_start(None, ts("2026-01-01T00:00:00Z")), Verdict::Continue);
        assert_eq!(g.while_running(None, ts("2026-01-01T00:00:00Z")), Verdict::Continue);
    }

    #[test]
    fn gate_refuses_to_start_a_retired_worker() {
        let mut g = FlagGate::new(me());
        let flag = StopFlag { revision: Some("r2".into()), ..Default::default() };
        assert_eq!(g.before_start(Some(&flag), ts("2026-01-01T00:00:00Z")), Verdict::Retire);
        let drained = StopFlag { drain: ["pod-a".to_string()].into(), ..Default::default() };
        assert_eq!(g.before_start(Some(&drained), ts("2026-01-01T00:00:00Z")), Verdict::Retire);
    }

    #[test]
    fn gate_restarts_once_per_request() {
        let mut g = FlagGate::new(me());
        let started = ts("2026-01-01T10:00:00Z");
        let flag = restart_at("2026-01-01T11:00:00Z");
        assert_eq!(g.while_running(Some(&flag), started), Verdict::RestartInPlace);
        assert_eq!(g.while_running(Some(&flag), started), Verdict::Continue, "same request, no second signal");
        let newer = restart_at("2026-01-01T12:00:00Z");
        assert_eq!(g.while_running(Some(&newer), started), Verdict::RestartInPlace);
    }

    #[test]
    fn gate_ignores_a_request_older_than_the_consumer() {
        let mut g = FlagGate::new(me());
        let flag = restart_at("2026-01-01T09:00:00Z");
        assert_eq!(g.while_running(Some(&flag), ts("2026-01-01T10:00:00Z")), Verdict::Continue);
    }

    #[test]
    fn gate_start_satisfies_a_request_from_a_clock_ahead_of_ours() {
        // The controller's clock is ahead: the request looks newer than the consumer started after it.
        let mut g = FlagGate::new(me());
        let flag = restart_at("2026-01-01T10:00:05Z");
        assert_eq!(g.before_start(Some(&flag), ts("2026-01-01T10:00:01Z")), Verdict::Continue);
        assert_eq!(g.while_running(Some(&flag), ts("2026-01-01T10:00:01Z")), Verdict::Continue);
    }

    /// A minimal Kubernetes API over plain HTTP: lists the ConfigMap, streams watch events.
    mod fake_api {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};
        use tokio::sync::{broadcast, mpsc};

        pub struct FakeApi {
            pub url: String,
            pub events: broadcast::Sender<String>,
            pub requests: mpsc::UnboundedReceiver<String>,
        }

        pub fn configmap(rv: u32, revision: &str) -> String {
            format!(
                r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"p-stop-flag","namespace":"ns","resourceVersion":"{rv}"}},"data":{{"revision":"{revision}"}}}}"#
            )
        }

        /// `list`: the body of list responses; `None` answers 403 to everything.
        pub async fn start(list: Option<String>) -> FakeApi {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (events, _) = broadcast::channel(16);
            let (req_tx, requests) = mpsc::unbounded_channel();
            let ev = events.clone();
            tokio::spawn(async move {
                loop {
                    let (conn, _) = listener.accept().await.unwrap();
                    tokio::spawn(serve(conn, list.clone(), ev.clone(), req_tx.clone()));
                }
            });
            FakeApi { url, events, requests }
        }

        async fn serve(
            mut conn: TcpStream,
            list: Option<String>,
            events: broadcast::Sender<String>,
            requests: mpsc::UnboundedSender<String>,
        ) {
            let mut buf = Vec::new();
            loop {
                // one request head (GETs have no body)
                let head = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        break head;
                    }
                    let mut chunk = [0u8; 4096];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                let _ = requests.send(path.clone());
                let Some(list) = &list else {
                    let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"forbidden","reason":"Forbidden","code":403}"#;
                    let response = format!(
                        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                    continue;
                };
                if path.contains("watch=true") {
                    let mut rx = events.subscribe();
                    let head =
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    while let Ok(event) = rx.recv().await {
                        let line = format!("{event}\n");
                        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                        if conn.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{list}",
                    list.len()
                );
                if conn.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }

    fn target(dir: &Path) -> FlagTarget {
        FlagTarget { worker: me(), pool: "p".into(), namespace: Some("ns".into()), dir: dir.to_path_buf() }
    }

    fn client(url: &str) -> kube::Client {
        let mut config = kube::Config::new(url.parse().unwrap());
        config.default_namespace = "ns".into();
        kube::Client::try_from(config).unwrap()
    }

    async fn revision_becomes(rx: &mut watch::Receiver<Option<StopFlag>>, revision: &str) -> bool {
        let wanted = Some(revision.to_string());
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|f| f.as_ref().is_some_and(|f| f.revision == wanted)))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn api_watch_by_field_selector_delivers_changes_at_once() {
        let list = format!(
            r#"{{"apiVersion":"v1","kind":"ConfigMapList","metadata":{{"resourceVersion":"5"}},"items":[{}]}}"#,
            fake_api::configmap(5, "r1")
        );
        let mut api = fake_api::start(Some(list)).await;
        // the files say something else: with a working API they must not be used
        let dir = TempDir::new("apiwatch");
        std::fs::write(dir.0.join("revision"), "from-files").unwrap();
        let (tx, mut rx) = watch::channel(None);
        let source = tokio::spawn(run_source_with(target(&dir.0), Ok((client(&api.url), "ns".into())), tx));

        assert!(revision_becomes(&mut rx, "r1").await, "initial list not delivered");
        let first = api.requests.recv().await.unwrap();
        assert!(first.starts_with("/api/v1/namespaces/ns/configmaps?"), "{first}");
        assert!(first.contains("fieldSelector=metadata.name%3Dp-stop-flag"), "{first}");
        loop {
            let path = tokio::time::timeout(Duration::from_secs(5), api.requests.recv()).await.unwrap().unwrap();
            if path.contains("watch=true") {
                assert!(path.contains("fieldSelector=metadata.name%3Dp-stop-flag"), "{path}");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = std::time::Instant::now();
        api.events.send(format!(r#"{{"type":"MODIFIED","object":{}}}"#, fake_api::configmap(6, "r2"))).unwrap();
        assert!(revision_becomes(&mut rx, "r2").await, "watch event not delivered");
        let latency = sent.elapsed();
        assert!(latency < Duration::from_millis(500), "a change took {latency:?}");

        // the files are not consulted while the API works
        tokio::time::sleep(API_GRACE + FILE_POLL).await;
        assert_eq!(rx.borrow().as_ref().unwrap().revision.as_deref(), Some("r2"));
        source.abort();
    }

    #[tokio::test]
    async fn api_errors_fall_back_to_the_files_at_once() {
        let api = fake_api::start(None).await;
        let dir = TempDir::new("apifail");
        std::fs::write(dir.0.join("revision"), "r1").unwrap();
        let (tx, mut rx) = watch::channel(None);
        let started = std::time::Instant::now();
        let source = tokio::spawn(run_source_with(target(&dir.0), Ok((client(&api.url), "ns".into())), tx));
        assert!(revision_becomes(&mut rx, "r1").await);
        assert!(started.elapsed() < API_GRACE, "fell back only after {:?}", started.elapsed());
        std::fs::write(dir.0.join("revision"), "r2").unwrap();
        assert!(revision_becomes(&mut rx, "r2").await, "files not polled");
        source.abort();
    }

    #[tokio::test]
    async fn an_https_client_builds() {
        // The in-cluster config is https: the TLS stack (and its crypto provider) must be usable.
        let config = kube::Config::new("https://10.0.0.1:443".parse().unwrap());
        assert!(kube::Client::try_from(config).is_ok());
    }

    #[tokio::test]
    async fn without_an_api_the_files_are_read_at_once() {
        let dir = TempDir::new("noapi");
        let (tx, mut rx) = watch::channel(None);
        let source = tokio::spawn(run_source_with(target(&dir.0.join("absent")), Err("test".into()), tx));
        let flag = tokio::time::timeout(Duration::from_millis(500), rx.wait_for(|f| f.is_some())).await;
        assert_eq!(flag.unwrap().unwrap().clone(), Some(StopFlag::default()), "absent dir: empty flag");
        source.abort();
    }

    #[test]
    fn gate_retire_wins_over_restart() {
        let mut g = FlagGate::new(me());
        let flag = StopFlag {
            revision: Some("r2".into()),
            restart_requested_at: Some(ts("2026-01-01T11:00:00Z")),
            ..Default::default()
        };
        assert_eq!(g.while_running(Some(&flag), ts("2026-01-01T10:00:00Z")), Verdict::Retire);
    }
}

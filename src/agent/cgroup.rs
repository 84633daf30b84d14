//! The container's memory limit, for `memory: auto`: cgroup v2, cgroup v1, then the
//! `WORKERPOOL_MEMORY_LIMIT` environment variable the controller sets from the pod spec.
//!
//! Every function takes the cgroup root as a parameter so tests can point it at a temp dir.

use std::path::Path;

/// Where the container's cgroup file system is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Bytes; the controller sets it with a `resourceFieldRef` to `limits.memory`.
pub const MEMORY_LIMIT_ENV: &str = "WORKERPOOL_MEMORY_LIMIT";

/// cgroup v1 writes "no limit" as a huge number (`PAGE_COUNTER_MAX * page size`, e.g.
/// 9223372036854771712); anything at or above 2^60 bytes is treated as unlimited.
const V1_UNLIMITED_FROM: u64 = 1 << 60;

/// What the cgroup file system says about the memory limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLimit {
    Limited(u64),
    Unlimited,
    /// No readable cgroup memory file.
    Unknown,
}

/// Where an `auto` memory limit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerLimit {
    Cgroup(u64),
    Env(u64),
    /// Unlimited or unknown, and no usable environment variable.
    None,
}

impl ContainerLimit {
    pub fn bytes(self) -> Option<u64> {
        match self {
            Self::Cgroup(b) | Self::Env(b) => Some(b),
            Self::None => None,
        }
    }
}

/// Reads the memory limit of the cgroup mounted at `root`: v2 `memory.max`, else v1
/// `memory/memory.limit_in_bytes`.
pub fn cgroup_memory_limit(root: &Path) -> CgroupLimit {
    if let Ok(text) = std::fs::read_to_string(root.join("memory.max")) {
        return parse_v2(&text);
    }
    if let Ok(text) = std::fs::read_to_string(root.join("memory").join("memory.limit_in_bytes")) {
        return parse_v1(&text);
    }
    CgroupLimit::Unknown
}

/// `memory.max`: a number of bytes, or "max".
pub fn parse_v2(text: &str) -> CgroupLimit {
    match text.trim() {
        "max" => CgroupLimit::Unlimited,
        number => number.parse().map(CgroupLimit::Limited).unwrap_or(CgroupLimit::Unknown),
    }
}

/// `memory.limit_in_bytes`: a number of bytes, huge when unlimited.
pub fn parse_v1(text: &str) -> CgroupLimit {
    match text.trim().parse::<u64>() {
        Ok(bytes) if bytes >= V1_UNLIMITED_FROM => CgroupLimit::Unlimited,
        Ok(bytes) => CgroupLimit::Limited(bytes),
        // "-1" on some kernels means unlimited too
        Err(_) if text.trim() == "-1" => CgroupLimit::Unlimited,
        Err(_) => CgroupLimit::Unknown,
    }
}

/// The container's memory limit: the cgroup's, else the environment variable's (bytes).
pub fn container_memory_limit(root: &Path, env_value: Option<&str>) -> ContainerLimit {
    if let CgroupLimit::Limited(bytes) = cgroup_memory_limit(root)
        && bytes > 0
    {
        return ContainerLimit::Cgroup(bytes);
    }
    match env_value.map(str::trim).and_then(|v| v.parse::<u64>().ok()) {
        Some(bytes) if bytes > 0 && bytes < V1_UNLIMITED_FROM => ContainerLimit::Env(bytes),
        _ => ContainerLimit::None,
    }
}

/// `percent` % of `limit`.
pub fn share(limit: u64, percent: u32) -> u64 {
    ((limit as u128 * percent as u128) / 100) as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh empty directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "workerpool-agent-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn v2_limit_and_max() {
        let dir = TempDir::new("cg2");
        std::fs::write(dir.0.join("memory.max"), "536870912\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir.0), CgroupLimit::Limited(512 << 20));
        std::fs::write(dir.0.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir.0), CgroupLimit::Unlimited);
    }

    #[test]
    fn v1_limit_and_huge_value() {
        let dir = TempDir::new("cg1");
        std::fs::create_dir(dir.0.join("memory")).unwrap();
        let file = dir.0.join("memory").join("memory.limit_in_bytes");
        std::fs::write(&file, "268435456\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir.0), CgroupLimit::Limited(256 << 20));
        std::fs::write(&file, "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir.0), CgroupLimit::Unlimited);
    }

    #[test]
    fn nothing_readable_is_unknown() {
        let dir = TempDir::new("cg0");
        assert_eq!(cgroup_memory_limit(&dir.0), CgroupLimit::Unknown);
        assert_eq!(parse_v2("garbage"), CgroupLimit::Unknown);
    }

    #[test]
    fn env_is_the_fallback_when_unlimited_or_unknown() {
        let dir = TempDir::new("cgenv");
        assert_eq!(container_memory_limit(&dir.0, Some("1073741824")), ContainerLimit::Env(1 << 30));
        assert_eq!(container_memory_limit(&dir.0, None), ContainerLimit::None);
        assert_eq!(container_memory_limit(&dir.0, Some("lots")), ContainerLimit::None);
        std::fs::write(dir.0.join("memory.max"), "max").unwrap();
        assert_eq!(container_memory_limit(&dir.0, Some("1073741824")), ContainerLimit::Env(1 << 30));
        std::fs::write(dir.0.join("memory.max"), "2147483648").unwrap();
        assert_eq!(container_memory_limit(&dir.0, Some("1073741824")), ContainerLimit::Cgroup(2 << 30));
    }

    #[test]
    fn share_is_a_percentage() {
        assert_eq!(share(1000, 80), 800);
        assert_eq!(share(u64::MAX / 2, 50), u64::MAX / 4);
    }
}

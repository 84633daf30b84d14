//! The consumer's command line for one start: its command, then its limit arguments, rendered
//! afresh at every start (a new time-limit jitter, the current memory limit for `auto`).

use crate::api::{CustomArguments, Preset};
use crate::limits::{LimitError, MemorySetting, ResolvedLimits, render};

use super::cgroup::{self, ContainerLimit};

/// The limit options as given to the agent, checked at startup.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitPlan {
    pub preset: Preset,
    pub messages: Option<u32>,
    pub time_limit_seconds: Option<u32>,
    pub memory: Option<MemorySetting>,
    pub failures: Option<u32>,
    pub custom: Option<CustomArguments>,
    pub jitter_percent: u32,
    pub memory_auto_percent: u32,
}

/// How `memory: auto` was resolved at one start, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryNote {
    NotAuto,
    Auto {
        limit: ContainerLimit,
        bytes: u64,
    },
    /// No container limit known: the memory argument is left out.
    AutoUnresolved,
}

impl LimitPlan {
    /// Fails (naming what is wrong) when a set limit cannot be rendered for the preset.
    pub fn check(&self) -> Result<(), LimitError> {
        let sample = ResolvedLimits {
            messages: self.messages,
            time_limit_seconds: self.time_limit_seconds,
            memory_bytes: self.memory.map(|_| 128 << 20),
            failures: self.failures,
        };
        render(self.preset, &sample, self.custom.as_ref()).map(|_| ())
    }

    /// The limits for one start. `random_unit` in [0, 1) drives the jitter; `container_limit`
    /// is asked only with `memory: auto`.
    pub fn resolve(
        &self,
        random_unit: f64,
        container_limit: impl FnOnce() -> ContainerLimit,
    ) -> (ResolvedLimits, MemoryNote) {
        let (memory_bytes, note) = match self.memory {
            None => (None, MemoryNote::NotAuto),
            Some(MemorySetting::Bytes(b)) => (Some(b), MemoryNote::NotAuto),
            Some(MemorySetting::Auto) => match container_limit() {
                ContainerLimit::None => (None, MemoryNote::AutoUnresolved),
                limit => {
                    let bytes = cgroup::share(limit.bytes().unwrap_or_default(), self.memory_auto_percent);
                    (Some(bytes), MemoryNote::Auto { limit, bytes })
                }
            },
        };
        let limits = ResolvedLimits {
            messages: self.messages,
            time_limit_seconds: self.time_limit_seconds.map(|s| jittered(s, self.jitter_percent, random_unit)),
            memory_bytes,
            failures: self.failures,
        };
        (limits, note)
    }

    pub fn render(&self, limits: &ResolvedLimits) -> Result<Vec<String>, LimitError> {
        render(self.preset, limits, self.custom.as_ref())
    }
}

/// `seconds` spread by up to ± `percent` %, uniformly by `random_unit` in [0, 1); at least 1.
pub fn jittered(seconds: u32, percent: u32, random_unit: f64) -> u32 {
    let unit = if random_unit.is_finite() { random_unit.clamp(0.0, 1.0) } else { 0.5 };
    let spread = seconds as f64 * percent.min(100) as f64 / 100.0;
    let value = seconds as f64 + spread * (2.0 * unit - 1.0);
    value.round().clamp(1.0, u32::MAX as f64) as u32
}

/// A tiny PRNG (splitmix64) for the jitter: no need for a crate, no need for quality.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock and the pid, so workers started together spread apart.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Self::new(nanos ^ (u64::from(std::process::id()) << 32) ^ (&nanos as *const u64 as u64))
    }

    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LimitPlan {
        LimitPlan {
            preset: Preset::Symfony,
            messages: Some(100),
            time_limit_seconds: Some(3600),
            memory: Some(MemorySetting::Auto),
            failures: None,
            custom: None,
            jitter_percent: 10,
            memory_auto_percent: 80,
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut rng = Rng::new(42);
        for _ in 0..10_000 {
            let v = jittered(3600, 10, rng.unit());
            assert!((3240..=3960).contains(&v), "{v}");
        }
        assert_eq!(jittered(3600, 10, 0.0), 3240);
        assert_eq!(jittered(3600, 10, 0.5), 3600);
        assert_eq!(jittered(3600, 10, 1.0), 3960);
        assert_eq!(jittered(3600, 0, 0.99), 3600);
    }

    #[test]
    fn jitter_keeps_at_least_one_second() {
        assert_eq!(jittered(1, 50, 0.0), 1);
        assert_eq!(jittered(2, 50, 0.0), 1);
        assert_eq!(jittered(1, 50, f64::NAN), 1);
    }

    #[test]
    fn jitter_spreads_values() {
        let mut rng = Rng::new(7);
        let values: std::collections::BTreeSet<u32> = (0..1000).map(|_| jittered(3600, 5, rng.unit())).collect();
        assert!(values.len() > 100, "only {} distinct values", values.len());
        assert!(*values.first().unwrap() < 3500 && *values.last().unwrap() > 3700);
    }

    #[test]
    fn rng_unit_is_in_range() {
        let mut rng = Rng::from_entropy();
        for _ in 0..10_000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn auto_memory_takes_a_share_of_the_container_limit() {
        let (limits, note) = plan().resolve(0.5, || ContainerLimit::Cgroup(1000 << 20));
        assert_eq!(limits.memory_bytes, Some(800 << 20));
        assert_eq!(note, MemoryNote::Auto { limit: ContainerLimit::Cgroup(1000 << 20), bytes: 800 << 20 });
        assert_eq!(plan().render(&limits).unwrap(), ["--limit=100", "--time-limit=3600", "--memory-limit=800M"]);
    }

    #[test]
    fn auto_memory_without_a_limit_is_left_out() {
        let (limits, note) = plan().resolve(0.5, || ContainerLimit::None);
        assert_eq!(limits.memory_bytes, None);
        assert_eq!(note, MemoryNote::AutoUnresolved);
        assert_eq!(plan().render(&limits).unwrap(), ["--limit=100", "--time-limit=3600"]);
    }

    #[test]
    fn fixed_memory_does_not_read_the_cgroup() {
        let plan = LimitPlan { memory: Some(MemorySetting::Bytes(128 << 20)), ..plan() };
        let (limits, note) = plan.resolve(0.5, || panic!("must not be asked"));
        assert_eq!(limits.memory_bytes, Some(128 << 20));
        assert_eq!(note, MemoryNote::NotAuto);
    }

    #[test]
    fn check_reports_a_missing_custom_template() {
        let plan = LimitPlan { preset: Preset::Custom, ..plan() };
        assert_eq!(plan.check().unwrap_err().field, "spec.consumer.arguments.messages");
        let custom = CustomArguments {
            messages: Some("--max={}".into()),
            time_limit_seconds: Some("--secs={}".into()),
            memory: Some("--mb={}".into()),
            failures: None,
        };
        let plan = LimitPlan { custom: Some(custom), ..plan };
        assert!(plan.check().is_ok());
    }
}

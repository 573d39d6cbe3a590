//! How a service's backends are chosen: algorithm and session affinity, and the maps that
//! carry those choices and the per-service counters to the kernel.

use std::{fmt, str::FromStr};

use aya::{
    Pod,
    maps::{MapData, MapError, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use keelson_ebpf_common::{
    FLAG_AFFINITY, FLAG_MAGLEV, FLAG_MAGLEV_TABLE, MAGLEV_TABLES_PER_SERVICE, MAX_MAGLEV_SERVICES,
    ServiceConfig, ServiceStats,
};

use super::{
    maglev_tables::{InMemoryTables, MaglevTables},
    maps::KvMap,
};

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`, as in Kubernetes: three hours.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

/// How new connections pick a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// A random backend per connection.
    #[default]
    Random,
    /// Consistent hashing of the client over a Maglev table: the same client lands on the
    /// same backend from every node, and a backend change moves few clients.
    Maglev,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Random => "random",
            Algorithm::Maglev => "maglev",
        })
    }
}

/// An algorithm name other than `random` or `maglev`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown load-balancing algorithm {0:?}: expected random or maglev")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "random" => Ok(Algorithm::Random),
            "maglev" => Ok(Algorithm::Maglev),
            _ => Err(UnknownAlgorithm(s.to_owned())),
        }
    }
}

/// Backend selection options of one service frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceOptions {
    /// How new clients are spread.
    pub algorithm: Algorithm,
    /// `sessionAffinity: ClientIP`: seconds a client stays with its backend after its last
    /// connection; `None` without affinity.
    pub affinity_timeout_secs: Option<u32>,
}

impl ServiceOptions {
    /// The kernel's configuration value for these options and a counter id.
    pub(crate) fn config(&self, stats_id: u32) -> ServiceConfig {
        let mut flags = 0;
        if self.algorithm == Algorithm::Maglev {
            flags |= FLAG_MAGLEV;
        }
        if self.affinity_timeout_secs.is_some() {
            flags |= FLAG_AFFINITY;
        }
        ServiceConfig {
            stats_id,
            flags,
            affinity_timeout_secs: self.affinity_timeout_secs.unwrap_or(0),
            maglev_table: 0,
        }
    }

    /// The same configuration using Maglev table `table`.
    pub(crate) fn with_table(mut cfg: ServiceConfig, table: u32) -> ServiceConfig {
        cfg.flags |= FLAG_MAGLEV_TABLE;
        cfg.maglev_table = table;
        cfg
    }

    /// The Maglev table a configuration names, if any.
    pub(crate) fn table_of(cfg: &ServiceConfig) -> Option<u32> {
        (cfg.flags & FLAG_MAGLEV_TABLE != 0).then_some(cfg.maglev_table)
    }

    /// The options a configuration value stands for.
    pub(crate) fn from_config(cfg: &ServiceConfig) -> Self {
        ServiceOptions {
            algorithm: if cfg.flags & FLAG_MAGLEV != 0 {
                Algorithm::Maglev
            } else {
                Algorithm::Random
            },
            affinity_timeout_secs: (cfg.flags & FLAG_AFFINITY != 0)
                .then_some(cfg.affinity_timeout_secs),
        }
    }
}

impl fmt::Display for ServiceOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.algorithm)?;
        if let Some(t) = self.affinity_timeout_secs {
            write!(f, ", affinity {t}s")?;
        }
        Ok(())
    }
}

/// The selection maps as the service table uses them: configuration per backend set, Maglev
/// tables, and counters per stable service id.
pub trait SelectionStore: Send {
    /// Configuration of backend set `id`.
    ///
    /// # Errors
    /// The map cannot be read.
    fn config(&self, id: u32) -> Result<Option<ServiceConfig>, MapError>;
    /// Sets the configuration of backend set `id`.
    ///
    /// # Errors
    /// The map cannot be written.
    fn set_config(&mut self, id: u32, cfg: ServiceConfig) -> Result<(), MapError>;
    /// Removes the configuration of backend set `id`.
    ///
    /// # Errors
    /// The map cannot be written.
    fn remove_config(&mut self, id: u32) -> Result<(), MapError>;
    /// Every configuration.
    ///
    /// # Errors
    /// The map cannot be read.
    fn configs(&self) -> Result<Vec<(u32, ServiceConfig)>, MapError>;
    /// Number of Maglev tables (two per Maglev service).
    fn maglev_tables(&self) -> u32;
    /// Writes Maglev table `table` whole: entry `i` → `slots[i]`. The table must not be in
    /// use by a published backend set.
    ///
    /// # Errors
    /// `table` is out of range.
    fn write_maglev_table(&mut self, table: u32, slots: &[u32]) -> Result<(), MapError>;
    /// Maglev table `table`.
    ///
    /// # Errors
    /// `table` is out of range.
    fn maglev_table(&self, table: u32) -> Result<Vec<u32>, MapError>;
    /// Creates or zeroes the counters of a service.
    ///
    /// # Errors
    /// The map cannot be written.
    fn reset_stats(&mut self, stats_id: u32) -> Result<(), MapError>;
    /// Removes the counters of a service.
    ///
    /// # Errors
    /// The map cannot be written.
    fn remove_stats(&mut self, stats_id: u32) -> Result<(), MapError>;
    /// The counters of a service, summed over CPUs.
    ///
    /// # Errors
    /// The map cannot be read.
    fn stats(&self, stats_id: u32) -> Result<Option<ServiceStats>, MapError>;
    /// The maps themselves, for inspection in tests.
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The three selection maps (kernel maps in production, in-memory maps in tests).
pub struct SelectionMaps<C, M, T> {
    /// Backend-set id → configuration.
    pub config: C,
    /// Maglev tables.
    pub maglev: M,
    /// Counters.
    pub stats: T,
}

impl<C, M, T> SelectionStore for SelectionMaps<C, M, T>
where
    C: KvMap<u32, ServiceConfig> + Send + 'static,
    M: MaglevTables + 'static,
    T: KvMap<u32, ServiceStats> + Send + 'static,
{
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn config(&self, id: u32) -> Result<Option<ServiceConfig>, MapError> {
        self.config.get(&id)
    }
    fn set_config(&mut self, id: u32, cfg: ServiceConfig) -> Result<(), MapError> {
        self.config.insert(id, cfg)
    }
    fn remove_config(&mut self, id: u32) -> Result<(), MapError> {
        self.config.remove(&id)
    }
    fn configs(&self) -> Result<Vec<(u32, ServiceConfig)>, MapError> {
        self.config.entries()
    }
    fn maglev_tables(&self) -> u32 {
        self.maglev.count()
    }
    fn write_maglev_table(&mut self, table: u32, slots: &[u32]) -> Result<(), MapError> {
        self.maglev.write(table, slots)
    }
    fn maglev_table(&self, table: u32) -> Result<Vec<u32>, MapError> {
        self.maglev.read(table)
    }
    fn reset_stats(&mut self, stats_id: u32) -> Result<(), MapError> {
        self.stats.insert(stats_id, ServiceStats::default())
    }
    fn remove_stats(&mut self, stats_id: u32) -> Result<(), MapError> {
        self.stats.remove(&stats_id)
    }
    fn stats(&self, stats_id: u32) -> Result<Option<ServiceStats>, MapError> {
        self.stats.get(&stats_id)
    }
}

/// Selection maps kept in memory, for a service table whose maps no program reads (tests,
/// tools); both kernel paths read theirs from pinned maps.
pub fn in_memory() -> Box<dyn SelectionStore> {
    Box::new(SelectionMaps {
        config: std::collections::HashMap::<u32, ServiceConfig>::new(),
        maglev: InMemoryTables::new(MAGLEV_TABLES_PER_SERVICE * MAX_MAGLEV_SERVICES),
        stats: std::collections::HashMap::<u32, ServiceStats>::new(),
    })
}

/// A per-CPU kernel hash map seen as one value per key: reads sum the CPUs' values, writes put
/// the value on the first CPU and zero on the others.
pub struct SummedPerCpu<K: Pod, V: Pod>(pub PerCpuHashMap<MapData, K, V>);

/// Values that can be summed over CPUs.
pub trait Summable: Pod + Default {
    /// `self + other`.
    fn sum(self, other: Self) -> Self;
}

impl Summable for ServiceStats {
    fn sum(self, other: Self) -> Self {
        self.wrapping_sum(other)
    }
}

impl<K: Pod, V: Summable> KvMap<K, V> for SummedPerCpu<K, V> {
    fn get(&self, key: &K) -> Result<Option<V>, MapError> {
        match self.0.get(key, 0) {
            Ok(values) => Ok(Some(values.iter().fold(V::default(), |a, v| a.sum(*v)))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
        let cpu_err = |io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error,
            })
        };
        let cpus = nr_cpus().map_err(|(_, e)| cpu_err(e))?;
        let values: Vec<V> = (0..cpus)
            .map(|i| if i == 0 { value } else { V::default() })
            .collect();
        // `PerCpuValues` is not `Clone`: each attempt builds its own.
        super::maps::retrying_enomem(|| {
            let values = PerCpuValues::try_from(values.clone()).map_err(cpu_err)?;
            self.0.insert(key, values, 0)
        })
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        match self.0.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) if super::maps::is_missing_key(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        self.0
            .iter()
            .map(|r| r.map(|(k, vs)| (k, vs.iter().fold(V::default(), |a, v| a.sum(*v)))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_round_trip_through_the_kernel_config() {
        for opts in [
            ServiceOptions::default(),
            ServiceOptions {
                algorithm: Algorithm::Maglev,
                affinity_timeout_secs: Some(30),
            },
            ServiceOptions {
                algorithm: Algorithm::Random,
                affinity_timeout_secs: Some(DEFAULT_AFFINITY_TIMEOUT_SECS),
            },
        ] {
            let cfg = opts.config(7);
            assert_eq!(cfg.stats_id, 7);
            assert_eq!(ServiceOptions::from_config(&cfg), opts);
        }
        assert_eq!("Maglev".parse(), Ok(Algorithm::Maglev));
        assert!("roundrobin".parse::<Algorithm>().is_err());
    }
}

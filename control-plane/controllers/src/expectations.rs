//! What a workload controller asked for and has not seen in its cache yet ("expectations"):
//! pods it created that the cache does not show, and pods it deleted that the cache still
//! shows as live. Until they are met, a controller does not create or delete again, so a
//! cache that lags behind never makes it act twice.

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    sync::Mutex,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use tokio::time::Instant;

use crate::util;

/// Expectations not met after this are dropped (a watch event may have been missed).
const TTL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Expect {
    creates: HashSet<String>,
    deletes: HashSet<String>,
    at: Option<Instant>,
}

/// Outstanding creates and deletes of pods, per controller key.
pub(crate) struct Expectations<K> {
    all: Mutex<HashMap<K, Expect>>,
}

impl<K: Eq + Hash + Clone> Expectations<K> {
    /// Nothing expected.
    pub fn new() -> Self {
        Expectations {
            all: Mutex::new(HashMap::new()),
        }
    }

    /// Whether earlier creates and deletes for `key` are all visible in `pods` (the owner's
    /// namespace, by name); met or stale expectations are forgotten.
    pub fn met(&self, key: &K, pods: &HashMap<&str, &Pod>) -> bool {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = all.get_mut(key) else {
            return true;
        };
        e.creates.retain(|n| !pods.contains_key(n.as_str()));
        e.deletes
            .retain(|n| pods.get(n.as_str()).is_some_and(|p| !util::terminating(*p)));
        let stale = e.at.is_some_and(|at| at.elapsed() > TTL);
        if (e.creates.is_empty() && e.deletes.is_empty()) || stale {
            all.remove(key);
            return true;
        }
        false
    }

    /// Records pods just created and deleted for `key`.
    pub fn expect(&self, key: &K, creates: Vec<String>, deletes: Vec<String>) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        let e = all.entry(key.clone()).or_default();
        e.creates.extend(creates);
        e.deletes.extend(deletes);
        e.at = Some(Instant::now());
    }

    /// Forgets `key` (its owner is gone).
    pub fn forget(&self, key: &K) {
        self.all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, deleting: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        if deleting {
            p.metadata.deletion_timestamp = Some(util::now());
        }
        p
    }

    #[test]
    fn met_once_creates_appear_and_deletes_terminate() {
        let e = Expectations::new();
        e.expect(&"k", vec!["a".into()], vec!["b".into()]);
        let (b, b_gone) = (pod("b", false), pod("b", true));
        let a = pod("a", false);
        assert!(!e.met(&"k", &HashMap::from([("b", &b)])));
        assert!(!e.met(&"k", &HashMap::from([("a", &a), ("b", &b)])));
        assert!(e.met(&"k", &HashMap::from([("a", &a), ("b", &b_gone)])));
        assert!(e.met(&"other", &HashMap::new()));
    }
}

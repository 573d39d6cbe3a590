//! The revisioned key-value model replicated by the store, in the spirit of etcd's MVCC.
//!
//! This module is pure: no I/O, no clock, no locks. [`Mvcc::apply`] takes a [`Command`] (the
//! payload of one Raft log entry) and returns the [`WriteResult`] together with the [`Event`] it
//! produced, so that the persistence layer can write exactly what changed and the watch layer
//! can fan the event out. Every applied change takes the next store revision; a rejected
//! command (create of an existing key, stale compare-and-swap, delete of a missing key) changes
//! nothing and takes no revision.
//!
//! A bounded window of past events (the *history*) serves watches that resume from an older
//! revision and ranges read at an older revision. Once the window is full, the oldest event is
//! dropped and the *compacted revision* moves up: reads and watches at or after it still work,
//! older ones answer [`MvccError::Compacted`] (which the API server turns into 410 Gone).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use serde::{Deserialize, Serialize};

/// A store revision. Revision 0 is the empty store; the first applied write gets revision 1.
pub type Revision = u64;

/// Errors of reads and watches against the revisioned model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MvccError {
    /// The requested revision is older than the retained history window.
    #[error("revision {requested} has been compacted (oldest readable revision is {compacted})")]
    Compacted {
        /// The revision the caller asked for.
        requested: Revision,
        /// The compacted revision: reads and watches at or after it are served.
        compacted: Revision,
    },
    /// The requested revision has not been applied yet.
    #[error("revision {requested} is newer than the store's current revision {current}")]
    FutureRevision {
        /// The revision the caller asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },
    /// A continuation token does not belong to the range it was used with.
    #[error("continue token for key {key:?} does not match prefix {prefix:?}")]
    InvalidContinue {
        /// The last key recorded in the token.
        key: String,
        /// The prefix of the range request.
        prefix: String,
    },
}

/// Local result alias for this module.
pub type Result<T, E = MvccError> = std::result::Result<T, E>;

/// One stored key with its revision bookkeeping (the fields etcd keeps for a key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value; empty for the key of a delete event.
    pub value: Vec<u8>,
    /// Revision of the write that created this key (0 in a delete event).
    pub create_revision: Revision,
    /// Revision of the last write to this key (the object's `resourceVersion`).
    pub mod_revision: Revision,
    /// Number of writes since the key was created (1 after the create; 0 in a delete event).
    pub version: u64,
}

/// What kind of change an [`Event`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change in the store's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete, the key with an empty value and the delete's
    /// revision as `mod_revision`.
    pub kv: KeyValue,
    /// The key before the change, if it existed.
    pub prev: Option<KeyValue>,
}

impl Event {
    /// The revision at which this change happened.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A write, as carried in one Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create `key` only if it does not exist.
    Create {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Create or overwrite `key` unconditionally.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Overwrite `key` only if it exists and, when `expected` is set, only if its current
    /// `mod_revision` equals it (compare-and-swap).
    Update {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// The `mod_revision` the caller last saw, if the update is conditional.
        expected: Option<Revision>,
    },
    /// Delete `key`; if `expected` is set, only if its `mod_revision` equals it.
    Delete {
        /// The key.
        key: String,
        /// The `mod_revision` the caller last saw, if the delete is conditional.
        expected: Option<Revision>,
    },
}

impl Command {
    /// The key this command writes.
    pub fn key(&self) -> &str {
        match self {
            Command::Create { key, .. }
            | Command::Put { key, .. }
            | Command::Update { key, .. }
            | Command::Delete { key, .. } => key,
        }
    }
}

/// How a [`Command`] turned out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The write was applied: `kv` is the key after it (see [`Event::kv`]), `prev` before.
    Applied {
        /// The key after the write.
        kv: KeyValue,
        /// The key before the write, if it existed.
        prev: Option<KeyValue>,
    },
    /// A create found the key already present.
    AlreadyExists {
        /// The existing key.
        current: KeyValue,
    },
    /// A compare-and-swap or delete found no such key.
    NotFound,
    /// A compare-and-swap or conditional delete found a different `mod_revision`.
    RevisionMismatch {
        /// The key as it is now.
        current: KeyValue,
    },
}

/// The response to one applied [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResult {
    /// The store revision after this command (unchanged if the command was rejected).
    pub revision: Revision,
    /// What happened.
    pub outcome: Outcome,
}

/// Where a paginated range continues: the revision it reads at and the last key returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continue {
    /// The revision every page of this range is read at.
    pub revision: Revision,
    /// The last key of the previous page; the next page starts after it.
    pub after_key: String,
}

/// A range read by key prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// Only keys starting with this prefix ("" for all keys).
    pub prefix: String,
    /// At most this many keys; 0 means no limit.
    pub limit: usize,
    /// Read at this revision instead of the current one (ignored when `continue_from` is set).
    pub revision: Option<Revision>,
    /// Continue a previous page.
    pub continue_from: Option<Continue>,
}

/// The answer to a [`RangeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The revision the range was read at.
    pub revision: Revision,
    /// Set when more keys remain: pass it back to read the next page at the same revision.
    pub continue_token: Option<Continue>,
}

/// Everything the model holds, in a form that serializes (snapshots) and that the
/// persistence layer can rebuild a [`Mvcc`] from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MvccState {
    /// The current revision.
    pub revision: Revision,
    /// The compacted revision.
    pub compacted: Revision,
    /// Every live key, in key order.
    pub kvs: Vec<KeyValue>,
    /// The retained events, oldest first.
    pub history: Vec<Event>,
}

/// The revisioned key-value model.
#[derive(Debug, Clone)]
pub struct Mvcc {
    revision: Revision,
    compacted: Revision,
    kvs: BTreeMap<String, KeyValue>,
    history: VecDeque<Event>,
    history_limit: usize,
}

impl Mvcc {
    /// An empty store keeping at most `history_limit` past events (at least 1).
    ///
    /// Every member of a cluster must use the same limit: compaction is part of the replicated
    /// state.
    pub fn new(history_limit: usize) -> Self {
        Mvcc {
            revision: 0,
            compacted: 0,
            kvs: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
        }
    }

    /// Rebuild the model from a saved state.
    pub fn from_state(state: MvccState, history_limit: usize) -> Self {
        let mut mvcc = Mvcc::new(history_limit);
        mvcc.revision = state.revision;
        mvcc.compacted = state.compacted;
        mvcc.kvs = state
            .kvs
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect();
        mvcc.history = state.history.into();
        mvcc.trim_history();
        mvcc
    }

    /// A copy of the whole state, for snapshots.
    pub fn to_state(&self) -> MvccState {
        MvccState {
            revision: self.revision,
            compacted: self.compacted,
            kvs: self.kvs.values().cloned().collect(),
            history: self.history.iter().cloned().collect(),
        }
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The compacted revision: reads and watches at revisions below it fail.
    pub fn compacted_revision(&self) -> Revision {
        self.compacted
    }

    /// The number of past events this model keeps.
    pub fn history_limit(&self) -> usize {
        self.history_limit
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.kvs.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.kvs.is_empty()
    }

    /// Apply one command; returns its result and, if it changed the store, the event.
    pub fn apply(&mut self, command: Command) -> (WriteResult, Option<Event>) {
        let current = self.kvs.get(command.key()).cloned();
        let next = self.revision + 1;
        let event = match command {
            Command::Create { key, value } => match current {
                Some(current) => return self.rejected(Outcome::AlreadyExists { current }),
                None => put_event(key, value, next, None),
            },
            Command::Put { key, value } => put_event(key, value, next, current),
            Command::Update {
                key,
                value,
                expected,
            } => match current {
                None => return self.rejected(Outcome::NotFound),
                Some(current) if expected.is_some_and(|e| e != current.mod_revision) => {
                    return self.rejected(Outcome::RevisionMismatch { current });
                }
                Some(current) => put_event(key, value, next, Some(current)),
            },
            Command::Delete { key, expected } => match current {
                None => return self.rejected(Outcome::NotFound),
                Some(current) if expected.is_some_and(|e| e != current.mod_revision) => {
                    return self.rejected(Outcome::RevisionMismatch { current });
                }
                Some(current) => Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        key,
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: next,
                        version: 0,
                    },
                    prev: Some(current),
                },
            },
        };
        self.revision = next;
        match event.kind {
            EventKind::Put => {
                self.kvs.insert(event.kv.key.clone(), event.kv.clone());
            }
            EventKind::Delete => {
                self.kvs.remove(&event.kv.key);
            }
        }
        self.history.push_back(event.clone());
        self.trim_history();
        let result = WriteResult {
            revision: next,
            outcome: Outcome::Applied {
                kv: event.kv.clone(),
                prev: event.prev.clone(),
            },
        };
        (result, Some(event))
    }

    fn rejected(&self, outcome: Outcome) -> (WriteResult, Option<Event>) {
        (
            WriteResult {
                revision: self.revision,
                outcome,
            },
            None,
        )
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = self.compacted.max(dropped.revision());
            }
        }
    }

    /// Check that `revision` can be read: not compacted and not in the future.
    pub fn check_readable(&self, revision: Revision) -> Result<()> {
        if revision > self.revision {
            return Err(MvccError::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        if revision < self.compacted {
            return Err(MvccError::Compacted {
                requested: revision,
                compacted: self.compacted,
            });
        }
        Ok(())
    }

    /// Events with a revision greater than `revision`, oldest first: the slice of history a
    /// watch that last saw `revision` has missed.
    ///
    /// # Errors
    /// [`MvccError::Compacted`] if events after `revision` are no longer retained;
    /// [`MvccError::FutureRevision`] if `revision` is beyond the current revision.
    pub fn events_after(&self, revision: Revision) -> Result<Vec<Event>> {
        self.check_readable(revision)?;
        let start = self.history.partition_point(|e| e.revision() <= revision);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// For each key changed after `revision`, its state at `revision` (None: absent then).
    fn overlay_at(&self, revision: Revision) -> BTreeMap<&str, Option<&KeyValue>> {
        let mut overlay = BTreeMap::new();
        let start = self.history.partition_point(|e| e.revision() <= revision);
        for event in self.history.range(start..) {
            overlay
                .entry(event.kv.key.as_str())
                .or_insert(event.prev.as_ref());
        }
        overlay
    }

    /// The key at `revision` (current if None).
    ///
    /// # Errors
    /// [`MvccError::Compacted`] or [`MvccError::FutureRevision`] for an unreadable revision.
    pub fn get(&self, key: &str, revision: Option<Revision>) -> Result<Option<KeyValue>> {
        let Some(revision) = revision.filter(|r| *r != self.revision) else {
            return Ok(self.kvs.get(key).cloned());
        };
        self.check_readable(revision)?;
        let start = self.history.partition_point(|e| e.revision() <= revision);
        let first_change = self.history.range(start..).find(|e| e.kv.key == key);
        Ok(match first_change {
            Some(event) => event.prev.clone(),
            None => self.kvs.get(key).cloned(),
        })
    }

    /// Keys by prefix, in key order, with a page limit and a continuation at a fixed revision.
    ///
    /// # Errors
    /// [`MvccError::Compacted`] when the range's revision (asked for, or carried by the
    /// continuation) left the history window; [`MvccError::FutureRevision`];
    /// [`MvccError::InvalidContinue`] when the continuation's key is outside the prefix.
    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse> {
        let (revision, after) = match &request.continue_from {
            Some(token) => {
                if !token.after_key.starts_with(&request.prefix) {
                    return Err(MvccError::InvalidContinue {
                        key: token.after_key.clone(),
                        prefix: request.prefix.clone(),
                    });
                }
                (token.revision, Some(token.after_key.as_str()))
            }
            None => (request.revision.unwrap_or(self.revision), None),
        };
        self.check_readable(revision)?;
        let lower = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Included(request.prefix.as_str()),
        };
        let in_prefix = |k: &&str| k.starts_with(request.prefix.as_str());
        let overlay = if revision == self.revision {
            BTreeMap::new()
        } else {
            self.overlay_at(revision)
        };
        let mut current = self
            .kvs
            .range::<str, _>((lower, Bound::Unbounded))
            .map(|(k, v)| (k.as_str(), v))
            .take_while(|(k, _)| in_prefix(k))
            .peekable();
        let mut changed = overlay
            .range::<&str, _>((lower.map(|k| k), Bound::Unbounded))
            .map(|(k, v)| (*k, *v))
            .take_while(|(k, _)| in_prefix(k))
            .peekable();
        let limit = if request.limit == 0 {
            usize::MAX
        } else {
            request.limit
        };
        let mut kvs = Vec::new();
        let mut more = false;
        loop {
            // Merge the two key-ordered streams; the overlay wins on equal keys.
            let next = match (current.peek(), changed.peek()) {
                (None, None) => break,
                (Some(_), None) => current.next().map(|(_, kv)| Some(kv)),
                (None, Some(_)) => changed.next().map(|(_, kv)| kv),
                (Some((ck, _)), Some((ok, _))) => {
                    if ck < ok {
                        current.next().map(|(_, kv)| Some(kv))
                    } else {
                        if ck == ok {
                            current.next();
                        }
                        changed.next().map(|(_, kv)| kv)
                    }
                }
            };
            let Some(Some(kv)) = next else { continue };
            if kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(kv.clone());
        }
        let continue_token = match (more, kvs.last()) {
            (true, Some(last)) => Some(Continue {
                revision,
                after_key: last.key.clone(),
            }),
            _ => None,
        };
        Ok(RangeResponse {
            kvs,
            revision,
            continue_token,
        })
    }
}

fn put_event(key: String, value: Vec<u8>, revision: Revision, prev: Option<KeyValue>) -> Event {
    let (create_revision, version) = match &prev {
        Some(p) => (p.create_revision, p.version + 1),
        None => (revision, 1),
    };
    Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key,
            value,
            create_revision,
            mod_revision: revision,
            version,
        },
        prev,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Command {
        Command::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    fn keys(resp: &RangeResponse) -> Vec<&str> {
        resp.kvs.iter().map(|kv| kv.key.as_str()).collect()
    }

    fn applied(result: &WriteResult) -> &KeyValue {
        match &result.outcome {
            Outcome::Applied { kv, .. } => kv,
            other => panic!("expected applied, got {other:?}"),
        }
    }

    #[test]
    fn writes_take_consecutive_revisions_and_rejections_take_none() {
        let mut m = Mvcc::new(100);
        let (r1, e1) = m.apply(Command::Create {
            key: "a".into(),
            value: b"1".to_vec(),
        });
        assert_eq!(r1.revision, 1);
        let kv = applied(&r1);
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 1, 1));
        assert_eq!(e1.map(|e| e.kind), Some(EventKind::Put));

        let (r2, e2) = m.apply(Command::Create {
            key: "a".into(),
            value: b"2".to_vec(),
        });
        assert_eq!(r2.revision, 1);
        assert!(
            matches!(r2.outcome, Outcome::AlreadyExists { ref current } if current.value == b"1")
        );
        assert!(e2.is_none());
        assert_eq!(m.revision(), 1);

        let (r3, _) = m.apply(put("a", "3"));
        let kv = applied(&r3);
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
        assert_eq!(m.revision(), 2);
    }

    #[test]
    fn update_checks_existence_and_mod_revision() {
        let mut m = Mvcc::new(100);
        m.apply(put("k", "v1"));
        let (stale, ev) = m.apply(Command::Update {
            key: "k".into(),
            value: b"x".to_vec(),
            expected: Some(7),
        });
        assert!(ev.is_none());
        assert!(
            matches!(stale.outcome, Outcome::RevisionMismatch { ref current } if current.mod_revision == 1)
        );
        let (ok, ev) = m.apply(Command::Update {
            key: "k".into(),
            value: b"v2".to_vec(),
            expected: Some(1),
        });
        assert_eq!(ok.revision, 2);
        let ev = ev.expect("event");
        assert_eq!(ev.prev.map(|p| p.value), Some(b"v1".to_vec()));
        assert_eq!(ev.kv.value, b"v2");
        let (missing, _) = m.apply(Command::Update {
            key: "nope".into(),
            value: vec![],
            expected: Some(1),
        });
        assert_eq!(missing.outcome, Outcome::NotFound);
        let (missing, _) = m.apply(Command::Update {
            key: "nope".into(),
            value: vec![],
            expected: None,
        });
        assert_eq!(missing.outcome, Outcome::NotFound);
        let (unconditional, _) = m.apply(Command::Update {
            key: "k".into(),
            value: b"v3".to_vec(),
            expected: None,
        });
        let kv = applied(&unconditional);
        assert_eq!((kv.mod_revision, kv.version, kv.create_revision), (3, 3, 1));
    }

    #[test]
    fn delete_conditional_and_unconditional() {
        let mut m = Mvcc::new(100);
        m.apply(put("k", "v"));
        let (r, ev) = m.apply(Command::Delete {
            key: "k".into(),
            expected: Some(5),
        });
        assert!(matches!(r.outcome, Outcome::RevisionMismatch { .. }));
        assert!(ev.is_none());
        let (r, ev) = m.apply(Command::Delete {
            key: "k".into(),
            expected: Some(1),
        });
        assert_eq!(r.revision, 2);
        let ev = ev.expect("event");
        assert_eq!(ev.kind, EventKind::Delete);
        assert_eq!(ev.revision(), 2);
        assert_eq!(ev.prev.map(|p| p.value), Some(b"v".to_vec()));
        assert_eq!(m.get("k", None), Ok(None));
        let (r, _) = m.apply(Command::Delete {
            key: "k".into(),
            expected: None,
        });
        assert_eq!(r.outcome, Outcome::NotFound);
        // Re-creating a deleted key starts a new generation.
        let (r, _) = m.apply(put("k", "again"));
        let kv = applied(&r);
        assert_eq!((kv.create_revision, kv.version), (3, 1));
    }

    #[test]
    fn get_at_past_revisions() {
        let mut m = Mvcc::new(100);
        m.apply(put("k", "v1")); // 1
        m.apply(put("other", "o")); // 2
        m.apply(put("k", "v2")); // 3
        m.apply(Command::Delete {
            key: "k".into(),
            expected: None,
        }); // 4
        let value = |r| m.get("k", Some(r)).map(|kv| kv.map(|kv| kv.value));
        assert_eq!(value(0), Ok(None));
        assert_eq!(value(1), Ok(Some(b"v1".to_vec())));
        assert_eq!(value(2), Ok(Some(b"v1".to_vec())));
        assert_eq!(value(3), Ok(Some(b"v2".to_vec())));
        assert_eq!(value(4), Ok(None));
        assert_eq!(
            m.get("k", Some(5)),
            Err(MvccError::FutureRevision {
                requested: 5,
                current: 4
            })
        );
    }

    #[test]
    fn range_by_prefix_pages_at_a_fixed_revision() {
        let mut m = Mvcc::new(100);
        for name in ["a", "b", "c", "d", "e"] {
            m.apply(put(&format!("/pods/{name}"), name));
        }
        m.apply(put("/nodes/n1", "n"));
        m.apply(put("/pods", "not in /pods/ prefix"));
        let mut request = RangeRequest {
            prefix: "/pods/".into(),
            limit: 2,
            ..Default::default()
        };
        let page1 = m.range(&request).expect("page 1");
        assert_eq!(keys(&page1), ["/pods/a", "/pods/b"]);
        let rev = page1.revision;
        assert_eq!(rev, 7);
        // Writes between pages must not show up in later pages.
        m.apply(put("/pods/c", "changed"));
        m.apply(Command::Delete {
            key: "/pods/d".into(),
            expected: None,
        });
        m.apply(put("/pods/bb", "new"));
        request.continue_from = page1.continue_token.clone();
        let page2 = m.range(&request).expect("page 2");
        assert_eq!(keys(&page2), ["/pods/c", "/pods/d"]);
        assert_eq!(page2.kvs[0].value, b"c");
        assert_eq!(page2.revision, rev);
        request.continue_from = page2.continue_token.clone();
        let page3 = m.range(&request).expect("page 3");
        assert_eq!(keys(&page3), ["/pods/e"]);
        assert!(page3.continue_token.is_none());

        // The current revision sees the later writes.
        let now = m
            .range(&RangeRequest {
                prefix: "/pods/".into(),
                ..Default::default()
            })
            .expect("current");
        assert_eq!(
            keys(&now),
            ["/pods/a", "/pods/b", "/pods/bb", "/pods/c", "/pods/e"]
        );
        assert!(now.continue_token.is_none());
    }

    #[test]
    fn range_limit_equal_to_size_has_no_continue() {
        let mut m = Mvcc::new(100);
        m.apply(put("x/1", ""));
        m.apply(put("x/2", ""));
        let r = m
            .range(&RangeRequest {
                prefix: "x/".into(),
                limit: 2,
                ..Default::default()
            })
            .expect("range");
        assert_eq!(r.kvs.len(), 2);
        assert!(r.continue_token.is_none());
    }

    #[test]
    fn range_rejects_foreign_continue_token() {
        let m = Mvcc::new(10);
        let err = m
            .range(&RangeRequest {
                prefix: "/pods/".into(),
                continue_from: Some(Continue {
                    revision: 0,
                    after_key: "/secrets/x".into(),
                }),
                ..Default::default()
            })
            .expect_err("foreign token");
        assert!(matches!(err, MvccError::InvalidContinue { .. }));
    }

    #[test]
    fn history_window_compacts_oldest_events() {
        let mut m = Mvcc::new(3);
        for i in 1..=5 {
            m.apply(put("k", &i.to_string()));
        }
        // Events 3, 4, 5 are retained; 1 and 2 were dropped.
        assert_eq!(m.compacted_revision(), 2);
        let after2: Vec<_> = m
            .events_after(2)
            .expect("after 2")
            .iter()
            .map(Event::revision)
            .collect();
        assert_eq!(after2, [3, 4, 5]);
        assert_eq!(m.events_after(5).expect("after 5"), []);
        assert_eq!(
            m.events_after(1),
            Err(MvccError::Compacted {
                requested: 1,
                compacted: 2
            })
        );
        assert!(matches!(
            m.range(&RangeRequest {
                revision: Some(1),
                ..Default::default()
            }),
            Err(MvccError::Compacted { .. })
        ));
        assert_eq!(
            m.get("k", Some(2)).map(|kv| kv.map(|kv| kv.value)),
            Ok(Some(b"2".to_vec()))
        );
        assert!(matches!(
            m.events_after(9),
            Err(MvccError::FutureRevision { .. })
        ));
    }

    #[test]
    fn continue_token_expires_with_compaction() {
        let mut m = Mvcc::new(2);
        m.apply(put("p/a", ""));
        m.apply(put("p/b", ""));
        let request = RangeRequest {
            prefix: "p/".into(),
            limit: 1,
            ..Default::default()
        };
        let page1 = m.range(&request).expect("page 1");
        for i in 0..3 {
            m.apply(put("q", &i.to_string()));
        }
        let err = m
            .range(&RangeRequest {
                continue_from: page1.continue_token,
                ..request
            })
            .expect_err("compacted");
        assert!(matches!(err, MvccError::Compacted { .. }));
    }

    #[test]
    fn events_carry_previous_values_and_rejections_leave_no_event() {
        let mut m = Mvcc::new(10);
        m.apply(put("k", "1"));
        m.apply(Command::Create {
            key: "k".into(),
            value: vec![],
        });
        m.apply(put("k", "2"));
        m.apply(Command::Delete {
            key: "k".into(),
            expected: None,
        });
        let events = m.events_after(0).expect("events");
        let summary: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.revision(),
                    e.kind,
                    e.prev.as_ref().map(|p| p.value.clone()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (1, EventKind::Put, None),
                (2, EventKind::Put, Some(b"1".to_vec())),
                (3, EventKind::Delete, Some(b"2".to_vec())),
            ]
        );
    }

    #[test]
    fn state_round_trips() {
        let mut m = Mvcc::new(2);
        for i in 0..5 {
            m.apply(put(&format!("k{}", i % 3), &i.to_string()));
        }
        let state = m.to_state();
        let encoded = postcard::to_allocvec(&state).expect("encode");
        let decoded: MvccState = postcard::from_bytes(&encoded).expect("decode");
        let restored = Mvcc::from_state(decoded, 2);
        assert_eq!(restored.to_state(), state);
        assert_eq!(restored.revision(), 5);
        assert_eq!(restored.compacted_revision(), 3);
        assert_eq!(restored.len(), 3);
        assert_eq!(restored.events_after(3), m.events_after(3));
    }
}

#![allow(dead_code)] // the benchmark calls what it compares, not every method
//! The benchmarks' baseline: cohort's in-process index as it was before the
//! one-word-slot layout (`src/index/memory.rs`), a `HashMap<u64, Slot>`
//! with `Box`ed id lists, kept here so both are measured in one run.
//!
//! Attributes are interned to `u32`, so a t-subset is a short sorted list of
//! integers, keyed by a 64-bit hash of that list. A hash collision only adds
//! a candidate, which the exact overlap check then rejects, so the key need
//! not be exact. Each key maps to a set of groups (almost always one), so the
//! index stays correct even if two groups ever shared a t-subset. One mutex
//! serialises decisions: each takes microseconds.
//!
//! At a million groups the subset table holds ~27 million entries and every
//! lookup is a cache miss, so entries are kept small: a `u64` key and an
//! 8-byte slot naming a dense group index (16 bytes, where `u128` keys and a
//! `Vec` slot took 48). The tables keyed by integers use FxHash: SipHash's
//! flooding resistance buys nothing for keys the index computes itself. The
//! interner, keyed by the strings users send, keeps SipHash.

use std::collections::HashMap;
use std::sync::Mutex;

use rustc_hash::FxHashMap;

use cohort::domain::attribute::sorted_overlap;
use cohort::domain::grouping::{choose_best, for_each_subset};
use cohort::domain::{AttributeSet, GroupId, Threshold};
use cohort::index::Candidate;

#[derive(Debug)]
pub struct HashbrownIndex {
    t: Threshold,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    interned: HashMap<String, u32>,
    /// Groups by dense index, in insertion order.
    groups: Vec<Group>,
    dense: FxHashMap<GroupId, u32>,
    subsets: FxHashMap<u64, Slot>,
    /// Sets of dense indexes for the slots that hold more than one group.
    shared: Vec<Vec<u32>>,
}

#[derive(Debug)]
struct Group {
    id: GroupId,
    attributes: AttributeSet,
    /// Interned ids of the attributes, sorted.
    ids: Box<[u32]>,
}

/// The groups under one t-subset key. `One` is the rule's normal case;
/// `Many` points into `Inner::shared`.
#[derive(Debug, Clone, Copy)]
enum Slot {
    One(u32),
    Many(u32),
}

/// A 64-bit hash of a sorted id list (FNV-1a over the ids, then a
/// splitmix64 finaliser to spread the bits).
fn subset_key(subset: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in subset {
        h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl HashbrownIndex {
    pub fn new(t: Threshold) -> Self {
        Self {
            t,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn threshold(&self) -> Threshold {
        self.t
    }

    /// Adds an existing group, as when loading from storage. Unlike a
    /// founding it does not check the rule: loading must reproduce what is
    /// stored, and the set-valued slots keep lookups right even if the
    /// stored groups overlap.
    pub fn insert(&self, id: GroupId, attrs: AttributeSet) {
        self.inner
            .lock()
            .expect("index mutex poisoned")
            .insert(self.t, id, attrs);
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("index mutex poisoned")
            .groups
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The best committed group for `attrs`, synchronously (benchmarks,
    /// property tests, and the embedded signup under its lock).
    pub fn best_now(&self, attrs: &AttributeSet) -> Option<Candidate> {
        let inner = self.inner.lock().expect("index mutex poisoned");
        inner.best(self.t, attrs).map(|(id, _)| Candidate {
            id,
            attributes: inner.groups[inner.dense[&id] as usize].attributes.clone(),
        })
    }

    /// Adds a committed group unless it is already there.
    pub fn add_now(&self, id: GroupId, attrs: AttributeSet) {
        let mut inner = self.inner.lock().expect("index mutex poisoned");
        if !inner.dense.contains_key(&id) {
            inner.insert(self.t, id, attrs);
        }
    }
}

impl Inner {
    fn intern(&mut self, a: &str) -> u32 {
        if let Some(&id) = self.interned.get(a) {
            return id;
        }
        let id = u32::try_from(self.interned.len()).expect("fewer than 2^32 distinct attributes");
        self.interned.insert(a.to_owned(), id);
        id
    }

    fn insert(&mut self, t: Threshold, id: GroupId, attrs: AttributeSet) {
        let mut ids: Vec<u32> = attrs.iter().map(|a| self.intern(a.as_str())).collect();
        ids.sort_unstable();
        let dense = u32::try_from(self.groups.len()).expect("fewer than 2^32 groups");
        let mut buf = Vec::with_capacity(t.get());
        for_each_subset(ids.len(), t.get(), |s| {
            buf.clear();
            buf.extend(s.iter().map(|&i| ids[i]));
            let key = subset_key(&buf);
            match self.subsets.get_mut(&key) {
                None => {
                    self.subsets.insert(key, Slot::One(dense));
                }
                Some(Slot::One(g)) if *g != dense => {
                    let set =
                        u32::try_from(self.shared.len()).expect("fewer than 2^32 shared slots");
                    self.shared.push(vec![*g, dense]);
                    self.subsets.insert(key, Slot::Many(set));
                }
                Some(Slot::Many(set)) => {
                    let v = &mut self.shared[*set as usize];
                    if !v.contains(&dense) {
                        v.push(dense);
                    }
                }
                Some(Slot::One(_)) => {}
            }
        });
        self.dense.insert(id, dense);
        self.groups.push(Group {
            id,
            attributes: attrs,
            ids: ids.into_boxed_slice(),
        });
    }

    /// Candidates are the groups hit by at least one of the user's
    /// t-subsets; their exact overlap decides, as in the reference.
    fn best(&self, t: Threshold, attrs: &AttributeSet) -> Option<(GroupId, usize)> {
        // Attributes never seen cannot be in any group: only known ones count.
        let mut ids: Vec<u32> = attrs
            .iter()
            .filter_map(|a| self.interned.get(a.as_str()).copied())
            .collect();
        if ids.len() < t.get() {
            return None;
        }
        ids.sort_unstable();
        let mut candidates: Vec<u32> = Vec::new();
        let mut buf = Vec::with_capacity(t.get());
        for_each_subset(ids.len(), t.get(), |s| {
            buf.clear();
            buf.extend(s.iter().map(|&i| ids[i]));
            match self.subsets.get(&subset_key(&buf)) {
                None => {}
                Some(Slot::One(g)) => candidates.push(*g),
                Some(Slot::Many(set)) => candidates.extend_from_slice(&self.shared[*set as usize]),
            }
        });
        candidates.sort_unstable();
        candidates.dedup();
        choose_best(
            candidates.into_iter().map(|g| {
                let group = &self.groups[g as usize];
                (group.id, sorted_overlap(&group.ids, &ids))
            }),
            t,
        )
    }
}

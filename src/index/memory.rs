//! The in-process group index: the same t-subset design as the Redis script,
//! in plain Rust with no I/O.
//!
//! Attributes are interned to `u32`, so a t-subset is a short sorted list of
//! integers, keyed by a 64-bit hash of that list. A hash collision only adds
//! a candidate, which the exact overlap check then rejects, so the key need
//! not be exact. Each key maps to a set of groups (almost always one), so the
//! index stays correct even if two groups ever shared a t-subset. One mutex
//! serialises decisions: each takes microseconds.
//!
//! # Layout, for a million groups and more
//! At 10^6 groups the subset table holds ~27 million entries (hundreds of
//! MB): every lookup is a cache miss and, unless the kernel grants huge
//! pages, a TLB miss too. A decision looks up all C(k, t) subsets of the
//! user (20 for 6 attributes), so what matters is how many of those misses
//! are waited for one after another. Hence:
//! - **One word per entry.** The subset table is open addressing with
//!   linear probing over `u64` slots: the high bits of the key choose the
//!   home slot, its low 32 bits are kept as a tag beside a 32-bit value
//!   (half the 16 bytes of a `HashMap<u64, u32>` entry, and no separate
//!   control bytes to miss on). A probe rarely leaves the home cache line.
//! - **Independent misses.** A lookup first computes every key, then reads
//!   every home slot in one pass with no branch between the reads, so the
//!   CPU has them all in flight at once, and only then walks the probe
//!   runs (by then in cache). The same for the candidates' records.
//! - **One miss per candidate.** A group is a record in one arena, `[len,
//!   ordinal, id, ids…]`, and the table's value is the record's offset: the
//!   exact overlap and the tie-break read one place; the attributes (for
//!   the winner only) are behind `ordinal`.
//!
//! The table grows by doubling, rebuilt from the arena (the slots keep
//! only 32 bits of the key, not enough to rehash); `with_capacity` sizes it
//! once when the group count is known, as at startup.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use rustc_hash::FxHashMap;

use super::{Candidate, GroupIndex, IndexError};
use crate::domain::attribute::sorted_overlap;
use crate::domain::grouping::{binomial, choose_best, for_each_subset};
use crate::domain::{AttributeSet, GroupId, Threshold};

#[derive(Debug)]
pub struct MemoryIndex {
    t: Threshold,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    interned: HashMap<String, u32>,
    /// Group records back to back: `[len, ordinal, id (low, high word),
    /// ids (sorted)…]`.
    arena: Vec<u32>,
    /// By ordinal: the group's id and attributes, read for a winner only.
    groups: Vec<(GroupId, AttributeSet)>,
    /// Group id to record offset, to add a group once.
    offsets: FxHashMap<GroupId, u32>,
    table: SubsetTable,
    /// Sets of record offsets, for the slots that hold more than one group.
    shared: Vec<Vec<u32>>,
    scratch: Scratch,
}

/// A slot's value: a record offset, or (with `MANY` set) an index into
/// `Inner::shared`. `u32::MAX` is never a value, so no entry is `EMPTY`.
const MANY: u32 = 1 << 31;

/// Open addressing over one `u64` per slot: `tag << 32 | value`.
#[derive(Debug)]
struct SubsetTable {
    slots: Vec<u64>,
    bits: u32,
    len: usize,
}

const EMPTY: u64 = u64::MAX;
/// Words before a record's ids.
const HEADER: usize = 4;
/// Smallest table: 2^10 slots.
const MIN_BITS: u32 = 10;

impl SubsetTable {
    /// A table for `entries` keys at a load of at most 3/4.
    fn for_entries(entries: usize) -> Self {
        let mut bits = MIN_BITS;
        while (entries as u128) * 4 > (1u128 << bits) * 3 {
            bits += 1;
        }
        Self {
            slots: vec![EMPTY; 1 << bits],
            bits,
            len: 0,
        }
    }

    fn fits(&self, more: usize) -> bool {
        (self.len + more) * 4 <= self.slots.len() * 3
    }

    fn home(&self, key: u64) -> usize {
        (key >> (64 - self.bits)) as usize
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Calls `f` with the value of every entry whose tag is the key's along
    /// its probe run (almost always one; a tag shared by another key only
    /// adds a candidate). `first` is the home slot, read beforehand.
    fn get(&self, key: u64, first: u64, mut f: impl FnMut(u32)) {
        let tag = key as u32;
        let (mut i, mut slot) = (self.home(key), first);
        while slot != EMPTY {
            if (slot >> 32) as u32 == tag {
                f(slot as u32);
            }
            i = (i + 1) & self.mask();
            slot = self.slots[i];
        }
    }

    /// The slot holding the key's tag, or the empty one that would.
    fn find_for_insert(&self, key: u64) -> usize {
        let tag = key as u32;
        let mut i = self.home(key);
        loop {
            let slot = self.slots[i];
            if slot == EMPTY || (slot >> 32) as u32 == tag {
                return i;
            }
            i = (i + 1) & self.mask();
        }
    }
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

/// The keys of every `t`-subset of sorted interned ids, into `out`.
fn keys_of(ids: &[u32], t: usize, buf: &mut Vec<u32>, out: &mut Vec<u64>) {
    out.clear();
    for_each_subset(ids.len(), t, |s| {
        buf.clear();
        buf.extend(s.iter().map(|&i| ids[i]));
        out.push(subset_key(buf));
    });
}

impl MemoryIndex {
    pub fn new(t: Threshold) -> Self {
        Self::with_capacity(t, 0)
    }

    /// An index sized for `groups` groups of typical size (6 attributes),
    /// so that loading them does not rebuild the table on the way.
    pub fn with_capacity(t: Threshold, groups: usize) -> Self {
        let per_group = binomial(6.max(t.get()), t.get()) as usize;
        Self {
            t,
            inner: Mutex::new(Inner::for_entries(groups.saturating_mul(per_group))),
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
        let mut guard = self.inner.lock().expect("index mutex poisoned");
        let inner = &mut *guard;
        let mut scratch = std::mem::take(&mut inner.scratch);
        let best = inner.best(self.t, attrs, &mut scratch);
        inner.scratch = scratch;
        best.map(|ordinal| {
            let (id, attributes) = &inner.groups[ordinal as usize];
            Candidate {
                id: *id,
                attributes: attributes.clone(),
            }
        })
    }

    /// Room for `groups` more groups of typical size, made at once (the
    /// embedded import, which can estimate them from the file's size):
    /// growing one doubling at a time would rebuild the table from the
    /// arena at each, and zero each new table as it is first touched.
    pub fn reserve(&self, groups: usize) {
        let more = groups.saturating_mul(binomial(6.max(self.t.get()), self.t.get()) as usize);
        let mut inner = self.inner.lock().expect("index mutex poisoned");
        if !inner.table.fits(more) {
            inner.grow(self.t, more);
        }
    }

    /// One signup decided and, if it founds, its group added, under one
    /// lock (the embedded import): the id of the best group for `attrs`,
    /// or None after adding `attrs` as group `id`.
    pub fn join_or_found(&self, attrs: &AttributeSet, id: GroupId) -> Option<GroupId> {
        let mut guard = self.inner.lock().expect("index mutex poisoned");
        let inner = &mut *guard;
        let mut scratch = std::mem::take(&mut inner.scratch);
        let best = inner.best(self.t, attrs, &mut scratch);
        inner.scratch = scratch;
        match best {
            Some(ordinal) => Some(inner.groups[ordinal as usize].0),
            None => {
                inner.insert(self.t, id, attrs.clone());
                None
            }
        }
    }

    /// Whether the index holds group `id`.
    pub fn contains(&self, id: GroupId) -> bool {
        self.inner
            .lock()
            .expect("index mutex poisoned")
            .offsets
            .contains_key(&id)
    }

    /// The attributes of group `id`, if the index holds it.
    pub fn attributes_of(&self, id: GroupId) -> Option<AttributeSet> {
        let inner = self.inner.lock().expect("index mutex poisoned");
        let offset = *inner.offsets.get(&id)? as usize;
        let ordinal = inner.arena[offset + 1] as usize;
        Some(inner.groups[ordinal].1.clone())
    }

    /// Adds a committed group unless it is already there.
    pub fn add_now(&self, id: GroupId, attrs: AttributeSet) {
        let mut inner = self.inner.lock().expect("index mutex poisoned");
        if !inner.offsets.contains_key(&id) {
            inner.insert(self.t, id, attrs);
        }
    }
}

impl Inner {
    fn for_entries(entries: usize) -> Self {
        Self {
            interned: HashMap::new(),
            arena: Vec::new(),
            groups: Vec::new(),
            offsets: FxHashMap::default(),
            table: SubsetTable::for_entries(entries),
            shared: Vec::new(),
            scratch: Scratch::default(),
        }
    }

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
        let offset = u32::try_from(self.arena.len())
            .ok()
            .filter(|&o| o < MANY)
            .expect("group records fit in 2^31 words");
        let ordinal = u32::try_from(self.groups.len()).expect("fewer than 2^32 groups");
        self.arena.push(ids.len() as u32);
        self.arena.push(ordinal);
        self.arena.push(id.0 as u32);
        self.arena.push((id.0 >> 32) as u32);
        self.arena.extend_from_slice(&ids);
        self.offsets.insert(id, offset);
        self.groups.push((id, attrs));

        let (mut buf, mut keys) = (Vec::new(), Vec::new());
        keys_of(&ids, t.get(), &mut buf, &mut keys);
        if !self.table.fits(keys.len()) {
            self.grow(t, keys.len());
        } else {
            self.put_all(offset, &keys);
        }
    }

    /// Files the record at `offset` under each of its keys.
    fn put_all(&mut self, offset: u32, keys: &[u64]) {
        for &key in keys {
            let i = self.table.find_for_insert(key);
            let slot = self.table.slots[i];
            let entry = |v: u32| ((key & 0xffff_ffff) << 32) | u64::from(v);
            if slot == EMPTY {
                self.table.slots[i] = entry(offset);
                self.table.len += 1;
            } else if slot as u32 & MANY == 0 {
                let g = slot as u32;
                if g != offset {
                    let set = u32::try_from(self.shared.len())
                        .ok()
                        .filter(|&s| s < MANY - 1)
                        .expect("fewer than 2^31 shared slots");
                    self.shared.push(vec![g, offset]);
                    self.table.slots[i] = entry(MANY | set);
                }
            } else {
                let v = &mut self.shared[(slot as u32 & !MANY) as usize];
                if !v.contains(&offset) {
                    v.push(offset);
                }
            }
        }
    }

    /// A table twice as large (or more, for `more` new keys), refilled from
    /// the arena, every record included (the last one too).
    fn grow(&mut self, t: Threshold, more: usize) {
        let mut bits = self.table.bits + 1;
        while (self.table.len + more) * 4 > (1usize << bits) * 3 {
            bits += 1;
        }
        self.table = SubsetTable {
            slots: vec![EMPTY; 1 << bits],
            bits,
            len: 0,
        };
        self.shared.clear();
        let arena = std::mem::take(&mut self.arena);
        let (mut buf, mut keys) = (Vec::new(), Vec::new());
        let mut at = 0;
        while at < arena.len() {
            let len = arena[at] as usize;
            keys_of(
                &arena[at + HEADER..at + HEADER + len],
                t.get(),
                &mut buf,
                &mut keys,
            );
            self.put_all(at as u32, &keys);
            at += HEADER + len;
        }
        self.arena = arena;
    }

    /// Candidates are the groups hit by at least one of the user's
    /// t-subsets; their exact overlap decides, as in the reference. Returns
    /// the winner's ordinal. `scratch` is reused across calls, so a decision
    /// allocates nothing.
    fn best(&self, t: Threshold, attrs: &AttributeSet, scratch: &mut Scratch) -> Option<u32> {
        let Scratch {
            ids,
            buf,
            keys,
            firsts,
            candidates,
            qualified,
        } = scratch;
        // Attributes never seen cannot be in any group: only known ones count.
        ids.clear();
        ids.extend(
            attrs
                .iter()
                .filter_map(|a| self.interned.get(a.as_str()).copied()),
        );
        if ids.len() < t.get() {
            return None;
        }
        ids.sort_unstable();
        keys_of(ids, t.get(), buf, keys);
        // Every home slot first, with nothing between the reads: the misses
        // overlap instead of queueing (see the module's doc).
        firsts.clear();
        firsts.extend(keys.iter().map(|&k| self.table.slots[self.table.home(k)]));
        candidates.clear();
        for (&k, &first) in keys.iter().zip(firsts.iter()) {
            self.table.get(k, first, |v| {
                if v & MANY == 0 {
                    candidates.push(v);
                } else {
                    candidates.extend_from_slice(&self.shared[(v & !MANY) as usize]);
                }
            });
        }
        candidates.sort_unstable();
        candidates.dedup();
        // The records' first words in one pass as well (`firsts` reused).
        firsts.clear();
        firsts.extend(
            candidates
                .iter()
                .map(|&o| u64::from(self.arena[o as usize])),
        );
        qualified.clear();
        for (&o, &len) in candidates.iter().zip(firsts.iter()) {
            let o = o as usize;
            let m = sorted_overlap(&self.arena[o + HEADER..o + HEADER + len as usize], ids);
            let id = GroupId(i64::from(self.arena[o + 2]) | (i64::from(self.arena[o + 3]) << 32));
            qualified.push((id, m, self.arena[o + 1]));
        }
        let (id, _) = choose_best(qualified.iter().map(|&(id, m, _)| (id, m)), t)?;
        qualified
            .iter()
            .find(|&&(g, _, _)| g == id)
            .map(|&(_, _, ordinal)| ordinal)
    }
}

/// Buffers a decision reuses (under the index's mutex).
#[derive(Debug, Default)]
struct Scratch {
    ids: Vec<u32>,
    buf: Vec<u32>,
    keys: Vec<u64>,
    firsts: Vec<u64>,
    candidates: Vec<u32>,
    /// (id, overlap, ordinal) of each candidate, for `choose_best`.
    qualified: Vec<(GroupId, usize, u32)>,
}

#[async_trait]
impl GroupIndex for MemoryIndex {
    async fn best(&self, attrs: &AttributeSet) -> Result<Option<Candidate>, IndexError> {
        Ok(self.best_now(attrs))
    }

    async fn add(&self, groups: &[(GroupId, AttributeSet)]) -> Result<(), IndexError> {
        for (id, attrs) in groups {
            self.add_now(*id, attrs.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AttributeRules;
    use crate::domain::grouping::LinearScan;
    use proptest::prelude::*;

    fn assign(ix: &MemoryIndex, next: &mut i64, attrs: &AttributeSet) -> (GroupId, bool) {
        match ix.best_now(attrs) {
            Some(c) => (c.id, false),
            None => {
                let id = GroupId(*next);
                *next += 1;
                ix.add_now(id, attrs.clone());
                (id, true)
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The index and the linear scan agree on every signup of a random
        /// sequence, thresholds 1 to 5, tiny to large vocabularies.
        #[test]
        fn agrees_with_linear_scan(
            t in 1usize..=5,
            vocab in prop_oneof![Just(6usize), Just(12), Just(40), Just(400)],
            users in proptest::collection::vec(proptest::collection::vec(0usize..400, 1..=16), 1..150),
        ) {
            let threshold = Threshold::new(t, 16).unwrap();
            let rules = AttributeRules { min: t, max: 16 };
            let ix = MemoryIndex::new(threshold);
            let mut reference = LinearScan::new(threshold);
            let mut next = 1;
            for u in users {
                let raw: Vec<String> = u.iter().map(|x| format!("a{}", x % vocab)).collect();
                let Ok(attrs) = AttributeSet::parse(&raw, rules) else { continue };
                let want = reference.assign(&attrs);
                let got = assign(&ix, &mut next, &attrs);
                prop_assert_eq!((want.group_id, want.created), got);
            }
        }
    }

    proptest! {
        /// Keys that share a tag (the low 32 bits the slots keep) and crowd
        /// the same probe runs: a lookup still finds every group filed under
        /// its key (and may find more, which the overlap check discards).
        #[test]
        fn lookups_find_every_owner_despite_shared_tags(
            entries in proptest::collection::vec((0u64..8, 0u64..4, 0u64..3, 0u32..50), 1..600),
        ) {
            let mut inner = Inner::for_entries(0);
            let mut owners: HashMap<u64, Vec<u32>> = HashMap::new();
            for &(home, other, tag, group) in &entries {
                // A 2^10-slot table: the home is the top 10 bits, the tag
                // the low 32; keys that differ only in between share both.
                let key = (home << 54) | (other << 40) | tag;
                if inner.table.fits(1) {
                    inner.put_all(group * 8, &[key]);
                    owners.entry(key).or_default().push(group * 8);
                }
            }
            for (key, want) in owners {
                let mut got = Vec::new();
                let first = inner.table.slots[inner.table.home(key)];
                inner.table.get(key, first, |v| {
                    if v & MANY == 0 {
                        got.push(v);
                    } else {
                        got.extend_from_slice(&inner.shared[(v & !MANY) as usize]);
                    }
                });
                for g in want {
                    prop_assert!(got.contains(&g), "key {key:#x}: {g} missing from {got:?}");
                }
            }
        }
    }

    /// Growing rebuilds the table from the records: every group is still
    /// found after many doublings.
    #[test]
    fn every_group_is_found_after_the_table_grows() {
        let t = Threshold::new(3, 16).unwrap();
        let rules = AttributeRules { min: 3, max: 16 };
        let ix = MemoryIndex::new(t);
        let groups: Vec<AttributeSet> = (0..5_000)
            .map(|g| {
                let raw: Vec<String> = (0..6).map(|j| format!("g{g}-{j}")).collect();
                AttributeSet::parse(&raw, rules).unwrap()
            })
            .collect();
        for (i, g) in groups.iter().enumerate() {
            ix.add_now(GroupId(i as i64 + 1), g.clone());
            // Room made ahead, mid-way, as the import does.
            if i == 1_000 {
                ix.reserve(10_000);
            }
        }
        assert_eq!(ix.len(), groups.len());
        for (i, g) in groups.iter().enumerate() {
            let id = GroupId(i as i64 + 1);
            assert_eq!(ix.best_now(g).map(|c| c.id), Some(id));
            assert_eq!(ix.attributes_of(id).as_ref(), Some(g));
            assert!(ix.contains(id));
        }
        assert_eq!(ix.attributes_of(GroupId(0)), None);
        assert!(!ix.contains(GroupId(0)));
        assert_eq!(ix.attributes_of(GroupId(groups.len() as i64 + 1)), None);
    }

    /// The embedded import's decision: the best group, or a founding under
    /// the given id, exactly as the reference decides one signup after
    /// another.
    #[test]
    fn join_or_found_decides_as_the_reference() {
        let t = Threshold::new(3, 16).unwrap();
        let rules = AttributeRules { min: 3, max: 16 };
        let vocab = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let ix = MemoryIndex::new(t);
        let mut reference = crate::domain::grouping::LinearScan::new(t);
        let mut next = 1;
        for n in 0..2_000u64 {
            let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut raw = Vec::new();
            while raw.len() < 3 + (n % 3) as usize {
                let v = vocab[(x % 8) as usize];
                if !raw.contains(&v) {
                    raw.push(v);
                }
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            let u = AttributeSet::parse(&raw, rules).unwrap();
            let want = reference.assign(&u);
            let got = match ix.join_or_found(&u, GroupId(next)) {
                Some(g) => g,
                None => {
                    next += 1;
                    GroupId(next - 1)
                }
            };
            assert_eq!(got, want.group_id, "signup {n}");
        }
    }

    #[test]
    fn overlapping_groups_loaded_from_storage_are_both_found() {
        let t = Threshold::new(2, 16).unwrap();
        let rules = AttributeRules { min: 2, max: 16 };
        let ix = MemoryIndex::new(t);
        // Two stored groups sharing a 2-subset: impossible under the rule,
        // possible after a threshold change. The slot keeps both.
        ix.insert(
            GroupId(7),
            AttributeSet::parse(&["a", "b", "c"], rules).unwrap(),
        );
        ix.insert(
            GroupId(3),
            AttributeSet::parse(&["a", "b", "d"], rules).unwrap(),
        );
        let user = AttributeSet::parse(&["a", "b", "d", "e"], rules).unwrap();
        assert_eq!(ix.best_now(&user).map(|c| c.id), Some(GroupId(3)));
    }
}

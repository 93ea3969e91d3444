//! Deciding a batch in file order: each line against the groups committed
//! before the batch and the groups founded by the lines before it in the
//! batch, exactly as one signup after another would be decided.

use rustc_hash::FxHashMap;

use crate::domain::grouping::SubsetKey;
use crate::domain::{AttributeSet, GroupId, Threshold};
use crate::index::Candidate;
use crate::index::memory::MemoryIndex;
use crate::store::best_of;
use crate::store::import::{ImportPlacement, Owner};

/// The best committed group for a set of attributes.
pub trait Committed {
    fn best(&self, attrs: &AttributeSet, keys: &[SubsetKey]) -> Option<Candidate>;
}

/// The whole committed population, in process: the reference the batch
/// tests decide against (the embedded import decides in the index itself,
/// `MemoryIndex::join_or_found`).
impl Committed for MemoryIndex {
    fn best(&self, attrs: &AttributeSet, _keys: &[SubsetKey]) -> Option<Candidate> {
        self.best_now(attrs)
    }
}

/// The committed owners of a batch's t-subsets, read in its transaction
/// (distributed mode): every group the batch's users could join.
pub struct OwnersOf {
    t: Threshold,
    by_key: FxHashMap<SubsetKey, Vec<usize>>,
    groups: Vec<(GroupId, AttributeSet)>,
}

impl OwnersOf {
    pub fn new(t: Threshold, owners: Vec<Owner>) -> Self {
        let mut by_key: FxHashMap<SubsetKey, Vec<usize>> = FxHashMap::default();
        let mut dense: FxHashMap<GroupId, usize> = FxHashMap::default();
        let mut groups = Vec::new();
        for (key, id, attrs) in owners {
            let i = *dense.entry(id).or_insert_with(|| {
                groups.push((id, attrs));
                groups.len() - 1
            });
            let v = by_key.entry(key).or_default();
            if !v.contains(&i) {
                v.push(i);
            }
        }
        Self { t, by_key, groups }
    }

    /// The groups the lookup returned, for the index repair after commit.
    pub fn group(&self, id: GroupId) -> Option<&AttributeSet> {
        self.groups.iter().find(|(g, _)| *g == id).map(|(_, a)| a)
    }
}

impl Committed for OwnersOf {
    fn best(&self, attrs: &AttributeSet, keys: &[SubsetKey]) -> Option<Candidate> {
        let mut seen: Vec<usize> = Vec::new();
        for k in keys {
            if let Some(v) = self.by_key.get(k) {
                for &i in v {
                    if !seen.contains(&i) {
                        seen.push(i);
                    }
                }
            }
        }
        best_of(
            seen.into_iter().map(|i| self.groups[i].clone()).collect(),
            attrs,
            self.t,
        )
    }
}

/// Provisional ids of the batch's own groups: above every committed id, in
/// founding order, as the ids they will get are (a sequence, taken while no
/// other process can found).
const PROVISIONAL: i64 = i64::MAX / 2;

/// Places `users` (attributes and their t-subset keys) in order.
pub fn decide<'a>(
    t: Threshold,
    committed: &dyn Committed,
    users: impl IntoIterator<Item = (&'a AttributeSet, &'a [SubsetKey])>,
) -> Vec<ImportPlacement> {
    let users = users.into_iter();
    // Sized for the batch at once, rather than doubling through it.
    let own = MemoryIndex::with_capacity(t, users.size_hint().0);
    let mut founded = 0usize;
    let mut out = Vec::new();
    for (attrs, keys) in users {
        let old = committed.best(attrs, keys);
        let new = own.best_now(attrs);
        // The larger overlap; on a tie the smaller id, which is the
        // committed group (every batch id is above every committed one).
        let placement = match (old, new) {
            (Some(o), Some(n)) if n.attributes.overlap(attrs) > o.attributes.overlap(attrs) => {
                ImportPlacement::JoinFounded((n.id.0 - PROVISIONAL) as usize)
            }
            (Some(o), _) => ImportPlacement::Join(o.id),
            (None, Some(n)) => ImportPlacement::JoinFounded((n.id.0 - PROVISIONAL) as usize),
            (None, None) => {
                own.add_now(GroupId(PROVISIONAL + founded as i64), attrs.clone());
                founded += 1;
                ImportPlacement::Found
            }
        };
        out.push(placement);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AttributeRules;
    use crate::domain::grouping::{LinearScan, subset_keys};

    fn set(a: &[&str]) -> AttributeSet {
        AttributeSet::parse(a, AttributeRules { min: 1, max: 16 }).unwrap()
    }

    /// Batches of every size decide as one signup after another does.
    #[test]
    fn batches_decide_as_one_at_a_time() {
        let t = Threshold::new(3, 16).unwrap();
        let vocab = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let users: Vec<AttributeSet> = (0..400u64)
            .map(|n| {
                let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let k = 3 + (n % 3) as usize;
                let mut a = Vec::new();
                while a.len() < k {
                    let v = vocab[(x % 10) as usize];
                    if !a.contains(&v) {
                        a.push(v);
                    }
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                }
                set(&a)
            })
            .collect();
        let mut reference = LinearScan::new(t);
        let expected: Vec<GroupId> = users.iter().map(|u| reference.assign(u).group_id).collect();
        for batch in [1, 2, 7, 50, 400] {
            let index = MemoryIndex::new(t);
            let mut next = 1;
            let mut got = Vec::new();
            for chunk in users.chunks(batch) {
                let keys: Vec<Vec<SubsetKey>> = chunk.iter().map(|u| subset_keys(u, t)).collect();
                let placed = decide(t, &index, chunk.iter().zip(keys.iter().map(|k| &k[..])));
                let mut founded = Vec::new();
                for (u, p) in chunk.iter().zip(&placed) {
                    if *p == ImportPlacement::Found {
                        founded.push(GroupId(next));
                        next += 1;
                        index.add_now(*founded.last().unwrap(), u.clone());
                    }
                }
                let mut n = 0;
                for p in placed {
                    got.push(match p {
                        ImportPlacement::Join(g) => g,
                        ImportPlacement::JoinFounded(i) => founded[i],
                        ImportPlacement::Found => {
                            n += 1;
                            founded[n - 1]
                        }
                    });
                }
            }
            assert_eq!(got, expected, "batch size {batch}");
        }
    }
}

//! The grouping rule of the contract, as pure functions.
//!
//! A signup joins the existing group sharing the most attributes with it, if
//! that is at least the threshold `t`; ties go to the smallest group id. With
//! no such group it founds one whose attributes are its own, fixed for ever.
//!
//! [`LinearScan`] is the rule read literally: it intersects the newcomer with
//! every group. It is the reference every index is tested against, never the
//! production path (it is O(groups)).
//!
//! The indexes rely on one consequence of the rule: a group is founded only
//! when no group shares `t` attributes with its founder, so every `t`-subset
//! of attributes lies in at most one group, and looking up the newcomer's
//! `C(k, t)` subsets finds every group it could join.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::AttributeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(pub i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub i64);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Largest number of t-subsets one signup may look up. It bounds the work of
/// one assignment (and the size of one Redis script call) whatever the
/// configuration: C(16, 3) = 560, C(16, 5) = 4,368, C(16, 8) = 12,870.
pub const MAX_SUBSETS_PER_SIGNUP: u64 = 20_000;

/// The minimum number of shared attributes to join a group (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Threshold(usize);

impl Threshold {
    /// `max_attributes` is checked with it: together they bound C(k, t).
    pub fn new(t: usize, max_attributes: usize) -> Result<Self, String> {
        if t == 0 {
            return Err("the match threshold must be at least 1".into());
        }
        if max_attributes < t {
            return Err(format!(
                "COHORT_MAX_ATTRIBUTES ({max_attributes}) must be at least COHORT_MATCH_THRESHOLD ({t})"
            ));
        }
        if max_attributes > 64 {
            return Err("COHORT_MAX_ATTRIBUTES must be at most 64".into());
        }
        let worst = binomial(max_attributes, t);
        if worst > MAX_SUBSETS_PER_SIGNUP {
            return Err(format!(
                "COHORT_MAX_ATTRIBUTES={max_attributes} with COHORT_MATCH_THRESHOLD={t} gives up to {worst} \
                 index lookups per signup (C(k, t)); at most {MAX_SUBSETS_PER_SIGNUP} are allowed"
            ));
        }
        Ok(Self(t))
    }

    pub fn get(self) -> usize {
        self.0
    }
}

/// C(n, k), saturating.
pub fn binomial(n: usize, k: usize) -> u64 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut r: u64 = 1;
    for i in 0..k {
        r = r.saturating_mul((n - i) as u64) / (i as u64 + 1);
    }
    r
}

/// Calls `f` with the indices of every `t`-subset of `0..n`, in lexicographic
/// order. Iterative, so `t` up to `n` costs no recursion.
pub fn for_each_subset(n: usize, t: usize, mut f: impl FnMut(&[usize])) {
    if t == 0 || t > n {
        return;
    }
    let mut idx: Vec<usize> = (0..t).collect();
    loop {
        f(&idx);
        // Find the rightmost index that can still move right.
        let mut i = t;
        while i > 0 && idx[i - 1] == n - t + (i - 1) {
            i -= 1;
        }
        if i == 0 {
            return;
        }
        idx[i - 1] += 1;
        for j in i..t {
            idx[j] = idx[j - 1] + 1;
        }
    }
}

/// Calls `f` with the SHA-256 digest of each `t`-subset of `attrs` (its
/// canonical attributes, sorted, joined by U+001F). Both shared indexes key
/// subsets by it: Postgres by its first 16 bytes, the arbiter of "no two
/// groups share a t-subset"; Redis by 12 bytes, with 4 more choosing a bucket.
/// 128 bits make a collision among 10^10 subsets about 10^-19 likely; a
/// collision could only add a candidate (overlaps are always computed
/// exactly) or refuse a founding, never place anyone wrongly.
pub fn for_each_subset_digest(attrs: &AttributeSet, t: Threshold, mut f: impl FnMut(&[u8; 32])) {
    use sha2::{Digest, Sha256};
    let items = attrs.as_slice();
    let mut buf = String::new();
    for_each_subset(items.len(), t.get(), |s| {
        buf.clear();
        for (n, &i) in s.iter().enumerate() {
            if n > 0 {
                buf.push('\x1f');
            }
            buf.push_str(items[i].as_str());
        }
        let d: [u8; 32] = Sha256::digest(buf.as_bytes()).into();
        f(&d);
    });
}

/// A t-subset's key as the stores keep it: the first 16 bytes of its digest.
pub type SubsetKey = [u8; 16];

/// The first 16 bytes of each t-subset's digest: the key the stores keep.
/// Fixed arrays, so all of a user's keys are one allocation (the import
/// holds millions of them at once).
pub fn subset_keys(attrs: &AttributeSet, t: Threshold) -> Vec<SubsetKey> {
    let mut out = Vec::with_capacity(binomial(attrs.len(), t.get()) as usize);
    for_each_subset_digest(attrs, t, |d| {
        out.push(d[..16].try_into().expect("a digest has 32 bytes"))
    });
    out
}

/// Picks the group to join among candidates given as (id, exact overlap):
/// the largest overlap of at least `t`, the smallest id on a tie.
pub fn choose_best(
    candidates: impl IntoIterator<Item = (GroupId, usize)>,
    t: Threshold,
) -> Option<(GroupId, usize)> {
    candidates
        .into_iter()
        .filter(|&(_, m)| m >= t.get())
        .min_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)))
}

/// What an assignment decided for one signup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub group_id: GroupId,
    pub group_attributes: AttributeSet,
    /// True when this signup founded the group.
    pub created: bool,
}

/// The reference implementation: the rule applied by scanning every group.
#[derive(Debug, Clone)]
pub struct LinearScan {
    t: Threshold,
    groups: Vec<(GroupId, AttributeSet)>,
    next_id: i64,
}

impl LinearScan {
    pub fn new(t: Threshold) -> Self {
        Self {
            t,
            groups: Vec::new(),
            next_id: 1,
        }
    }

    /// Adds an existing group (for example loaded from storage).
    pub fn insert(&mut self, id: GroupId, attrs: AttributeSet) {
        self.next_id = self.next_id.max(id.0 + 1);
        self.groups.push((id, attrs));
    }

    /// Best existing group for `user`, if any shares at least `t`.
    pub fn best(&self, user: &AttributeSet) -> Option<(GroupId, usize)> {
        choose_best(
            self.groups.iter().map(|(id, g)| (*id, g.overlap(user))),
            self.t,
        )
    }

    /// Joins the best group or founds one with the next id.
    pub fn assign(&mut self, user: &AttributeSet) -> Placement {
        match self.best(user) {
            Some((id, _)) => {
                let attrs = self
                    .groups
                    .iter()
                    .find(|(g, _)| *g == id)
                    .map(|(_, a)| a.clone());
                Placement {
                    group_id: id,
                    group_attributes: attrs.expect("best() returned a known group"),
                    created: false,
                }
            }
            None => {
                let id = GroupId(self.next_id);
                self.insert(id, user.clone());
                Placement {
                    group_id: id,
                    group_attributes: user.clone(),
                    created: true,
                }
            }
        }
    }

    pub fn groups(&self) -> &[(GroupId, AttributeSet)] {
        &self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AttributeRules, AttributeSet};

    fn set(a: &[&str]) -> AttributeSet {
        AttributeSet::parse(a, AttributeRules { min: 1, max: 16 }).unwrap()
    }

    fn t3() -> Threshold {
        Threshold::new(3, 16).unwrap()
    }

    #[test]
    fn subsets_are_all_combinations() {
        let mut seen = Vec::new();
        for_each_subset(5, 3, |s| seen.push(s.to_vec()));
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[0], vec![0, 1, 2]);
        assert_eq!(seen[9], vec![2, 3, 4]);
        let mut n = 0;
        for_each_subset(16, 5, |_| n += 1);
        assert_eq!(n as u64, binomial(16, 5));
        for_each_subset(2, 3, |_| panic!("no 3-subsets of 2 elements"));
    }

    #[test]
    fn threshold_bounds_the_lookups() {
        assert!(Threshold::new(0, 16).is_err());
        assert!(Threshold::new(5, 4).is_err());
        assert!(Threshold::new(8, 16).is_ok());
        assert!(Threshold::new(10, 32).is_err());
    }

    #[test]
    fn seed_scenarios() {
        let mut r = LinearScan::new(t3());
        let u1 = r.assign(&set(&[
            "Software", "Engineer", "Brussels", "Belgium", "Senior",
        ]));
        assert!(u1.created);
        let u2 = r.assign(&set(&["Software", "Engineer", "Gamer", "Senior"]));
        assert_eq!(u2.group_id, u1.group_id);
        assert!(!u2.created);
        assert_eq!(
            u2.group_attributes
                .intersection(&set(&["software", "engineer", "gamer", "senior"]))
                .to_strings(),
            vec!["engineer", "senior", "software"]
        );
        // Nothing shared: a new group.
        let u3 = r.assign(&set(&["a", "b", "c"]));
        assert!(u3.created);
        // Most shared wins; tie goes to the older (smaller id).
        let g4 = r.assign(&set(&["x", "y", "z", "w"]));
        let best = r.assign(&set(&["x", "y", "z", "w", "a", "b"]));
        assert_eq!(best.group_id, g4.group_id);
        let tie = r.assign(&set(&["a", "b", "c", "x", "y", "z"]));
        assert_eq!(tie.group_id, u3.group_id);
    }

    #[test]
    fn choose_best_prefers_overlap_then_smaller_id() {
        let t = t3();
        assert_eq!(
            choose_best([(GroupId(5), 4), (GroupId(2), 4), (GroupId(1), 3)], t),
            Some((GroupId(2), 4))
        );
        assert_eq!(choose_best([(GroupId(1), 2)], t), None);
    }
}

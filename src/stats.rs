//! `cohort stats` and the group-size metrics: the distribution of group
//! sizes, read cheaply from the member counters the stores keep
//! (`group_member_counts` in Postgres, `groups.member_count` in SQLite) as
//! (size, groups of that size) pairs. There are few distinct sizes (at most
//! about the square root of twice the users), so the exact distribution
//! travels in a few rows, and percentiles and buckets are computed here.

use serde::Serialize;

/// Group sizes: (members, groups with that many), ascending by members,
/// groups with no member (every one deleted its account) included as 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SizeDistribution {
    pub by_size: Vec<(u64, u64)>,
}

/// The bucket bounds of the histogram: 1, 2, 4, ... up to 2^20 (a million
/// members), then +Inf.
pub const BUCKET_BOUNDS: [u64; 21] = {
    let mut b = [0u64; 21];
    let mut i = 0;
    while i < 21 {
        b[i] = 1 << i;
        i += 1;
    }
    b
};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Bucket {
    /// Groups of at most `le` members (cumulative), `None` for +Inf.
    pub le: Option<u64>,
    /// Groups in this bucket alone: more than the previous bound, at most
    /// `le` members.
    pub groups: u64,
    pub cumulative: u64,
}

impl SizeDistribution {
    /// From (size, count) rows in any order, merging repeated sizes.
    pub fn from_rows(rows: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut m = std::collections::BTreeMap::new();
        for (size, n) in rows {
            if n > 0 {
                *m.entry(size).or_insert(0u64) += n;
            }
        }
        Self {
            by_size: m.into_iter().collect(),
        }
    }

    pub fn groups(&self) -> u64 {
        self.by_size.iter().map(|(_, n)| n).sum()
    }

    pub fn members(&self) -> u64 {
        self.by_size.iter().map(|(s, n)| s * n).sum()
    }

    pub fn with_size(&self, size: u64) -> u64 {
        self.by_size
            .iter()
            .find(|(s, _)| *s == size)
            .map_or(0, |(_, n)| *n)
    }

    pub fn max(&self) -> u64 {
        self.by_size.last().map_or(0, |(s, _)| *s)
    }

    /// The nearest-rank percentile: the smallest size with at least `p` of
    /// the groups at or below it (0 when there is no group).
    pub fn percentile(&self, p: f64) -> u64 {
        let total = self.groups();
        if total == 0 {
            return 0;
        }
        let rank = ((p * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (s, n) in &self.by_size {
            seen += n;
            if seen >= rank {
                return *s;
            }
        }
        self.max()
    }

    /// Power-of-two buckets up to the first that holds the largest group
    /// (all of [`BUCKET_BOUNDS`] with `full`), then +Inf.
    pub fn buckets(&self, full: bool) -> Vec<Bucket> {
        let max = self.max();
        let mut out = Vec::new();
        let mut cumulative = 0;
        let mut prev = 0;
        for &le in &BUCKET_BOUNDS {
            let groups: u64 = self
                .by_size
                .iter()
                .filter(|(s, _)| *s <= le && (*s > prev || (prev == 0 && *s == 0)))
                .map(|(_, n)| n)
                .sum();
            cumulative += groups;
            out.push(Bucket {
                le: Some(le),
                groups,
                cumulative,
            });
            prev = le;
            if !full && le >= max {
                break;
            }
        }
        let total = self.groups();
        out.push(Bucket {
            le: None,
            groups: total - cumulative,
            cumulative: total,
        });
        out
    }
}

/// What `cohort stats` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub mode: &'static str,
    pub users: u64,
    pub groups: u64,
    /// Groups of exactly one member.
    pub singleton_groups: u64,
    /// Groups whose every member deleted their account.
    pub empty_groups: u64,
    pub group_size: SizeSummary,
    /// Power-of-two buckets of group sizes.
    pub histogram: Vec<Bucket>,
    /// The attributes most users gave, most first (ties by name).
    pub top_attributes: Vec<AttributeCount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeSummary {
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttributeCount {
    pub attribute: String,
    pub users: u64,
}

impl Stats {
    pub fn new(
        mode: &'static str,
        users: u64,
        sizes: &SizeDistribution,
        top_attributes: Vec<AttributeCount>,
    ) -> Self {
        let groups = sizes.groups();
        Self {
            mode,
            users,
            groups,
            singleton_groups: sizes.with_size(1),
            empty_groups: sizes.with_size(0),
            group_size: SizeSummary {
                mean: if groups == 0 {
                    0.0
                } else {
                    sizes.members() as f64 / groups as f64
                },
                p50: sizes.percentile(0.50),
                p90: sizes.percentile(0.90),
                p99: sizes.percentile(0.99),
                max: sizes.max(),
            },
            histogram: sizes.buckets(false),
            top_attributes,
        }
    }

    /// The human-readable report.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "mode              {}", self.mode);
        let _ = writeln!(s, "users             {}", self.users);
        let _ = writeln!(s, "groups            {}", self.groups);
        let _ = writeln!(s, "singleton groups  {}", self.singleton_groups);
        if self.empty_groups > 0 {
            let _ = writeln!(s, "empty groups      {}", self.empty_groups);
        }
        let g = &self.group_size;
        let _ = writeln!(
            s,
            "group size        mean {:.2}  p50 {}  p90 {}  p99 {}  max {}",
            g.mean, g.p50, g.p90, g.p99, g.max
        );
        let _ = writeln!(s, "\ngroup size      groups  cumulative");
        let mut prev = 0;
        let widest = self.histogram.iter().map(|b| b.groups).max().unwrap_or(0);
        for b in &self.histogram {
            let range = match b.le {
                Some(le) if le <= 1 => format!("{le}"),
                Some(le) if le == prev + 1 => format!("{le}"),
                Some(le) => format!("{}-{le}", prev + 1),
                None => format!("> {prev}"),
            };
            if b.le.is_none() && b.groups == 0 {
                break;
            }
            let bar = if widest == 0 {
                0
            } else {
                ((b.groups as f64 / widest as f64) * 30.0).ceil() as usize
            };
            let pct = if self.groups == 0 {
                0.0
            } else {
                100.0 * b.cumulative as f64 / self.groups as f64
            };
            let _ = writeln!(
                s,
                "{range:<12} {:>9}  {pct:>9.2}%  {}",
                b.groups,
                "#".repeat(bar)
            );
            prev = b.le.unwrap_or(prev);
        }
        let _ = writeln!(s, "\ncommonest attributes        users  share");
        for (i, a) in self.top_attributes.iter().enumerate() {
            let pct = if self.users == 0 {
                0.0
            } else {
                100.0 * a.users as f64 / self.users as f64
            };
            let _ = writeln!(
                s,
                "{:>3}. {:<20} {:>9}  {pct:>5.1}%",
                i + 1,
                a.attribute,
                a.users
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_buckets() {
        // 6 singletons, 3 pairs, one of 5, one of 40.
        let d = SizeDistribution::from_rows([(1, 4), (2, 3), (1, 2), (5, 1), (40, 1)]);
        assert_eq!(d.groups(), 11);
        assert_eq!(d.members(), 6 + 6 + 5 + 40);
        assert_eq!(d.percentile(0.5), 1);
        assert_eq!(d.percentile(0.6), 2);
        assert_eq!(d.percentile(0.9), 5);
        assert_eq!(d.percentile(0.99), 40);
        assert_eq!(d.max(), 40);
        let b = d.buckets(false);
        let le: Vec<_> = b.iter().map(|b| (b.le, b.groups, b.cumulative)).collect();
        assert_eq!(
            le,
            vec![
                (Some(1), 6, 6),
                (Some(2), 3, 9),
                (Some(4), 0, 9),
                (Some(8), 1, 10),
                (Some(16), 0, 10),
                (Some(32), 0, 10),
                (Some(64), 1, 11),
                (None, 0, 11),
            ]
        );
        assert_eq!(d.buckets(true).len(), BUCKET_BOUNDS.len() + 1);
    }

    #[test]
    fn empty_groups_fall_in_the_first_bucket() {
        let d = SizeDistribution::from_rows([(0, 2), (1, 1)]);
        let b = d.buckets(false);
        assert_eq!((b[0].le, b[0].groups), (Some(1), 3));
        let none = SizeDistribution::default();
        assert_eq!(none.percentile(0.5), 0);
        assert_eq!(none.buckets(false).last().unwrap().cumulative, 0);
    }
}

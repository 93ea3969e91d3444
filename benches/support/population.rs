//! The synthetic population the benchmarks use.
//!
//! A user has one value from each of five categories and two hobbies, so
//! 6 or 7 attributes (two equal hobbies merge), about what a profile form
//! collects:
//!
//! | category  | distinct values | draws |
//! |-----------|-----------------|-------|
//! | field     | 5,000           | 1     |
//! | role      | 2,000           | 1     |
//! | city      | 100,000         | 1     |
//! | country   | 250             | 1     |
//! | seniority | 8               | 1     |
//! | hobby     | 100,000         | 2     |
//!
//! Every category is Zipf-distributed with exponent 0.6 (the k-th most
//! common value is k^0.6 times rarer than the first), as names, places and
//! interests are in real populations: a few values are everywhere, most are
//! rare. Values are `<category>-<rank>`, so categories never collide. The
//! generator is seeded, so every run and every implementation sees the same
//! users. With the threshold at 3 a population saturates as its common
//! triples are taken (every newcomer with one joins), so the categories are
//! wide enough for 10^6 groups; the benchmark prints how many signups each
//! size took. (Exponent 1 with categories of 300/200/20,000/150/6/5,000
//! stalled near 10^5 groups; exponent 0.7 with 1,000/1,000/50,000/200/6/
//! 50,000 needed 20 million signups for 800,000 groups.)

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const EXPONENT: f64 = 0.6;

struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(EXPONENT);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// A 1-based rank.
    fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u) + 1
    }
}

pub struct Population {
    rng: StdRng,
    categories: Vec<(&'static str, Zipf)>,
    hobby: Zipf,
}

impl Population {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            categories: vec![
                ("field", Zipf::new(5_000)),
                ("role", Zipf::new(2_000)),
                ("city", Zipf::new(100_000)),
                ("country", Zipf::new(250)),
                ("seniority", Zipf::new(8)),
            ],
            hobby: Zipf::new(100_000),
        }
    }

    /// One user's raw attributes.
    pub fn user(&mut self) -> Vec<String> {
        let mut out: Vec<String> = self
            .categories
            .iter()
            .map(|(name, z)| format!("{name}-{}", z.sample(&mut self.rng)))
            .collect();
        for _ in 0..2 {
            let h = format!("hobby-{}", self.hobby.sample(&mut self.rng));
            if !out.contains(&h) {
                out.push(h);
            }
        }
        out
    }
}

//! The synthetic population the benchmarks use.
//!
//! A user has one value from each of five categories and one or two
//! hobbies, so 6 or 7 attributes, about what a profile form collects:
//!
//! | category  | distinct values | draws |
//! |-----------|-----------------|-------|
//! | field     | 300             | 1     |
//! | role      | 200             | 1     |
//! | city      | 20,000          | 1     |
//! | country   | 150             | 1     |
//! | seniority | 6               | 1     |
//! | hobby     | 5,000           | 1-2   |
//!
//! Every category is Zipf-distributed with exponent 1 (the k-th most common
//! value is k times rarer than the first), as names, places and interests
//! are in real populations: "software" is everywhere, most cities are rare.
//! Values are `<category>-<rank>`, so categories never collide. The
//! generator is seeded, so every run and every implementation sees the same
//! users. With the threshold at 3, about 2.3 million signups found the
//! first million groups.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for k in 1..=n {
            acc += 1.0 / k as f64;
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
                ("field", Zipf::new(300)),
                ("role", Zipf::new(200)),
                ("city", Zipf::new(20_000)),
                ("country", Zipf::new(150)),
                ("seniority", Zipf::new(6)),
            ],
            hobby: Zipf::new(5_000),
        }
    }

    /// One user's raw attributes.
    pub fn user(&mut self) -> Vec<String> {
        let mut out: Vec<String> = self
            .categories
            .iter()
            .map(|(name, z)| format!("{name}-{}", z.sample(&mut self.rng)))
            .collect();
        let hobbies = self.rng.random_range(1..=2);
        for _ in 0..hobbies {
            let h = format!("hobby-{}", self.hobby.sample(&mut self.rng));
            if !out.contains(&h) {
                out.push(h);
            }
        }
        out
    }
}

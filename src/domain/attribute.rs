//! Attributes and attribute sets, canonicalised exactly as the contract says:
//! NFKC, lower-cased, trimmed, inner white space folded to one space.

use std::fmt;

use unicode_normalization::UnicodeNormalization;

use super::FieldError;

/// Longest attribute, in characters, after canonicalisation.
pub const MAX_ATTRIBUTE_CHARS: usize = 64;
/// Raw bytes we are willing to normalise for one attribute. NFKC can expand
/// a code point up to 18 times (U+FDFA), so cap the input before the work,
/// not after it.
const MAX_RAW_ATTRIBUTE_BYTES: usize = 1024;

/// A canonical attribute: 1 to 64 characters, no control characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attribute(String);

impl Attribute {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.len() > MAX_RAW_ATTRIBUTE_BYTES {
            return Err(format!("must be at most {MAX_ATTRIBUTE_CHARS} characters"));
        }
        let canonical = canonicalise(raw);
        let chars = canonical.chars().count();
        if chars == 0 {
            return Err("must not be empty".into());
        }
        if chars > MAX_ATTRIBUTE_CHARS {
            return Err(format!("must be at most {MAX_ATTRIBUTE_CHARS} characters"));
        }
        if canonical.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        if canonical.chars().any(is_format_char) {
            return Err(
                "must not contain invisible format characters (zero-width or bidirectional controls)"
                    .into(),
            );
        }
        Ok(Self(canonical))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Unicode general category Cf (format), as of Unicode 15: invisible
/// characters such as zero-width spaces and bidirectional overrides, which
/// would let two attributes that look the same differ (or one look like
/// another). Listed here, as the standard's table lists them, because the
/// crates already in the tree do not expose general categories.
fn is_format_char(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// NFKC, then lower case, then NFKC again (lower-casing can leave a string
/// that is no longer NFKC, and canonicalisation must be idempotent), then
/// white space trimmed and folded.
fn canonicalise(raw: &str) -> String {
    // ASCII is its own NFKC form: skip the Unicode tables (the common case,
    // and the whole of a reindex, which re-checks every stored attribute).
    if raw.is_ascii() {
        return fold_space(&raw.to_ascii_lowercase());
    }
    let lowered: String = raw.nfkc().collect::<String>().to_lowercase();
    let normalised: String = lowered.nfkc().collect();
    fold_space(&normalised)
}

/// Trims, and folds inner runs of white space to one space.
fn fold_space(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split(char::is_whitespace).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

impl fmt::Debug for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many attributes a user must and may give: `threshold..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeRules {
    pub min: usize,
    pub max: usize,
}

/// A sorted set of distinct canonical attributes.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct AttributeSet(Vec<Attribute>);

impl AttributeSet {
    /// Parses a user's attributes, reporting every invalid one by index.
    pub fn parse<S: AsRef<str>>(raw: &[S], rules: AttributeRules) -> Result<Self, Vec<FieldError>> {
        // Bound the work before normalising anything: duplicates may merge,
        // but no honest client sends four times the maximum.
        if raw.len() > rules.max.saturating_mul(4).max(64) {
            return Err(vec![FieldError::new(
                "attributes",
                format!("at most {} attributes are allowed", rules.max),
            )]);
        }
        let mut errors = Vec::new();
        let mut attrs = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            match Attribute::parse(r.as_ref()) {
                Ok(a) => attrs.push(a),
                Err(message) => errors.push(FieldError::new(format!("attributes[{i}]"), message)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let set = Self::from_attributes(attrs);
        if set.len() < rules.min || set.len() > rules.max {
            return Err(vec![FieldError::new(
                "attributes",
                format!(
                    "between {} and {} distinct attributes are required, got {}",
                    rules.min,
                    rules.max,
                    set.len()
                ),
            )]);
        }
        Ok(set)
    }

    /// Builds a set from already-canonical attributes (sorts and merges).
    pub fn from_attributes(mut attrs: Vec<Attribute>) -> Self {
        attrs.sort();
        attrs.dedup();
        Self(attrs)
    }

    /// A set read back from the system of record for display, trusted as
    /// stored: it was parsed and canonicalised on the way in, and stored
    /// sorted. Re-parsing every attribute of every member on every page cost
    /// more than the query. Paths that decide groupings use
    /// [`AttributeSet::from_stored`], which checks.
    pub fn trusted(stored: Vec<String>) -> Self {
        Self(stored.into_iter().map(Attribute).collect())
    }

    /// Rebuilds a set read back from storage, where it was stored canonical.
    /// Still checked: a corrupted row must not become a silently wrong set.
    pub fn from_stored<S: AsRef<str>>(stored: &[S]) -> Result<Self, String> {
        let mut attrs = Vec::with_capacity(stored.len());
        for s in stored {
            let a = Attribute::parse(s.as_ref())?;
            if a.as_str() != s.as_ref() {
                return Err(format!(
                    "stored attribute {:?} is not canonical",
                    s.as_ref()
                ));
            }
            attrs.push(a);
        }
        Ok(Self::from_attributes(attrs))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Attribute> {
        self.0.iter()
    }

    pub fn as_slice(&self) -> &[Attribute] {
        &self.0
    }

    pub fn contains(&self, a: &Attribute) -> bool {
        self.0.binary_search(a).is_ok()
    }

    /// Attributes present in both sets, sorted.
    pub fn intersection(&self, other: &AttributeSet) -> AttributeSet {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.0.len() && j < other.0.len() {
            match self.0[i].cmp(&other.0[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    out.push(self.0[i].clone());
                    i += 1;
                    j += 1;
                }
            }
        }
        AttributeSet(out)
    }

    pub fn overlap(&self, other: &AttributeSet) -> usize {
        sorted_overlap(&self.0, &other.0)
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|a| a.0.clone()).collect()
    }

    /// The strings themselves, without copying them.
    pub fn into_strings(self) -> Vec<String> {
        self.0.into_iter().map(|a| a.0).collect()
    }
}

/// Elements two sorted, duplicate-free slices share, in one merge pass.
pub fn sorted_overlap<T: Ord>(a: &[T], b: &[T]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

impl fmt::Debug for AttributeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RULES: AttributeRules = AttributeRules { min: 3, max: 16 };

    #[test]
    fn invisible_format_characters_are_refused() {
        for raw in [
            "soft\u{200B}ware",
            "\u{202E}erawtfos",
            "a\u{2066}b",
            "x\u{FEFF}",
        ] {
            assert!(Attribute::parse(raw).is_err(), "{raw:?} accepted");
        }
        assert!(Attribute::parse("café").is_ok());
    }

    #[test]
    fn canonical_form_folds_case_width_and_space() {
        let a = Attribute::parse("  Software\t\tENGINEER  ").unwrap();
        assert_eq!(a.as_str(), "software engineer");
        // Full-width letters are NFKC-equivalent to ASCII.
        assert_eq!(
            Attribute::parse("Ｂｒｕｓｓｅｌｓ").unwrap().as_str(),
            "brussels"
        );
    }

    #[test]
    fn rejects_empty_long_and_control() {
        assert!(Attribute::parse("   ").is_err());
        assert!(Attribute::parse(&"x".repeat(65)).is_err());
        assert!(Attribute::parse(&"x".repeat(64)).is_ok());
        assert!(Attribute::parse("a\u{0}b").is_err());
        // U+FDFA expands to 18 characters under NFKC: length is checked after.
        assert!(Attribute::parse(&"\u{FDFA}".repeat(4)).is_err());
        assert!(Attribute::parse(&"\u{FDFA}".repeat(3)).is_ok());
    }

    #[test]
    fn set_merges_duplicates_and_sorts() {
        let s = AttributeSet::parse(&["Senior", "senior ", "Gamer", "Engineer"], RULES).unwrap();
        assert_eq!(s.to_strings(), vec!["engineer", "gamer", "senior"]);
    }

    #[test]
    fn set_size_counts_after_merging() {
        let err = AttributeSet::parse(&["a", "A", "b"], RULES).unwrap_err();
        assert_eq!(err[0].field, "attributes");
        let err = AttributeSet::parse(&["a", "", "b"], RULES).unwrap_err();
        assert_eq!(err[0].field, "attributes[1]");
    }

    proptest! {
        #[test]
        fn canonicalisation_is_idempotent(s in "\\PC{0,40}") {
            if let Ok(a) = Attribute::parse(&s) {
                let again = Attribute::parse(a.as_str()).unwrap();
                prop_assert_eq!(a, again);
            }
        }

        #[test]
        fn overlap_matches_intersection(a in proptest::collection::vec("[a-f]", 3..8),
                                        b in proptest::collection::vec("[a-f]", 3..8)) {
            let rules = AttributeRules { min: 1, max: 16 };
            if let (Ok(x), Ok(y)) = (AttributeSet::parse(&a, rules), AttributeSet::parse(&b, rules)) {
                prop_assert_eq!(x.overlap(&y), x.intersection(&y).len());
            }
        }
    }
}

//! What `cohort import` needs of a store, beyond one signup at a time: the
//! usernames a batch would take, and a batch decided and committed in one
//! transaction while no other process can found a group (see
//! `crate::import` for the protocol and its failure analysis).

use std::collections::HashMap;

use async_trait::async_trait;

use super::StoreError;
use crate::domain::grouping::SubsetKey;
use crate::domain::{AttributeSet, GroupId, Username};

/// Where one imported user goes, as decided for its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportPlacement {
    /// A group committed before the batch.
    Join(GroupId),
    /// The group founded by the `n`-th founding of this batch.
    JoinFounded(usize),
    /// A new group with the user's attributes.
    Found,
}

/// One user of a batch: validated, hashed and placed.
#[derive(Debug, Clone)]
pub struct ImportUser {
    pub username: Username,
    pub password_hash: String,
    pub attributes: AttributeSet,
    /// A keyed hash of the line (see `crate::import::line`).
    pub fingerprint: Vec<u8>,
    /// The t-subset keys of `attributes` (`domain::grouping::subset_keys`).
    pub keys: Vec<SubsetKey>,
    pub placement: ImportPlacement,
}

/// What a store knows of a username an import wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// A user has it now.
    pub user: bool,
    /// The fingerprint of the import line that created it, if one did.
    pub record: Option<Vec<u8>>,
}

/// A batch's writes, committed.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// The ids of the groups the batch founded, in its order (ascending).
    pub founded: Vec<GroupId>,
}

/// A committed group owning one t-subset key.
pub type Owner = (SubsetKey, GroupId, AttributeSet);

/// One process importing into Postgres: holds what keeps other importers
/// and index syncs out for its whole life (the sync advisory lock on a
/// connection of its own). The embedded import needs none of the batch
/// protocol: it holds the data directory's lock and decides in process
/// (`store::sqlite::import`).
#[async_trait]
pub trait ImportSession: Send {
    /// The usernames of `names` that exist or were imported.
    async fn existing(&mut self, names: &[String])
    -> Result<HashMap<String, Existing>, StoreError>;
    /// Opens the batch's transaction: checks the deployment's threshold and
    /// keeps other processes' foundings out until commit or rollback.
    async fn begin(&mut self) -> Result<(), StoreError>;
    /// Committed groups owning any of `keys`, read in the transaction.
    async fn owners(&mut self, keys: &[&SubsetKey]) -> Result<Vec<Owner>, StoreError>;
    /// The committed groups not yet marked as in the index, except those
    /// `known` says the caller has, read in the transaction. While this
    /// session holds the sync lock only it marks groups, so every group
    /// committed since it took the lock is here until it marks it (see
    /// `crate::import`, deciding in memory).
    async fn unindexed(
        &mut self,
        known: &(dyn Fn(GroupId) -> bool + Sync),
    ) -> Result<Vec<(GroupId, AttributeSet)>, StoreError>;
    /// Writes the batch (groups and their subsets, users in order, import
    /// records). [`StoreError::Overlap`] if a subset is taken,
    /// [`StoreError::UsernameTaken`] if a username is: the transaction is
    /// then to be rolled back.
    async fn write(&mut self, users: &[ImportUser]) -> Result<Written, StoreError>;
    /// Marks the index dirty, last before the commit: from the commit on,
    /// no replica commits a join decided in Redis until the batch's groups
    /// are there and the mark lifted (`PgStore::lift_dirty_mark`). The mark.
    async fn mark_dirty(&mut self) -> Result<i64, StoreError>;
    async fn commit(&mut self) -> Result<(), StoreError>;
    async fn rollback(&mut self) -> Result<(), StoreError>;
    /// After the last batch: anything left to make every committed batch
    /// durable.
    async fn finish(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A batch's subset rows, (key, owner), sorted by key: inserted in key
/// order, consecutive rows land on the same B-tree page (one descent and
/// one dirty page for many rows, where random order dirties a page a row).
pub fn sorted_subsets<'a>(
    founders: impl Iterator<Item = (&'a ImportUser, i64)>,
) -> Vec<(&'a SubsetKey, i64)> {
    let mut rows: Vec<(&SubsetKey, i64)> = founders
        .flat_map(|(u, id)| u.keys.iter().map(move |k| (k, id)))
        .collect();
    // As big-endian integers, which order as the bytes do (the stores
    // compare keys bytewise), without a memcmp call per comparison.
    rows.sort_unstable_by_key(|&(k, _)| u128::from_be_bytes(*k));
    rows
}

//! The data model of shared/DESIGN.md §2, as plain domain types shared by the store, the index,
//! the matcher and the API layer.
//!
//! Ids are newtypes over the store's integer keys so that no raw `i64` crosses a module boundary.
//! Nothing here knows about tonic or SQL.

use std::fmt;
use std::str::FromStr;

use crate::hash::PdqHash;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An organisation (a platform taking part).
    OrgId
);
id_type!(
    /// A bank of reference content.
    BankId
);
id_type!(
    /// One known video or image in a bank.
    ReferenceId
);
id_type!(
    /// An API key (its public number, not the secret).
    KeyId
);

/// Position of an entry in the append-only change log. Strictly increasing, starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChangeSeq(pub i64);

/// What kind of content a bank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// Filmed suicide or self-harm.
    SuicideSelfHarm,
    /// Graphic violence: attacks, executions.
    GraphicViolence,
    /// Terrorist and violent-extremist content.
    Terrorism,
    /// Anything else.
    Other,
}

impl Category {
    /// Every category, in declaration order.
    pub const ALL: [Category; 4] = [
        Category::SuicideSelfHarm,
        Category::GraphicViolence,
        Category::Terrorism,
        Category::Other,
    ];

    /// The stable text form used in the store and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Category::SuicideSelfHarm => "suicide_self_harm",
            Category::GraphicViolence => "graphic_violence",
            Category::Terrorism => "terrorism",
            Category::Other => "other",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A category name that is not one of [`Category::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown category {0:?}; expected one of suicide_self_harm, graphic_violence, terrorism, other"
)]
pub struct UnknownCategory(pub String);

impl FromStr for Category {
    type Err = UnknownCategory;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .ok_or_else(|| UnknownCategory(text.to_string()))
    }
}

/// Who may match against a bank besides its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Visibility {
    /// Only the owning organisation.
    Private,
    /// The owner and the listed organisations.
    SharedWith(Vec<OrgId>),
    /// Every organisation.
    Public,
}

/// What an API key may do (DESIGN.md §2). Ordered: each role may do everything the ones before
/// it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// May match against the banks its organisation can see, read them and follow their changes.
    Matcher,
    /// May also create banks for its organisation and add and withdraw references in them.
    Contributor,
    /// Manages organisations, keys and every bank.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Matcher, Role::Contributor, Role::Admin];

    /// The stable text form used in the store and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Matcher => "matcher",
            Role::Contributor => "contributor",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}; expected one of matcher, contributor, admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| UnknownRole(text.to_string()))
    }
}

/// SHA-256 digest of an API key's secret: all the store ever keeps of it.
pub type KeyDigest = [u8; 32];

/// An API key as stored: never the secret itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    /// Its public number.
    pub id: KeyId,
    /// The organisation it acts for.
    pub org: OrgId,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the secret.
    pub digest: KeyDigest,
    /// Free text naming its use ("upload pipeline eu-west"), up to 256 bytes.
    pub label: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// Revocation time; `None` while the key works.
    pub revoked_ms: Option<i64>,
}

/// What a new API key is made of, before the store gives it an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewApiKey {
    /// The organisation it acts for; must exist.
    pub org: OrgId,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the secret; unique.
    pub digest: KeyDigest,
    /// Free text, up to 256 bytes.
    pub label: String,
}

/// Who made a change: the organisation, and the key it used (`None` for the server itself, e.g.
/// the bootstrap, the default organisation, or `--insecure-no-auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Actor {
    /// The organisation acting.
    pub org: OrgId,
    /// The key it authenticated with.
    pub key: Option<KeyId>,
}

impl Actor {
    /// The server acting for an organisation without a key.
    pub const fn system(org: OrgId) -> Self {
        Self { org, key: None }
    }
}

/// An organisation taking part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Organisation {
    /// Its id.
    pub id: OrgId,
    /// Unique display name.
    pub name: String,
}

/// A named collection of reference content.
#[derive(Clone, Debug, PartialEq)]
pub struct Bank {
    /// Its id.
    pub id: BankId,
    /// Unique name.
    pub name: String,
    /// What it holds.
    pub category: Category,
    /// The organisation that owns it.
    pub owner: OrgId,
    /// Who else may match against it.
    pub visibility: Visibility,
    /// Free text.
    pub description: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The embedding spaces the bank holds beside PDQ (empty: PDQ only).
    pub embedding_spaces: Vec<EmbeddingSpace>,
}

/// How the vectors of an embedding space are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Metric {
    /// Cosine similarity: vectors are L2-normalised before they are stored or searched, and the
    /// score is their dot product, -1 to 1.
    #[default]
    Cosine,
    /// The dot product of the vectors as they are.
    Dot,
}

impl Metric {
    /// Every metric, in declaration order.
    pub const ALL: [Metric; 2] = [Metric::Cosine, Metric::Dot];

    /// The stable text form used in the store and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Dot => "dot",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A metric name that is not one of [`Metric::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown embedding metric {0:?}; expected one of cosine, dot")]
pub struct UnknownMetric(pub String);

impl FromStr for Metric {
    type Err = UnknownMetric;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .ok_or_else(|| UnknownMetric(text.to_string()))
    }
}

/// An embedding space as a bank declares it: which vectors its references carry beside PDQ and
/// when two of them match.
///
/// A space is known server-wide by its name: every bank that declares `sscd` declares the same
/// dimension and metric (the store refuses a conflicting declaration), so one vector index per
/// space serves every bank; the threshold is the bank's own.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingSpace {
    /// 1 to 64 characters of `[a-z0-9_-]`.
    pub name: String,
    /// Vector length, 1..=4096.
    pub dimension: u32,
    /// How vectors compare.
    pub metric: Metric,
    /// A reference frame matches when its score against the upload frame is at least this.
    pub threshold: f32,
    /// The settings of the space's vector index, server-wide like the dimension: fixed when the
    /// space is first created (issue #11 item 2). `None` means the defaults
    /// ([`VectorParams::default`]): a space created before they were stored
    /// (schema 3) reads back as `None`. The API always sends the request's settings or the
    /// server's `--vector-index`. A bank declaring a space that exists gets the stored settings.
    pub index: Option<VectorParams>,
}

impl EmbeddingSpace {
    /// The settings its vector index is built with.
    pub fn index_params(&self) -> VectorParams {
        self.index.unwrap_or_default()
    }
}

/// Tuning of a space's index. Text form: `m=16,ef_construction=128,ef_search=64,graph_min=20000`
/// (any subset, in any order; missing keys keep their defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VectorParams {
    /// Links per node and layer (HNSW's `M`; layer 0 keeps up to twice as many), 2..=256.
    pub max_connections: usize,
    /// Beam width while building.
    pub ef_construction: usize,
    /// Beam width while searching (raised to the `k` asked for when smaller).
    pub ef_search: usize,
    /// Spaces with fewer entries are served by the exact scan alone, without a graph.
    pub graph_min: usize,
}

impl Default for VectorParams {
    fn default() -> Self {
        Self {
            max_connections: 16,
            ef_construction: 128,
            ef_search: 64,
            graph_min: 20_000,
        }
    }
}

impl fmt::Display for VectorParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "m={},ef_construction={},ef_search={},graph_min={}",
            self.max_connections, self.ef_construction, self.ef_search, self.graph_min
        )
    }
}

/// A [`VectorParams`] text that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad vector index settings {text:?}: {reason}; expected e.g. m=16,ef_construction=128,ef_search=64,graph_min=20000"
)]
pub struct BadVectorParams {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for VectorParams {
    type Err = BadVectorParams;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| BadVectorParams {
            text: text.to_string(),
            reason,
        };
        let mut params = VectorParams::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("{item:?} is not key=value")))?;
            let value: usize = value
                .trim()
                .parse()
                .map_err(|_| bad(format!("{key} must be a whole number, not {value:?}")))?;
            match key.trim() {
                "m" if (2..=256).contains(&value) => params.max_connections = value,
                "m" => return Err(bad(format!("m must be 2 to 256, not {value}"))),
                "ef_construction" if value >= 1 => params.ef_construction = value,
                "ef_search" if value >= 1 => params.ef_search = value,
                "ef_construction" | "ef_search" => {
                    return Err(bad(format!("{key} must be at least 1")));
                }
                "graph_min" => params.graph_min = value,
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        Ok(params)
    }
}

/// One frame's vector in one embedding space.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameEmbedding {
    /// The frame it belongs to (as in [`FrameSignal::frame_index`]).
    pub frame_index: u32,
    /// That frame's presentation time in milliseconds.
    pub timestamp_ms: u64,
    /// The space's name.
    pub space: String,
    /// The vector: `dimension` finite values, L2-normalised for cosine spaces.
    pub vector: Vec<f32>,
}

/// Lifecycle of a reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceState {
    /// Matches.
    Active,
    /// Never matches again: how false positives are fixed.
    Withdrawn {
        /// Why it was withdrawn.
        reason: String,
        /// When, milliseconds since the Unix epoch.
        at_ms: i64,
    },
}

/// One frame of a reference (or of an upload): its position and its PDQ signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSignal {
    /// 0-based frame index in its video (0 for a still image).
    pub frame_index: u32,
    /// Presentation time in milliseconds.
    pub timestamp_ms: u64,
    /// The PDQ hash.
    pub hash: PdqHash,
    /// PDQ quality, 0..=100.
    pub quality: u8,
}

/// One known video or image in a bank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Its id.
    pub id: ReferenceId,
    /// The bank it belongs to.
    pub bank: BankId,
    /// The contributor's own id for it (may be empty).
    pub external_id: String,
    /// Free text.
    pub note: String,
    /// The organisation that added it.
    pub added_by: OrgId,
    /// When it was added, milliseconds since the Unix epoch.
    pub added_ms: i64,
    /// Active or withdrawn.
    pub state: ReferenceState,
    /// Number of distinct frame signals stored for it (after exact-hash deduplication).
    pub frame_count: u32,
}

/// What a new reference is made of, before the store gives it an id.
#[derive(Clone, Debug, PartialEq)]
pub struct NewReference {
    /// Target bank.
    pub bank: BankId,
    /// The contributor's own id for it.
    pub external_id: String,
    /// Free text.
    pub note: String,
    /// The organisation adding it.
    pub added_by: OrgId,
    /// Its frames, in any order; the store keeps the first frame of each distinct hash.
    pub frames: Vec<FrameSignal>,
    /// Vectors of its frames in the bank's embedding spaces, each naming its frame by
    /// `frame_index`; empty for a bank without spaces.
    pub embeddings: Vec<FrameEmbedding>,
}

/// What happened, in one change-log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// An organisation was created.
    OrgCreated(OrgId),
    /// A bank was created.
    BankCreated(BankId),
    /// A reference and its frames were added.
    ReferenceAdded {
        /// The new reference.
        reference: ReferenceId,
        /// Its bank.
        bank: BankId,
    },
    /// A reference was withdrawn.
    ReferenceWithdrawn {
        /// The reference.
        reference: ReferenceId,
        /// Its bank.
        bank: BankId,
    },
    /// A bank's visibility (or description) changed.
    BankUpdated(BankId),
    /// An API key was created.
    KeyCreated {
        /// The key.
        key: KeyId,
        /// The organisation it acts for.
        org: OrgId,
    },
    /// An API key was revoked.
    KeyRevoked {
        /// The key.
        key: KeyId,
        /// The organisation it acted for.
        org: OrgId,
    },
}

/// One entry of the append-only change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Its position in the log.
    pub seq: ChangeSeq,
    /// What happened.
    pub kind: ChangeKind,
    /// Who did it.
    pub actor: Actor,
    /// Human-readable particulars for the audit trail: the withdrawal reason, the new visibility,
    /// the key's role (empty when there is nothing to add).
    pub detail: String,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// A frame signal as the index needs it: the hash plus where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexedFrame {
    /// The reference it belongs to.
    pub reference: ReferenceId,
    /// The bank of that reference.
    pub bank: BankId,
    /// The frame.
    pub frame: FrameSignal,
}

/// A frame's vector as the index needs it: the vector plus where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexedEmbedding {
    /// The reference it belongs to.
    pub reference: ReferenceId,
    /// The bank of that reference.
    pub bank: BankId,
    /// The frame's vector.
    pub embedding: FrameEmbedding,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_text_round_trips() {
        for c in Category::ALL {
            assert_eq!(c.as_str().parse::<Category>(), Ok(c));
        }
        assert!("gore".parse::<Category>().is_err());
    }
}

//! The store tests shared by both backends: each backend-neutral body (in the modules by concern)
//! runs against a temporary SQLite file and, when a server is configured, a fresh PostgreSQL
//! database ([`backend_tests!`]).

mod banks;
mod changes;
mod keys;
mod refs;
mod spaces;

use banks::*;
use changes::*;
use keys::*;
use refs::*;
use spaces::*;

use super::rules::dedup_frames;
use super::*;
use crate::model::{ChangeKind, ReferenceState, Role};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The server acting for `org`, without a key.
fn sys(org: OrgId) -> Actor {
    Actor::system(org)
}

fn hash(seed: u8) -> PdqHash {
    PdqHash::from_bytes([seed; 32])
}

fn frame(frame_index: u32, seed: u8) -> FrameSignal {
    FrameSignal {
        frame_index,
        timestamp_ms: u64::from(frame_index) * 1000,
        hash: hash(seed),
        quality: 90,
    }
}

fn new_bank(name: &str, owner: OrgId) -> NewBank {
    NewBank {
        name: name.to_string(),
        category: Category::GraphicViolence,
        owner,
        visibility: Visibility::Private,
        description: "test bank".to_string(),
        embedding_spaces: Vec::new(),
    }
}

fn new_reference(bank: BankId, added_by: OrgId, frames: Vec<FrameSignal>) -> NewReference {
    NewReference {
        bank,
        external_id: "ext-1".to_string(),
        note: "a note".to_string(),
        added_by,
        frames,
        embeddings: Vec::new(),
    }
}

async fn open() -> Result<(tempfile::TempDir, Store), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open_embedded(dir.path()).await?;
    Ok((dir, store))
}

#[tokio::test]
async fn open_creates_dir_file_and_default_org() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("nested").join("data");
    let store = Store::open_embedded(&data_dir).await?;
    assert!(data_dir.join("framematch.sqlite3").is_file());
    assert_eq!(
        store.describe(),
        format!("sqlite:{}", data_dir.join("framematch.sqlite3").display())
    );
    let local = store.default_org().await?;
    let orgs = store.list_orgs().await?;
    assert_eq!(
        orgs,
        vec![Organisation {
            id: local,
            name: DEFAULT_ORG_NAME.to_string()
        }]
    );
    let changes = store.changes_since(ChangeSeq(0), 100).await?;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].kind, ChangeKind::OrgCreated(local));
    assert_eq!(changes[0].actor, sys(local));
    assert_eq!(changes[0].detail, "");
    Ok(())
}

fn digest(seed: u8) -> crate::model::KeyDigest {
    [seed; 32]
}

fn new_key(org: OrgId, role: Role, seed: u8, label: &str) -> NewApiKey {
    NewApiKey {
        org,
        role,
        digest: digest(seed),
        label: label.to_string(),
    }
}

/// The latest change; the log is never empty (the default organisation's creation).
async fn last_change(store: &Store) -> Result<Change, Box<dyn std::error::Error>> {
    let seq = store.last_seq().await?;
    let mut changes = store.changes_since(ChangeSeq(seq.0 - 1), 1).await?;
    Ok(changes.pop().ok_or("empty change log")?)
}

fn space(name: &str, dimension: u32, metric: Metric, threshold: f32) -> EmbeddingSpace {
    EmbeddingSpace {
        name: name.to_string(),
        dimension,
        metric,
        threshold,
        index: None,
    }
}

fn vector_of(frame_index: u32, space: &str, vector: Vec<f32>) -> FrameEmbedding {
    FrameEmbedding {
        frame_index,
        timestamp_ms: u64::from(frame_index) * 1000,
        space: space.to_string(),
        vector,
    }
}

/// A deterministic vector with values spread over [-1, 1].
fn wavy(dimension: usize, seed: f32) -> Vec<f32> {
    (0..dimension)
        .map(|i| ((i as f32 + 1.0) * seed).sin())
        .collect()
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    for x in &mut v {
        *x /= norm;
    }
    v
}

fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tolerance,
            "value {i}: {a} is not within {tolerance} of {e}"
        );
    }
}

fn bank_with_spaces(name: &str, owner: OrgId, spaces: Vec<EmbeddingSpace>) -> NewBank {
    NewBank {
        embedding_spaces: spaces,
        ..new_bank(name, owner)
    }
}

/// What both drivers' schema-3 upgrade tests check once the store is open (each wrote bank
/// 1 of org 1 with the space "sscd", 4 values, cosine, in the schema-3 form): the old space
/// reads back without settings (the defaults), and a new bank declaring it and a new space
/// "fresh" with settings stores them for the new space only. Returns the new bank, to
/// compare after reopening.
pub(super) async fn schema_3_spaces_gain_index_settings(
    store: &Store,
) -> Result<Bank, Box<dyn std::error::Error>> {
    let old = store.get_bank(BankId(1)).await?;
    assert_eq!(old.embedding_spaces.len(), 1);
    assert_eq!(old.embedding_spaces[0].index, None);
    assert_eq!(
        old.embedding_spaces[0].index_params(),
        crate::index::VectorParams::default()
    );
    let tuned: crate::index::VectorParams = "m=24,ef_construction=200"
        .parse()
        .map_err(|e| format!("{e}"))?;
    let asked = |name: &str| EmbeddingSpace {
        index: Some(tuned),
        ..space(name, 4, Metric::Cosine, 0.7)
    };
    let new = store
        .create_bank(
            bank_with_spaces("new", OrgId(1), vec![asked("sscd"), asked("fresh")]),
            sys(OrgId(1)),
        )
        .await?;
    let settings: Vec<(&str, Option<crate::index::VectorParams>)> = new
        .embedding_spaces
        .iter()
        .map(|s| (s.name.as_str(), s.index))
        .collect();
    // The old space keeps its (default) settings; the new one stores the asked ones.
    assert_eq!(settings, vec![("fresh", Some(tuned)), ("sscd", None)]);
    Ok(new)
}

/// Runs each backend-neutral test body above against both backends: a temporary SQLite
/// file, and a fresh PostgreSQL database when `FRAMEMATCH_TEST_POSTGRES_URL` names a server
/// (see `postgres::test_support`).
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod embedded_backend {
            $(
                #[tokio::test]
                async fn $name() -> super::TestResult {
                    let (_dir, store) = super::open().await?;
                    super::$name(store).await
                }
            )*
        }

        mod postgres_backend {
            use crate::store::postgres::test_support::TestDatabase;
            $(
                #[tokio::test]
                async fn $name() -> super::TestResult {
                    let Some(db) = TestDatabase::create().await? else {
                        return Ok(());
                    };
                    let store = db.open().await?;
                    super::$name(store).await
                }
            )*
        }
    };
}

backend_tests!(
    fresh_store_has_the_default_org_and_its_change,
    orgs_round_trip_and_reject_duplicates,
    banks_round_trip_by_id_and_name,
    bank_errors,
    references_round_trip_with_dedup_by_exact_hash,
    reference_errors,
    withdraw_twice_is_already_withdrawn,
    each_write_appends_one_change_in_order,
    load_active_frames_excludes_withdrawn,
    bank_visibility_updates_rewrite_shares_and_log_the_change,
    api_keys_round_trip_and_revoke_once,
    each_write_names_its_actor_org_and_key,
    audit_filters_by_bank_in_order,
    list_references_of_a_bank,
    follow_cursors_are_per_source_and_upserted,
    mirrored_banks_are_created_once,
    mirrored_references_are_added_once,
    embeddings_round_trip_in_f16,
    space_index_settings_are_stored_once,
    embedding_space_conflicts_and_bad_vectors_are_refused,
    withdrawn_vectors_are_not_loaded,
    mirrored_references_keep_their_vectors,
);

#[tokio::test]
async fn vectors_survive_close_and_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let sent = wavy(16, 0.3);
    let (bank, reference) = {
        let store = Store::open_embedded(dir.path()).await?;
        let local = store.default_org().await?;
        let bank = store
            .create_bank(
                bank_with_spaces("kept", local, vec![space("sscd", 16, Metric::Cosine, 0.8)]),
                sys(local),
            )
            .await?;
        let reference = store
            .add_reference(
                NewReference {
                    embeddings: vec![vector_of(0, "sscd", sent.clone())],
                    ..new_reference(bank.id, local, vec![frame(0, 9)])
                },
                sys(local),
            )
            .await?;
        (bank, reference)
    };
    let store = Store::open_embedded(dir.path()).await?;
    assert_eq!(store.get_bank(bank.id).await?, bank);
    let stored = store.reference_embeddings(reference.id).await?;
    assert_eq!(stored.len(), 1);
    assert_close(&stored[0].vector, &unit(sent), 1e-3);
    assert_eq!(store.load_active().await?.embeddings.len(), 1);
    Ok(())
}

#[test]
fn f16_storage_is_within_1e_3_of_unit_vectors() -> TestResult {
    let v = unit(wavy(512, 0.77));
    let bytes = rows::encode_vector(&v);
    assert_eq!(bytes.len(), 1024);
    let back = rows::embedding(rows::EmbeddingColumns {
        reference: ReferenceId(1),
        frame_index: 0,
        timestamp_ms: 0,
        space: "sscd".to_string(),
        dimension: 512,
        vector: &bytes,
    })?;
    assert_close(&back.vector, &v, 1e-3);
    let short = rows::embedding(rows::EmbeddingColumns {
        reference: ReferenceId(1),
        frame_index: 0,
        timestamp_ms: 0,
        space: "sscd".to_string(),
        dimension: 513,
        vector: &bytes,
    });
    assert!(matches!(short, Err(Error::Corrupt { .. })), "{short:?}");
    Ok(())
}

#[tokio::test]
async fn data_survives_close_and_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (org, bank, reference, seq) = {
        let store = Store::open_embedded(dir.path()).await?;
        let local = store.default_org().await?;
        let org = store.create_org("partner", None).await?;
        let bank = store
            .create_bank(
                NewBank {
                    visibility: Visibility::SharedWith(vec![org.id]),
                    ..new_bank("kept", local)
                },
                sys(local),
            )
            .await?;
        let reference = store
            .add_reference(
                new_reference(bank.id, org.id, vec![frame(0, 9)]),
                sys(org.id),
            )
            .await?;
        (org, bank, reference, store.last_seq().await?)
    };
    let store = Store::open_embedded(dir.path()).await?;
    assert_eq!(store.list_orgs().await?.len(), 2);
    assert_eq!(store.list_orgs().await?[1], org);
    assert_eq!(store.get_bank(bank.id).await?, bank);
    assert_eq!(store.get_reference(reference.id).await?, reference);
    assert_eq!(store.last_seq().await?, seq);
    let (frames, loaded_seq) = store.load_active_frames().await?;
    assert_eq!(loaded_seq, seq);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].frame, frame(0, 9));
    Ok(())
}

#[test]
fn dedup_keeps_first_by_frame_index_then_input_order() -> TestResult {
    let a = FrameSignal {
        quality: 10,
        ..frame(3, 1)
    };
    let b = FrameSignal {
        quality: 20,
        ..frame(3, 1)
    };
    let kept = dedup_frames(vec![frame(9, 1), a, b, frame(1, 2)])?;
    assert_eq!(kept, vec![frame(1, 2), a]);
    Ok(())
}

#[test]
fn error_messages_are_lowercase_with_numbers() {
    let err = Error::AlreadyWithdrawn {
        reference: ReferenceId(7),
    };
    assert_eq!(err.to_string(), "reference 7 is already withdrawn");
    let err = Error::AlreadyRevoked { key: KeyId(3) };
    assert_eq!(err.to_string(), "api key 3 is already revoked");
    let err = Error::SchemaTooNew {
        found: 9,
        supported: 1,
    };
    assert_eq!(
        err.to_string(),
        "database schema version 9 is newer than the 1 this binary supports"
    );
    let err = Error::NotFound {
        kind: "bank",
        key: "12".to_string(),
    };
    assert_eq!(err.to_string(), "bank 12 not found");
}

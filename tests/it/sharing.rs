//! Issue #4 on the real server over real gRPC: API keys, roles, bank visibility, the audit trail
//! and the change feed.
//!
//! The authorisation matrix runs every role of organisation `alpha` against every RPC, on alpha's
//! own bank and on organisation `beta`'s private bank and beta's bank shared with alpha, and checks
//! each answer's code. `cargo test --test it sharing::authorization_matrix -- --nocapture` prints
//! the matrix as a Markdown table.

#![allow(clippy::print_stdout)] // the measured figures and the matrix are printed for the note

use std::collections::BTreeMap;
use std::time::Duration;

use framematch::hash::PdqHash;
use framematch::pb;
use tonic::Code;

use crate::support::{self, ADMIN_KEY, TestServer};

fn hash(seed: u64) -> PdqHash {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    PdqHash::from_bit_fn(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state & 1 == 1
    })
}

async fn create_org(server: &TestServer, name: &str) {
    server
        .admin()
        .await
        .create_organisation(pb::CreateOrganisationRequest { name: name.into() })
        .await
        .expect("create organisation");
}

async fn create_key(server: &TestServer, org: &str, role: pb::Role) -> String {
    server
        .admin()
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            organisation: org.into(),
            role: role as i32,
            label: format!("{org} {role:?}"),
        })
        .await
        .expect("create key")
        .into_inner()
        .secret
}

async fn create_bank_as(
    server: &TestServer,
    key: &str,
    name: &str,
    visibility: pb::Visibility,
    shared_with: &[&str],
) -> Result<pb::Bank, tonic::Status> {
    server
        .banks_as(key)
        .await
        .create_bank(pb::CreateBankRequest {
            embedding_spaces: Vec::new(),
            name: name.into(),
            category: pb::Category::GraphicViolence as i32,
            visibility: visibility as i32,
            shared_with: shared_with.iter().map(|s| (*s).to_string()).collect(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn add_reference_as(
    server: &TestServer,
    key: &str,
    bank: &str,
    hash: &PdqHash,
) -> Result<i64, tonic::Status> {
    let messages = vec![
        pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Header(
                pb::ReferenceHeader {
                    bank: bank.into(),
                    external_id: String::new(),
                    note: String::new(),
                },
            )),
        },
        pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Frame(support::pdq_frame(
                0, 0, hash, 100,
            ))),
        },
    ];
    server
        .banks_as(key)
        .await
        .add_reference(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner().reference.expect("reference").id)
}

fn code<T>(result: &Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// The banks (by name) a MatchImage of `hash` with `key` and no bank filter returns.
async fn matched_banks(server: &TestServer, key: &str, hash: &PdqHash) -> Vec<String> {
    let result = server
        .matcher_as(key)
        .await
        .match_image(pb::MatchImageRequest {
            options: None,
            frame: Some(support::pdq_frame(0, 0, hash, 100)),
        })
        .await
        .expect("match")
        .into_inner()
        .result
        .expect("result");
    let mut banks: Vec<String> = result
        .matches
        .iter()
        .map(|m| m.source.as_ref().expect("source").bank.clone())
        .collect();
    banks.sort();
    banks.dedup();
    banks
}

struct World {
    server: TestServer,
    /// alpha's keys by role.
    keys: BTreeMap<&'static str, String>,
    beta_contributor: String,
}

/// alpha (matcher, contributor and admin keys) and beta (a contributor key); banks `alpha-own`
/// (private), `beta-private` and `beta-shared` (shared with alpha), each holding one reference of
/// the same frame.
async fn world() -> World {
    let server = TestServer::start().await;
    create_org(&server, "alpha").await;
    create_org(&server, "beta").await;
    create_org(&server, "gamma").await;
    let mut keys = BTreeMap::new();
    keys.insert(
        "matcher",
        create_key(&server, "alpha", pb::Role::Matcher).await,
    );
    keys.insert(
        "contributor",
        create_key(&server, "alpha", pb::Role::Contributor).await,
    );
    keys.insert("admin", create_key(&server, "alpha", pb::Role::Admin).await);
    let beta = create_key(&server, "beta", pb::Role::Contributor).await;
    create_bank_as(
        &server,
        &keys["contributor"],
        "alpha-own",
        pb::Visibility::Private,
        &[],
    )
    .await
    .expect("alpha bank");
    create_bank_as(&server, &beta, "beta-private", pb::Visibility::Private, &[])
        .await
        .expect("beta private");
    create_bank_as(
        &server,
        &beta,
        "beta-shared",
        pb::Visibility::Shared,
        &["alpha", "gamma"],
    )
    .await
    .expect("beta shared");
    add_reference_as(&server, &keys["contributor"], "alpha-own", &hash(1))
        .await
        .expect("alpha ref");
    for bank in ["beta-private", "beta-shared"] {
        add_reference_as(&server, &beta, bank, &hash(1))
            .await
            .expect("beta ref");
    }
    World {
        server,
        keys,
        beta_contributor: beta,
    }
}

impl World {
    /// A fresh reference in `bank`, added by its owner.
    async fn fresh_reference(&self, bank: &str, seed: u64) -> i64 {
        let owner = if bank.starts_with("alpha") {
            &self.keys["contributor"]
        } else {
            &self.beta_contributor
        };
        add_reference_as(&self.server, owner, bank, &hash(seed))
            .await
            .expect("fresh reference")
    }

    /// The code each bank-scoped RPC answers `key` on `bank`.
    async fn bank_rpcs(&self, key: &str, bank: &str, seed: u64) -> Vec<(&'static str, Code)> {
        let server = &self.server;
        let mut answers = Vec::new();
        let only = pb::MatchOptions {
            banks: vec![bank.to_string()],
            ..Default::default()
        };
        let image = server
            .matcher_as(key)
            .await
            .match_image(pb::MatchImageRequest {
                options: Some(only.clone()),
                frame: Some(support::pdq_frame(0, 0, &hash(1), 100)),
            })
            .await;
        answers.push(("Matcher.MatchImage", code(&image)));
        let video = async {
            let request = pb::MatchRequest {
                options: Some(only.clone()),
                frame: Some(support::pdq_frame(0, 0, &hash(1), 100)),
            };
            let mut responses = server
                .matcher_as(key)
                .await
                .match_video(tokio_stream::iter(vec![request]))
                .await?
                .into_inner();
            while responses.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        }
        .await;
        answers.push(("Matcher.MatchVideo", code(&video)));
        let listed = server
            .banks_as(key)
            .await
            .list_banks(pb::ListBanksRequest {})
            .await
            .expect("list banks")
            .into_inner()
            .banks
            .iter()
            .any(|b| b.name == bank);
        answers.push((
            "Banks.ListBanks (bank listed)",
            if listed { Code::Ok } else { Code::NotFound },
        ));
        let reference = self.fresh_reference(bank, seed).await;
        let get = server
            .banks_as(key)
            .await
            .get_reference(pb::GetReferenceRequest {
                reference_id: reference,
                include_embeddings: false,
            })
            .await;
        answers.push(("Banks.GetReference", code(&get)));
        let add = add_reference_as(server, key, bank, &hash(seed + 1)).await;
        answers.push(("Banks.AddReference", code(&add)));
        let withdraw = server
            .banks_as(key)
            .await
            .withdraw_reference(pb::WithdrawReferenceRequest {
                reference_id: reference,
                reason: "matrix".into(),
            })
            .await;
        answers.push(("Banks.WithdrawReference", code(&withdraw)));
        let current = server
            .banks()
            .await
            .list_banks(pb::ListBanksRequest {})
            .await
            .expect("list")
            .into_inner()
            .banks
            .into_iter()
            .find(|b| b.name == bank)
            .expect("bank exists");
        // Re-sends the bank's current visibility: allowed or not, nothing changes.
        let update = server
            .banks_as(key)
            .await
            .update_bank(pb::UpdateBankRequest {
                bank: bank.into(),
                visibility: current.visibility,
                shared_with: current.shared_with.clone(),
            })
            .await;
        answers.push(("Banks.UpdateBank", code(&update)));
        let export = async {
            let mut stream = server
                .banks_as(key)
                .await
                .export_bank(pb::ExportBankRequest {
                    bank: bank.into(),
                    include_withdrawn: false,
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        }
        .await;
        answers.push(("Banks.ExportBank", code(&export)));
        let feed = feed_sees(server, key, bank).await;
        answers.push((
            "Exchange.Changes (bank's events sent)",
            if feed { Code::Ok } else { Code::NotFound },
        ));
        let audit = server
            .admin_as(key)
            .await
            .audit(pb::AuditRequest {
                bank: bank.into(),
                ..Default::default()
            })
            .await;
        answers.push(("Admin.Audit --bank", code(&audit)));
        answers
    }

    /// The code each RPC that names no bank answers `key`.
    async fn global_rpcs(&self, key: &str, role: &str) -> Vec<(&'static str, Code)> {
        let server = &self.server;
        let mut answers = Vec::new();
        let create = create_bank_as(
            server,
            key,
            &format!("new-{role}"),
            pb::Visibility::Private,
            &[],
        )
        .await;
        answers.push(("Banks.CreateBank", code(&create)));
        let stats = server.banks_as(key).await.stats(pb::StatsRequest {}).await;
        answers.push(("Banks.Stats", code(&stats)));
        let mut admin = server.admin_as(key).await;
        answers.push((
            "Admin.CreateOrganisation",
            code(
                &admin
                    .create_organisation(pb::CreateOrganisationRequest {
                        name: format!("org-by-{role}"),
                    })
                    .await,
            ),
        ));
        answers.push((
            "Admin.ListOrganisations",
            code(
                &admin
                    .list_organisations(pb::ListOrganisationsRequest {})
                    .await,
            ),
        ));
        let created = admin
            .create_api_key(pb::CreateApiKeyRequest {
                organisation: "alpha".into(),
                role: pb::Role::Matcher as i32,
                label: String::new(),
            })
            .await;
        answers.push(("Admin.CreateApiKey", code(&created)));
        answers.push((
            "Admin.ListApiKeys",
            code(&admin.list_api_keys(pb::ListApiKeysRequest::default()).await),
        ));
        // Something to revoke that exists whoever asks.
        let victim = server
            .admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                organisation: "gamma".into(),
                role: pb::Role::Matcher as i32,
                label: String::new(),
            })
            .await
            .expect("victim key")
            .into_inner()
            .key
            .expect("key")
            .id;
        answers.push((
            "Admin.RevokeApiKey",
            code(
                &admin
                    .revoke_api_key(pb::RevokeApiKeyRequest { id: victim })
                    .await,
            ),
        ));
        answers.push((
            "Admin.Audit",
            code(&admin.audit(pb::AuditRequest::default()).await),
        ));
        answers
    }
}

/// Whether `key`'s change feed, read from the start until it is caught up, carries an event of
/// `bank`.
async fn feed_sees(server: &TestServer, key: &str, bank: &str) -> bool {
    let mut stream = server
        .exchange_as(key)
        .await
        .changes(pb::ChangesRequest { cursor: 0 })
        .await
        .expect("changes")
        .into_inner();
    let mut seen = false;
    // The feed never ends by itself: read until it has been quiet for a moment.
    while let Ok(event) = tokio::time::timeout(Duration::from_millis(1000), stream.message()).await
    {
        let Some(event) = event.expect("event") else {
            break;
        };
        seen |= match event.change.expect("change") {
            pb::change_event::Change::Bank(b) => b.name == bank,
            pb::change_event::Change::ReferenceAdded(r) => {
                r.reference.expect("reference").bank == bank
            }
            pb::change_event::Change::ReferenceWithdrawn(r) => {
                r.reference.expect("reference").bank == bank
            }
            pb::change_event::Change::BankHidden(_) => false,
        };
    }
    seen
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::NotFound => "NOT_FOUND",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        _ => "OTHER",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    use Code::{NotFound as NF, Ok as OK, PermissionDenied as PD};
    let world = world().await;
    let roles = ["matcher", "contributor", "admin"];
    // Expected codes per (RPC, target bank), for matcher, contributor, admin. NOT_FOUND where a
    // bank's existence must not leak; PERMISSION_DENIED where the bank is visible but the key may
    // not do this. In the two "(...)" rows NOT_FOUND stands for "not listed" / "no event".
    let expected: Vec<(&str, &str, [Code; 3])> = vec![
        ("Matcher.MatchImage", "alpha-own", [OK, OK, OK]),
        ("Matcher.MatchImage", "beta-private", [NF, NF, OK]),
        ("Matcher.MatchImage", "beta-shared", [OK, OK, OK]),
        ("Matcher.MatchVideo", "alpha-own", [OK, OK, OK]),
        ("Matcher.MatchVideo", "beta-private", [NF, NF, OK]),
        ("Matcher.MatchVideo", "beta-shared", [OK, OK, OK]),
        ("Banks.ListBanks (bank listed)", "alpha-own", [OK, OK, OK]),
        (
            "Banks.ListBanks (bank listed)",
            "beta-private",
            [NF, NF, OK],
        ),
        ("Banks.ListBanks (bank listed)", "beta-shared", [OK, OK, OK]),
        ("Banks.GetReference", "alpha-own", [OK, OK, OK]),
        ("Banks.GetReference", "beta-private", [NF, NF, OK]),
        ("Banks.GetReference", "beta-shared", [OK, OK, OK]),
        ("Banks.ExportBank", "alpha-own", [OK, OK, OK]),
        ("Banks.ExportBank", "beta-private", [NF, NF, OK]),
        ("Banks.ExportBank", "beta-shared", [OK, OK, OK]),
        ("Banks.AddReference", "alpha-own", [PD, OK, OK]),
        ("Banks.AddReference", "beta-private", [NF, NF, OK]),
        ("Banks.AddReference", "beta-shared", [PD, PD, OK]),
        ("Banks.WithdrawReference", "alpha-own", [PD, OK, OK]),
        ("Banks.WithdrawReference", "beta-private", [NF, NF, OK]),
        ("Banks.WithdrawReference", "beta-shared", [PD, PD, OK]),
        ("Banks.UpdateBank", "alpha-own", [PD, OK, OK]),
        ("Banks.UpdateBank", "beta-private", [NF, NF, OK]),
        ("Banks.UpdateBank", "beta-shared", [PD, PD, OK]),
        (
            "Exchange.Changes (bank's events sent)",
            "alpha-own",
            [OK, OK, OK],
        ),
        (
            "Exchange.Changes (bank's events sent)",
            "beta-private",
            [NF, NF, OK],
        ),
        (
            "Exchange.Changes (bank's events sent)",
            "beta-shared",
            [OK, OK, OK],
        ),
        ("Admin.Audit --bank", "alpha-own", [PD, PD, OK]),
        ("Admin.Audit --bank", "beta-private", [PD, PD, OK]),
        ("Admin.Audit --bank", "beta-shared", [PD, PD, OK]),
        ("Banks.CreateBank", "-", [PD, OK, OK]),
        ("Banks.Stats", "-", [OK, OK, OK]),
        ("Admin.CreateOrganisation", "-", [PD, PD, OK]),
        ("Admin.ListOrganisations", "-", [PD, PD, OK]),
        ("Admin.CreateApiKey", "-", [PD, PD, OK]),
        ("Admin.ListApiKeys", "-", [PD, PD, OK]),
        ("Admin.RevokeApiKey", "-", [PD, PD, OK]),
        ("Admin.Audit", "-", [PD, PD, OK]),
    ];
    let mut actual: BTreeMap<(String, String), [Code; 3]> = BTreeMap::new();
    let mut seed = 100;
    for (column, role) in roles.iter().enumerate() {
        let key = world.keys[role].clone();
        for bank in ["alpha-own", "beta-private", "beta-shared"] {
            seed += 10;
            for (rpc, code) in world.bank_rpcs(&key, bank, seed).await {
                actual
                    .entry((rpc.to_string(), bank.to_string()))
                    .or_insert([Code::Unknown; 3])[column] = code;
            }
        }
        for (rpc, code) in world.global_rpcs(&key, role).await {
            actual
                .entry((rpc.to_string(), "-".to_string()))
                .or_insert([Code::Unknown; 3])[column] = code;
        }
    }
    println!("| RPC | bank | matcher | contributor | admin |");
    println!("| --- | --- | --- | --- | --- |");
    let mut mismatches = Vec::new();
    for (rpc, bank, want) in &expected {
        let got = actual
            .get(&((*rpc).to_string(), (*bank).to_string()))
            .copied()
            .unwrap_or([Code::Unknown; 3]);
        println!(
            "| {rpc} | {bank} | {} | {} | {} |",
            code_name(got[0]),
            code_name(got[1]),
            code_name(got[2])
        );
        if &got != want {
            mismatches.push(format!("{rpc} on {bank}: expected {want:?}, got {got:?}"));
        }
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "every RPC answered is in the expected table"
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_searches_only_visible_banks() {
    let world = world().await;
    let server = &world.server;
    // The same frame sits in all three banks: each key finds exactly the ones it may see.
    for role in ["matcher", "contributor"] {
        assert_eq!(
            matched_banks(server, &world.keys[role], &hash(1)).await,
            vec!["alpha-own".to_string(), "beta-shared".to_string()],
            "{role}"
        );
    }
    assert_eq!(
        matched_banks(server, &world.keys["admin"], &hash(1)).await,
        vec![
            "alpha-own".to_string(),
            "beta-private".to_string(),
            "beta-shared".to_string()
        ]
    );
    // Unsharing beta-shared takes it out of alpha's matches at once; sharing it with everyone
    // brings it back.
    let mut beta = server.banks_as(&world.beta_contributor).await;
    let bank = beta
        .update_bank(pb::UpdateBankRequest {
            bank: "beta-shared".into(),
            visibility: pb::Visibility::Private as i32,
            shared_with: Vec::new(),
        })
        .await
        .expect("unshare")
        .into_inner();
    assert_eq!(bank.visibility, pb::Visibility::Private as i32);
    assert_eq!(
        matched_banks(server, &world.keys["matcher"], &hash(1)).await,
        vec!["alpha-own".to_string()]
    );
    beta.update_bank(pb::UpdateBankRequest {
        bank: "beta-shared".into(),
        visibility: pb::Visibility::Public as i32,
        shared_with: Vec::new(),
    })
    .await
    .expect("publish");
    assert_eq!(
        matched_banks(server, &world.keys["matcher"], &hash(1)).await,
        vec!["alpha-own".to_string(), "beta-shared".to_string()]
    );
    // Whom a bank is shared with is told to its owner, not to the partners it is shared with.
    beta.update_bank(pb::UpdateBankRequest {
        bank: "beta-shared".into(),
        visibility: pb::Visibility::Shared as i32,
        shared_with: vec!["alpha".into(), "gamma".into()],
    })
    .await
    .expect("share again");
    let seen_by = |banks: Vec<pb::Bank>| {
        banks
            .into_iter()
            .find(|b| b.name == "beta-shared")
            .expect("listed")
            .shared_with
    };
    let owner_view = seen_by(
        beta.list_banks(pb::ListBanksRequest {})
            .await
            .expect("list")
            .into_inner()
            .banks,
    );
    assert_eq!(owner_view, vec!["alpha".to_string(), "gamma".to_string()]);
    let partner_view = seen_by(
        server
            .banks_as(&world.keys["matcher"])
            .await
            .list_banks(pb::ListBanksRequest {})
            .await
            .expect("list")
            .into_inner()
            .banks,
    );
    assert!(partner_view.is_empty(), "{partner_view:?}");
}

/// Issue #13 item 4: `Stats` counts only the banks the caller may see. alpha sees its own bank
/// and beta's shared one, beta its two banks, gamma only beta's shared one; admins see all
/// three, and only admins get the server-wide index and stream figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_only_what_the_caller_may_see() {
    let world = world().await;
    let server = &world.server;
    // One withdrawn reference in beta's private bank: not alpha's to count either.
    let withdrawn = world.fresh_reference("beta-private", 77).await;
    server
        .banks_as(&world.beta_contributor)
        .await
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: withdrawn,
            reason: "test".into(),
        })
        .await
        .expect("withdraw");
    let gamma = create_key(server, "gamma", pb::Role::Matcher).await;
    let stats = |key: String| async move {
        server
            .banks_as(&key)
            .await
            .stats(pb::StatsRequest {})
            .await
            .expect("stats")
            .into_inner()
    };
    // (key, banks, active, withdrawn)
    let cases = [
        ("alpha matcher", world.keys["matcher"].clone(), 2, 2, 0),
        ("beta contributor", world.beta_contributor.clone(), 2, 2, 1),
        ("gamma matcher", gamma, 1, 1, 0),
    ];
    for (who, key, banks, active, withdrawn) in cases {
        let seen = stats(key).await;
        assert_eq!(
            (
                seen.banks,
                seen.active_references,
                seen.withdrawn_references
            ),
            (banks, active, withdrawn),
            "{who}: {seen:?}"
        );
        assert_eq!(
            seen.stored_frames,
            active + withdrawn,
            "{who}: one frame each"
        );
        assert_eq!(
            (
                seen.indexed_frames,
                seen.index_memory_bytes,
                seen.open_streams
            ),
            (0, 0, 0),
            "{who}: server-wide figures are for admins"
        );
    }
    for key in [ADMIN_KEY.to_string(), world.keys["admin"].clone()] {
        let all = stats(key).await;
        assert_eq!(
            (all.banks, all.active_references, all.withdrawn_references),
            (3, 3, 1)
        );
        assert!(
            all.indexed_frames > 0,
            "admins get the index figures: {all:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_required_checked_and_revocable() {
    let server = TestServer::start().await;
    let stats = |key: Option<String>| {
        let server = &server;
        async move {
            pb::banks_client::BanksClient::new(server.connect_as(key.as_deref()).await)
                .stats(pb::StatsRequest {})
                .await
        }
    };
    let missing = stats(None).await.expect_err("no key");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("authorization: Bearer"),
        "{}",
        missing.message()
    );
    let wrong = stats(Some("fmk_not_a_key_0123456789abcdef".into()))
        .await
        .expect_err("wrong key");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(stats(Some(ADMIN_KEY.into())).await.is_ok());

    let created = server
        .admin()
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            organisation: "local".into(),
            role: pb::Role::Matcher as i32,
            label: "pipeline".into(),
        })
        .await
        .expect("create")
        .into_inner();
    let secret = created.secret.clone();
    assert!(secret.starts_with("fmk_"), "{secret}");
    assert!(stats(Some(secret.clone())).await.is_ok());
    let id = created.key.expect("key").id;
    let revoked = server
        .admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest { id })
        .await
        .expect("revoke")
        .into_inner();
    assert_ne!(revoked.revoked_ms, 0);
    let after = stats(Some(secret.clone())).await.expect_err("revoked");
    assert_eq!(after.code(), Code::Unauthenticated);
    let again = server
        .admin()
        .await
        .revoke_api_key(pb::RevokeApiKeyRequest { id })
        .await
        .expect_err("twice");
    assert_eq!(again.code(), Code::FailedPrecondition);

    // Health and reflection need no key.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "framematch.v1.Matcher".into(),
        })
        .await
        .expect("health without a key");

    // Keys survive a restart (only digests are stored) and the bootstrap key is not re-created.
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |config| config.bootstrap_admin_key = None).await;
    let keys = server
        .admin()
        .await
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .expect("list")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0].label, "bootstrap");
    assert_ne!(keys[1].revoked_ms, 0);
    let revoked_still = pb::banks_client::BanksClient::new(server.connect_as(Some(&secret)).await)
        .stats(pb::StatsRequest {})
        .await
        .expect_err("still revoked");
    assert_eq!(revoked_still.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_who_did_what() {
    let world = world().await;
    let server = &world.server;
    let entries = server
        .admin()
        .await
        .audit(pb::AuditRequest {
            bank: "beta-shared".into(),
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner()
        .entries;
    let kinds: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.kind.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![("bank_created", "beta"), ("reference_added", "beta")]
    );
    assert!(entries.iter().all(|e| e.actor_key != 0 && e.at_ms > 0));
    assert!(entries.iter().all(|e| e.bank == "beta-shared"));
    let all = server
        .admin()
        .await
        .audit(pb::AuditRequest::default())
        .await
        .expect("audit")
        .into_inner();
    let kinds: Vec<&str> = all.entries.iter().map(|e| e.kind.as_str()).collect();
    for kind in [
        "org_created",
        "key_created",
        "bank_created",
        "reference_added",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    // Paging: everything after the last entry is empty.
    let rest = server
        .admin()
        .await
        .audit(pb::AuditRequest {
            after_seq: all.last_seq,
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner();
    assert!(rest.entries.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_is_live_filtered_and_resumable() {
    let world = world().await;
    let server = &world.server;
    let mut feed = server
        .exchange_as(&world.keys["matcher"])
        .await
        .changes(pb::ChangesRequest { cursor: 0 })
        .await
        .expect("changes")
        .into_inner();
    // The history alpha may see: its own bank and beta's shared bank, never beta's private one.
    let mut last = 0;
    let mut history = Vec::new();
    while let Ok(event) = tokio::time::timeout(Duration::from_millis(1000), feed.message()).await {
        let Some(event) = event.expect("event") else {
            break;
        };
        assert!(event.seq >= last, "ordered");
        last = event.seq;
        history.push(event);
    }
    let names: Vec<String> = history
        .iter()
        .map(|e| match e.change.as_ref().expect("change") {
            pb::change_event::Change::Bank(b) => format!("bank {}", b.name),
            pb::change_event::Change::ReferenceAdded(r) => {
                assert_eq!(r.frames.len(), 1);
                assert_eq!(r.frames[0].pdq, hash(1).as_bytes().to_vec());
                format!("ref {}", r.reference.as_ref().expect("r").bank)
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        vec![
            "bank alpha-own",
            "bank beta-shared",
            "ref alpha-own",
            "ref beta-shared"
        ]
    );
    // Live: a reference added by beta to the shared bank arrives; one in the private bank does
    // not.
    add_reference_as(server, &world.beta_contributor, "beta-private", &hash(50))
        .await
        .expect("private add");
    let id = add_reference_as(server, &world.beta_contributor, "beta-shared", &hash(51))
        .await
        .expect("shared add");
    let event = tokio::time::timeout(Duration::from_secs(5), feed.message())
        .await
        .expect("live event within 5 s")
        .expect("stream")
        .expect("event");
    match event.change.expect("change") {
        pb::change_event::Change::ReferenceAdded(r) => {
            assert_eq!(r.reference.expect("reference").id, id);
            assert_eq!(r.frames[0].pdq, hash(51).as_bytes().to_vec());
        }
        other => panic!("expected the shared reference, got {other:?}"),
    }
    let resume_from = event.seq;
    // A withdrawal arrives too.
    server
        .banks_as(&world.beta_contributor)
        .await
        .withdraw_reference(pb::WithdrawReferenceRequest {
            reference_id: id,
            reason: "false positive".into(),
        })
        .await
        .expect("withdraw");
    let event = tokio::time::timeout(Duration::from_secs(5), feed.message())
        .await
        .expect("withdrawal within 5 s")
        .expect("stream")
        .expect("event");
    assert!(matches!(
        event.change,
        Some(pb::change_event::Change::ReferenceWithdrawn(_))
    ));
    drop(feed);
    // Resuming after the add's cursor starts with the withdrawal.
    let mut resumed = server
        .exchange_as(&world.keys["matcher"])
        .await
        .changes(pb::ChangesRequest {
            cursor: resume_from,
        })
        .await
        .expect("changes")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), resumed.message())
        .await
        .expect("event")
        .expect("stream")
        .expect("event");
    assert!(matches!(
        first.change,
        Some(pb::change_event::Change::ReferenceWithdrawn(_))
    ));
    // Sharing beta's private bank with alpha sends it with its active references; unsharing it
    // sends bank_hidden.
    let mut beta = server.banks_as(&world.beta_contributor).await;
    beta.update_bank(pb::UpdateBankRequest {
        bank: "beta-private".into(),
        visibility: pb::Visibility::Shared as i32,
        shared_with: vec!["alpha".into()],
    })
    .await
    .expect("share");
    let mut got = Vec::new();
    while got.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), resumed.message())
            .await
            .expect("event")
            .expect("stream")
            .expect("event");
        got.push(event.change.expect("change"));
    }
    assert!(matches!(&got[0], pb::change_event::Change::Bank(b) if b.name == "beta-private"));
    assert!(got[1..]
        .iter()
        .all(|c| matches!(c, pb::change_event::Change::ReferenceAdded(r) if r.reference.as_ref().is_some_and(|r| r.bank == "beta-private"))));
    beta.update_bank(pb::UpdateBankRequest {
        bank: "beta-private".into(),
        visibility: pb::Visibility::Private as i32,
        shared_with: Vec::new(),
    })
    .await
    .expect("unshare");
    let hidden = tokio::time::timeout(Duration::from_secs(5), resumed.message())
        .await
        .expect("event")
        .expect("stream")
        .expect("event");
    assert!(matches!(
        hidden.change,
        Some(pb::change_event::Change::BankHidden(_))
    ));
}

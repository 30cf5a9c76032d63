//! `framematch.v1.Admin`: organisations, API keys and the audit trail. Admin keys only.
//!
//! A new key's secret is generated here, returned once, and only its SHA-256 digest reaches the
//! store. Key changes are applied to this process's key ring right after they commit; other
//! replicas apply them from the change log.

use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::auth::{self, Caller};
use crate::model::{ApiKey, Change, ChangeKind, ChangeSeq, KeyId, NewApiKey, Role};
use crate::pb;
use crate::pb::admin_server::Admin;
use crate::telemetry::Rpc;

use super::{AppState, Catalog, Error};

/// Most audit entries one call returns.
pub const MAX_AUDIT_ENTRIES: usize = 10_000;

/// The Admin service.
#[derive(Clone)]
pub struct AdminService {
    state: AppState,
}

impl AdminService {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    fn admin_call<T>(
        &self,
        request: &Request<T>,
        rpc: Rpc,
    ) -> Result<(Caller, crate::telemetry::RpcCall), Status> {
        let caller = auth::caller_of(request)?;
        let call = self.state.rpc_call(rpc, &caller, request.metadata());
        Ok((caller, call))
    }
}

/// A role from the wire.
///
/// # Errors
/// [`Error::MissingField`] when unset, [`Error::InvalidField`] for an unknown value.
pub fn role_from_pb(value: i32) -> Result<Role, Error> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Matcher) => Ok(Role::Matcher),
        Ok(pb::Role::Contributor) => Ok(Role::Contributor),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Unspecified) => Err(Error::MissingField {
            field: "role (ROLE_MATCHER, ROLE_CONTRIBUTOR or ROLE_ADMIN)",
        }),
        Err(_) => Err(Error::InvalidField {
            field: "role",
            reason: format!("{value} is not a known role"),
        }),
    }
}

/// A role for the wire.
pub fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Matcher => pb::Role::Matcher,
        Role::Contributor => pb::Role::Contributor,
        Role::Admin => pb::Role::Admin,
    }
}

fn key_to_pb(catalog: &Catalog, key: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.0,
        organisation: catalog.org_name(key.org),
        role: role_to_pb(key.role) as i32,
        label: key.label.clone(),
        created_ms: key.created_ms,
        revoked_ms: key.revoked_ms.unwrap_or(0),
    }
}

/// The audit trail's text name of a change kind (the store's own names).
pub fn kind_name(kind: &ChangeKind) -> &'static str {
    match kind {
        ChangeKind::OrgCreated(_) => "org_created",
        ChangeKind::BankCreated(_) => "bank_created",
        ChangeKind::BankUpdated(_) => "bank_updated",
        ChangeKind::ReferenceAdded { .. } => "reference_added",
        ChangeKind::ReferenceWithdrawn { .. } => "reference_withdrawn",
        ChangeKind::KeyCreated { .. } => "key_created",
        ChangeKind::KeyRevoked { .. } => "key_revoked",
    }
}

fn audit_entry(catalog: &Catalog, change: &Change) -> pb::AuditEntry {
    let bank_name = |id| {
        catalog
            .bank(id)
            .map_or_else(|| format!("bank-{id}"), |b| b.name.clone())
    };
    let (bank, reference_id, key_id, organisation) = match &change.kind {
        ChangeKind::OrgCreated(org) => (String::new(), 0, 0, catalog.org_name(*org)),
        ChangeKind::BankCreated(bank) | ChangeKind::BankUpdated(bank) => {
            (bank_name(*bank), 0, 0, String::new())
        }
        ChangeKind::ReferenceAdded { reference, bank }
        | ChangeKind::ReferenceWithdrawn { reference, bank } => {
            (bank_name(*bank), reference.0, 0, String::new())
        }
        ChangeKind::KeyCreated { key, org } | ChangeKind::KeyRevoked { key, org } => {
            (String::new(), 0, key.0, catalog.org_name(*org))
        }
    };
    pb::AuditEntry {
        seq: change.seq.0,
        at_ms: change.at_ms,
        actor: catalog.org_name(change.actor.org),
        actor_key: change.actor.key.map_or(0, |k| k.0),
        kind: kind_name(&change.kind).to_string(),
        bank,
        reference_id,
        key_id,
        organisation,
        detail: change.detail.clone(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_organisation(
        &self,
        request: Request<pb::CreateOrganisationRequest>,
    ) -> Result<Response<pb::Organisation>, Status> {
        let (caller, call) = self.admin_call(&request, Rpc::CreateOrganisation)?;
        call.run(async {
            self.state.ensure_ready()?;
            caller.require(Role::Admin).map_err(Error::from)?;
            let pb::CreateOrganisationRequest { name } = request.into_inner();
            let started = Instant::now();
            let created = self
                .state
                .store
                .create_org(&name, Some(caller.actor()))
                .await;
            self.state
                .metrics
                .store_write("create_org", started.elapsed());
            let org = created.map_err(Error::from)?;
            self.state.note_change();
            self.state.catalog.write().insert_org(org.clone());
            Ok(Response::new(pb::Organisation {
                id: org.id.0,
                name: org.name,
            }))
        })
        .await
    }

    async fn list_organisations(
        &self,
        request: Request<pb::ListOrganisationsRequest>,
    ) -> Result<Response<pb::ListOrganisationsResponse>, Status> {
        let (caller, call) = self.admin_call(&request, Rpc::ListOrganisations)?;
        call.run(async {
            self.state.ensure_ready()?;
            caller.require(Role::Admin).map_err(Error::from)?;
            let orgs = self.state.store.list_orgs().await.map_err(Error::from)?;
            Ok(Response::new(pb::ListOrganisationsResponse {
                organisations: orgs
                    .into_iter()
                    .map(|org| pb::Organisation {
                        id: org.id.0,
                        name: org.name,
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let (caller, call) = self.admin_call(&request, Rpc::CreateApiKey)?;
        call.run(async {
            self.state.ensure_ready()?;
            caller.require(Role::Admin).map_err(Error::from)?;
            let pb::CreateApiKeyRequest {
                organisation,
                role,
                label,
            } = request.into_inner();
            let role = role_from_pb(role)?;
            if organisation.is_empty() {
                return Err(Error::MissingField {
                    field: "organisation",
                }
                .into());
            }
            let org = self
                .state
                .catalog
                .read()
                .org_id(&organisation)
                .ok_or(Error::UnknownOrg { name: organisation })?;
            let secret = auth::generate_secret();
            let started = Instant::now();
            let created = self
                .state
                .store
                .create_api_key(
                    NewApiKey {
                        org,
                        role,
                        digest: auth::digest(&secret),
                        label,
                    },
                    caller.actor(),
                )
                .await;
            self.state
                .metrics
                .store_write("create_api_key", started.elapsed());
            let key = created.map_err(Error::from)?;
            self.state.keys.write().apply(&key);
            self.state.note_change();
            tracing::info!(key = key.id.0, org = org.0, role = %role, "api key created");
            let catalog = self.state.catalog.read();
            Ok(Response::new(pb::CreateApiKeyResponse {
                key: Some(key_to_pb(&catalog, &key)),
                secret,
            }))
        })
        .await
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let (caller, call) = self.admin_call(&request, Rpc::RevokeApiKey)?;
        call.run(async {
            self.state.ensure_ready()?;
            caller.require(Role::Admin).map_err(Error::from)?;
            let pb::RevokeApiKeyRequest { id } = request.into_inner();
            let started = Instant::now();
            let revoked = self
                .state
                .store
                .revoke_api_key(KeyId(id), caller.actor())
                .await;
            self.state
                .metrics
                .store_write("revoke_api_key", started.elapsed());
            let key = revoked.map_err(Error::from)?;
            self.state.keys.write().apply(&key);
            self.state.note_change();
            tracing::info!(key = key.id.0, "api key revoked");
            let catalog = self.state.catalog.read();
            Ok(Response::new(key_to_pb(&catalog, &key)))
        })
        .await
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let (caller, call) = self.admin_call(&request, Rpc::ListApiKeys)?;
        call.run(async {
            self.state.ensure_ready()?;
            caller.require(Role::Admin).map_err(Error::from)?;
            let pb::ListApiKeysRequest { organisation } = request.into_inner();
            let only = if organisation.is_empty() {
                None
            } else {
                Some(
                    self.state
                        .catalog
                        .read()
                        .org_id(&organisation)
                        .ok_or(Error::UnknownOrg { name: organisation })?,
                )
            };
            let keys = self
                .state
                .store
                .list_api_keys()
                .await
                .map_err(Error::from)?;
            let catalog = self.state.catalog.read();
            Ok(Response::new(pb::ListApiKeysResponse {
                keys: keys
                    .iter()
                    .filter(|key| only.is_none_or(|org| key.org == org))
                    .map(|key| key_to_pb(&catalog, key))
                    .collect(),
            }))
        })
        .await
    }

    async fn audit(
        &self,
        request: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        let (caller, call) = self.admin_call(&request, Rpc::Audit)?;
        call.run(async {
            self.state.ensure_ready()?;
            caller.require(Role::Admin).map_err(Error::from)?;
            let pb::AuditRequest {
                bank,
                after_seq,
                limit,
            } = request.into_inner();
            let bank = if bank.is_empty() {
                None
            } else {
                Some(self.state.catalog.read().visible_bank(&caller, &bank)?.id)
            };
            let limit = match usize::try_from(limit) {
                Ok(0) | Err(_) => MAX_AUDIT_ENTRIES,
                Ok(n) => n.min(MAX_AUDIT_ENTRIES),
            };
            let changes = self
                .state
                .store
                .audit(bank, ChangeSeq(after_seq.max(0)), limit)
                .await
                .map_err(Error::from)?;
            let catalog = self.state.catalog.read();
            Ok(Response::new(pb::AuditResponse {
                last_seq: changes.last().map_or(0, |c| c.seq.0),
                entries: changes.iter().map(|c| audit_entry(&catalog, c)).collect(),
            }))
        })
        .await
    }
}

//! `framematch org`, `key`, `audit` and `stats`: administration of the server.

use super::*;

/// `framematch org …`
#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organisation; prints `id<TAB>name`.
    Create {
        /// Unique name.
        name: String,
    },
    /// List organisations: `id<TAB>name`.
    List,
}

/// `framematch key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key; prints `id<TAB>secret`. The secret is shown once: the server keeps only
    /// its digest.
    Create {
        /// The organisation it acts for.
        #[arg(long)]
        org: String,
        /// matcher, contributor or admin.
        #[arg(long)]
        role: crate::model::Role,
        /// Free text naming its use.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Revoke an API key: it stops working at once.
    Revoke {
        /// The key's id.
        id: i64,
    },
    /// List keys: `id<TAB>organisation<TAB>role<TAB>label<TAB>created_ms<TAB>active|revoked`.
    List {
        /// Only this organisation's keys.
        #[arg(long)]
        org: Option<String>,
    },
}

/// `framematch org …`
///
/// # Errors
/// Connection and RPC failures.
pub async fn org(command: OrgCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::admin_client::AdminClient::new(client::connect(server).await?);
    match command {
        OrgCommand::Create { name } => {
            let org = client
                .create_organisation(pb::CreateOrganisationRequest { name: name.clone() })
                .await
                .map_err(|s| rpc_error(format!("creating organisation {name}"), s))?
                .into_inner();
            crate::outln!("{}\t{}", org.id, org.name);
        }
        OrgCommand::List => {
            let orgs = client
                .list_organisations(pb::ListOrganisationsRequest {})
                .await
                .map_err(|s| rpc_error("listing organisations", s))?
                .into_inner()
                .organisations;
            for org in orgs {
                crate::outln!("{}\t{}", org.id, org.name);
            }
        }
    }
    Ok(())
}

/// `framematch key …`
///
/// # Errors
/// Connection and RPC failures.
pub async fn key(command: KeyCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::admin_client::AdminClient::new(client::connect(server).await?);
    match command {
        KeyCommand::Create { org, role, label } => {
            let created = client
                .create_api_key(pb::CreateApiKeyRequest {
                    organisation: org.clone(),
                    role: crate::api::admin::role_to_pb(role) as i32,
                    label,
                })
                .await
                .map_err(|s| rpc_error(format!("creating a {role} key for {org}"), s))?
                .into_inner();
            let id = created.key.map_or(0, |k| k.id);
            crate::outln!("{id}\t{}", created.secret);
        }
        KeyCommand::Revoke { id } => {
            client
                .revoke_api_key(pb::RevokeApiKeyRequest { id })
                .await
                .map_err(|s| rpc_error(format!("revoking key {id}"), s))?;
        }
        KeyCommand::List { org } => {
            let keys = client
                .list_api_keys(pb::ListApiKeysRequest {
                    organisation: org.unwrap_or_default(),
                })
                .await
                .map_err(|s| rpc_error("listing keys", s))?
                .into_inner()
                .keys;
            for key in keys {
                let role = crate::api::admin::role_from_pb(key.role)
                    .map_or("unspecified", crate::model::Role::as_str);
                crate::outln!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    key.id,
                    key.organisation,
                    role,
                    key.label,
                    key.created_ms,
                    if key.revoked_ms == 0 {
                        "active"
                    } else {
                        "revoked"
                    }
                );
            }
        }
    }
    Ok(())
}

/// `framematch audit …`: pages through the whole trail unless `limit` is given.
///
/// # Errors
/// Connection and RPC failures.
pub async fn audit(
    bank: Option<String>,
    after: i64,
    limit: Option<u32>,
    server: &ClientOptions,
) -> Result<(), Error> {
    let mut client = pb::admin_client::AdminClient::new(client::connect(server).await?);
    let mut after = after;
    let mut left = limit.map(u64::from);
    loop {
        let page = client
            .audit(pb::AuditRequest {
                bank: bank.clone().unwrap_or_default(),
                after_seq: after,
                limit: left.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            })
            .await
            .map_err(|s| rpc_error("reading the audit trail", s))?
            .into_inner();
        if page.entries.is_empty() {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        for entry in &page.entries {
            let line = format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                entry.seq,
                entry.at_ms,
                entry.actor,
                entry.actor_key,
                entry.kind,
                entry.bank,
                entry.reference_id,
                entry.key_id,
                entry.organisation,
                entry.detail.replace(['\t', '\n'], " ")
            );
            if stdout.write_all(line.as_bytes()).is_err() {
                // A closed pipe (`| head`): the reader has what it wanted.
                return Ok(());
            }
        }
        after = page.last_seq;
        if let Some(n) = &mut left {
            *n = n.saturating_sub(page.entries.len() as u64);
            if *n == 0 {
                return Ok(());
            }
        }
    }
}

/// `framematch stats`
///
/// # Errors
/// Connection and RPC failures.
pub async fn stats(server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(client::connect(server).await?);
    let s = client
        .stats(pb::StatsRequest {})
        .await
        .map_err(|s| rpc_error("reading stats", s))?
        .into_inner();
    crate::outln!("banks\t{}", s.banks);
    crate::outln!("active_references\t{}", s.active_references);
    crate::outln!("withdrawn_references\t{}", s.withdrawn_references);
    crate::outln!("stored_frames\t{}", s.stored_frames);
    crate::outln!("indexed_frames\t{}", s.indexed_frames);
    crate::outln!("index_tombstones\t{}", s.index_tombstones);
    crate::outln!("index_engine\t{}", s.index_engine);
    crate::outln!("index_memory_bytes\t{}", s.index_memory_bytes);
    crate::outln!("last_change_seq\t{}", s.last_change_seq);
    crate::outln!("open_streams\t{}", s.open_streams);
    Ok(())
}

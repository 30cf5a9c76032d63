//! Who is calling, and what they may do (issue #4, DESIGN.md §2).
//!
//! - API keys are random secrets (`fmk_` and 64 hex digits) sent as `authorization: Bearer
//!   <secret>`. The store keeps only their SHA-256 digest; the [`KeyRing`] keeps the digests of the
//!   working keys in memory, so authentication never touches the store (the match path stays
//!   store-free). A presented secret is digested, the digest's first 8 bytes pick a bucket, and
//!   every digest in that bucket is compared with [`subtle::ConstantTimeEq`]: the comparison of
//!   secret material takes the same time however many bytes agree.
//! - [`Authenticator`] is the tonic interceptor in front of every service except health and
//!   reflection: it turns the header into a [`Caller`] in the request's extensions, or answers
//!   UNAUTHENTICATED. With `--insecure-no-auth` every request is the default organisation's
//!   admin.
//! - [`Caller`] answers the authorisation questions: which banks may it see (match against, read,
//!   export, follow) and which may it change. Banks it may not see are reported as NOT_FOUND, so
//!   their existence does not leak; banks it sees but may not change are PERMISSION_DENIED.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::model::{Actor, ApiKey, Bank, KeyDigest, KeyId, OrgId, Role, Visibility};

/// Prefix of every secret this server generates, so that a leaked key is recognisable by secret
/// scanners.
pub const SECRET_PREFIX: &str = "fmk_";
/// Shortest secret accepted from `FRAMEMATCH_BOOTSTRAP_ADMIN_KEY`.
pub const MIN_SECRET_CHARS: usize = 24;
/// Longest secret accepted anywhere.
pub const MAX_SECRET_CHARS: usize = 256;

/// The UNAUTHENTICATED message for a request without the `authorization` metadata.
pub const MISSING_KEY: &str = "missing API key: send the metadata `authorization: Bearer <key>`";
/// The UNAUTHENTICATED message for a well-formed key that is not a working key.
pub const UNKNOWN_KEY: &str = "invalid or revoked API key";

/// The identity a request acts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The organisation it acts for.
    pub org: OrgId,
    /// What it may do.
    pub role: Role,
    /// The key it authenticated with (`None` under `--insecure-no-auth`).
    pub key: Option<KeyId>,
}

/// Why a caller may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The action needs a stronger role.
    #[error("this needs a {needed} key; the key used is a {actual} key")]
    Role {
        /// The weakest role allowed.
        needed: Role,
        /// The caller's role.
        actual: Role,
    },
    /// The bank is visible but belongs to another organisation.
    #[error(
        "bank {bank:?} belongs to another organisation; only its owner's contributors and admins may change it"
    )]
    NotOwner {
        /// The bank's name.
        bank: String,
    },
}

impl Caller {
    /// The change-log actor for writes made by this caller.
    pub const fn actor(&self) -> Actor {
        Actor {
            org: self.org,
            key: self.key,
        }
    }

    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Requires at least `needed`.
    ///
    /// # Errors
    /// [`Denied::Role`] when the caller's role is weaker.
    pub fn require(&self, needed: Role) -> Result<(), Denied> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(Denied::Role {
                needed,
                actual: self.role,
            })
        }
    }

    /// Whether the caller may see `bank`: match against it, read and export it, follow it.
    /// Admins see every bank; others see their own organisation's banks, public ones, and those
    /// shared with their organisation.
    pub fn can_see(&self, bank: &Bank) -> bool {
        self.is_admin()
            || bank.owner == self.org
            || match &bank.visibility {
                Visibility::Private => false,
                Visibility::Public => true,
                Visibility::SharedWith(orgs) => orgs.contains(&self.org),
            }
    }

    /// Whether the caller may change `bank` (add and withdraw references, change its
    /// visibility), given that it may see it.
    ///
    /// # Errors
    /// [`Denied::Role`] for a matcher key, [`Denied::NotOwner`] for a contributor of another
    /// organisation.
    pub fn may_change(&self, bank: &Bank) -> Result<(), Denied> {
        if self.is_admin() {
            return Ok(());
        }
        self.require(Role::Contributor)?;
        if bank.owner == self.org {
            Ok(())
        } else {
            Err(Denied::NotOwner {
                bank: bank.name.clone(),
            })
        }
    }
}

/// A freshly generated secret: `fmk_` and 32 random bytes in hex.
pub fn generate_secret() -> String {
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let mut secret = String::with_capacity(SECRET_PREFIX.len() + 64);
    secret.push_str(SECRET_PREFIX);
    for byte in bytes {
        secret.push_str(&format!("{byte:02x}"));
    }
    secret
}

/// SHA-256 of a secret: what the store keeps.
pub fn digest(secret: &str) -> KeyDigest {
    Sha256::digest(secret.as_bytes()).into()
}

/// Checks a secret chosen by an operator (`FRAMEMATCH_BOOTSTRAP_ADMIN_KEY`): long enough to
/// resist guessing, and sendable as an HTTP header value.
///
/// # Errors
/// A message saying what is wrong.
pub fn validate_secret(secret: &str) -> Result<(), String> {
    let chars = secret.chars().count();
    if chars < MIN_SECRET_CHARS {
        return Err(format!(
            "is {chars} characters; use at least {MIN_SECRET_CHARS} (e.g. the output of `openssl rand -hex 32`)"
        ));
    }
    if chars > MAX_SECRET_CHARS {
        return Err(format!(
            "is {chars} characters; at most {MAX_SECRET_CHARS} are accepted"
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".to_string());
    }
    Ok(())
}

/// One working key, as the ring holds it.
#[derive(Clone, Copy, Debug)]
struct RingEntry {
    id: KeyId,
    digest: KeyDigest,
    caller: Caller,
}

/// The working (not revoked) API keys, by digest, in memory.
#[derive(Debug, Default)]
pub struct KeyRing {
    buckets: HashMap<u64, Vec<RingEntry>>,
    by_id: HashMap<KeyId, u64>,
}

fn bucket_of(digest: &KeyDigest) -> u64 {
    let mut first = [0_u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

impl KeyRing {
    /// A ring of the given keys; revoked ones are left out.
    pub fn new(keys: impl IntoIterator<Item = ApiKey>) -> Self {
        let mut ring = Self::default();
        for key in keys {
            ring.apply(&key);
        }
        ring
    }

    /// Adds a key, or removes it when it is revoked. Idempotent, so replicas can apply the same
    /// change twice.
    pub fn apply(&mut self, key: &ApiKey) {
        self.remove(key.id);
        if key.revoked_ms.is_some() {
            return;
        }
        let bucket = bucket_of(&key.digest);
        self.buckets.entry(bucket).or_default().push(RingEntry {
            id: key.id,
            digest: key.digest,
            caller: Caller {
                org: key.org,
                role: key.role,
                key: Some(key.id),
            },
        });
        self.by_id.insert(key.id, bucket);
    }

    /// Forgets a key (revocation).
    pub fn remove(&mut self, id: KeyId) {
        if let Some(bucket) = self.by_id.remove(&id)
            && let Some(entries) = self.buckets.get_mut(&bucket)
        {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                self.buckets.remove(&bucket);
            }
        }
    }

    /// Number of working keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there is no working key.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The caller a secret authenticates, if it is a working key.
    pub fn authenticate(&self, secret: &str) -> Option<Caller> {
        let digest = digest(secret);
        let entries = self.buckets.get(&bucket_of(&digest))?;
        // Each candidate is compared in full, in constant time; a bucket holds one entry in all
        // but astronomically unlikely cases.
        let mut found = None;
        for entry in entries {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(entry.caller);
            }
        }
        found
    }
}

/// How requests are authenticated.
#[derive(Clone, Debug)]
pub enum AuthMode {
    /// API keys from the ring.
    Keys(Arc<RwLock<KeyRing>>),
    /// `--insecure-no-auth`: everyone is this organisation's admin.
    Insecure(OrgId),
}

/// The tonic interceptor: resolves `authorization: Bearer <secret>` into a [`Caller`] stored in
/// the request's extensions.
#[derive(Clone, Debug)]
pub struct Authenticator {
    mode: AuthMode,
}

impl Authenticator {
    /// An interceptor in the given mode.
    pub fn new(mode: AuthMode) -> Self {
        Self { mode }
    }

    /// The caller a request's metadata names.
    ///
    /// # Errors
    /// UNAUTHENTICATED with a message saying what to send.
    pub fn caller(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, Status> {
        let ring = match &self.mode {
            AuthMode::Insecure(org) => {
                return Ok(Caller {
                    org: *org,
                    role: Role::Admin,
                    key: None,
                });
            }
            AuthMode::Keys(ring) => ring,
        };
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated(MISSING_KEY))?;
        let text = header.to_str().map_err(|_| {
            Status::unauthenticated("the authorization metadata is not printable ASCII")
        })?;
        let secret = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata must be `Bearer <key>`")
            })?;
        if secret.is_empty() || secret.len() > MAX_SECRET_CHARS {
            return Err(Status::unauthenticated("invalid API key"));
        }
        ring.read()
            .authenticate(secret)
            .ok_or_else(|| Status::unauthenticated(UNKNOWN_KEY))
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller the interceptor attached to a request.
///
/// # Errors
/// INTERNAL when there is none: a service was mounted without the interceptor (a bug).
pub fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .copied()
        .ok_or_else(|| {
            tracing::error!("request reached a handler without passing authentication");
            Status::internal("internal error; the server log has the details")
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::BankId;
    use tonic::metadata::MetadataMap;

    fn key(id: i64, org: i64, role: Role, secret: &str) -> ApiKey {
        ApiKey {
            id: KeyId(id),
            org: OrgId(org),
            role,
            digest: digest(secret),
            label: String::new(),
            created_ms: 0,
            revoked_ms: None,
        }
    }

    fn bank(owner: i64, visibility: Visibility) -> Bank {
        Bank {
            id: BankId(1),
            name: "b".into(),
            category: crate::model::Category::Other,
            owner: OrgId(owner),
            visibility,
            description: String::new(),
            created_ms: 0,
            embedding_spaces: Vec::new(),
        }
    }

    #[test]
    fn secrets_are_random_and_well_formed() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX));
        assert_eq!(a.len(), SECRET_PREFIX.len() + 64);
        assert!(validate_secret(&a).is_ok());
        assert!(validate_secret("short").is_err());
        assert!(validate_secret(&"x y".repeat(10)).is_err());
    }

    #[test]
    fn the_ring_authenticates_working_keys_only() {
        let mut ring = KeyRing::new([
            key(1, 10, Role::Matcher, "secret-one-0123456789abcdef"),
            key(2, 20, Role::Admin, "secret-two-0123456789abcdef"),
        ]);
        assert_eq!(ring.len(), 2);
        let one = ring.authenticate("secret-one-0123456789abcdef");
        assert_eq!(
            one,
            Some(Caller {
                org: OrgId(10),
                role: Role::Matcher,
                key: Some(KeyId(1))
            })
        );
        assert_eq!(ring.authenticate("secret-one-0123456789abcdeF"), None);
        assert_eq!(ring.authenticate(""), None);
        let mut revoked = key(1, 10, Role::Matcher, "secret-one-0123456789abcdef");
        revoked.revoked_ms = Some(5);
        ring.apply(&revoked);
        assert_eq!(ring.authenticate("secret-one-0123456789abcdef"), None);
        assert_eq!(ring.len(), 1);
        // Applying the same change twice changes nothing.
        ring.apply(&revoked);
        assert_eq!(ring.len(), 1);
        assert!(ring.authenticate("secret-two-0123456789abcdef").is_some());
    }

    #[test]
    fn the_interceptor_reads_bearer_metadata() {
        let ring = Arc::new(RwLock::new(KeyRing::new([key(
            7,
            3,
            Role::Contributor,
            "abcdefghijklmnopqrstuvwxyz",
        )])));
        let auth = Authenticator::new(AuthMode::Keys(ring));
        let mut metadata = MetadataMap::new();
        let missing = auth.caller(&metadata).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("Bearer"));
        metadata.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(
            auth.caller(&metadata).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        metadata.insert("authorization", "Bearer wrong-key".parse().unwrap());
        assert_eq!(
            auth.caller(&metadata).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        metadata.insert(
            "authorization",
            "Bearer abcdefghijklmnopqrstuvwxyz".parse().unwrap(),
        );
        let caller = auth.caller(&metadata).unwrap();
        assert_eq!(caller.org, OrgId(3));
        assert_eq!(caller.role, Role::Contributor);

        let insecure = Authenticator::new(AuthMode::Insecure(OrgId(1)));
        assert_eq!(
            insecure.caller(&MetadataMap::new()).unwrap().role,
            Role::Admin
        );
    }

    #[test]
    fn visibility_and_ownership_rules() {
        let matcher = Caller {
            org: OrgId(2),
            role: Role::Matcher,
            key: Some(KeyId(1)),
        };
        let contributor = Caller {
            role: Role::Contributor,
            ..matcher
        };
        let admin = Caller {
            org: OrgId(9),
            role: Role::Admin,
            ..matcher
        };
        let own = bank(2, Visibility::Private);
        let foreign_private = bank(1, Visibility::Private);
        let shared_with_us = bank(1, Visibility::SharedWith(vec![OrgId(2), OrgId(3)]));
        let shared_elsewhere = bank(1, Visibility::SharedWith(vec![OrgId(3)]));
        let public = bank(1, Visibility::Public);
        for caller in [matcher, contributor] {
            assert!(caller.can_see(&own));
            assert!(!caller.can_see(&foreign_private));
            assert!(caller.can_see(&shared_with_us));
            assert!(!caller.can_see(&shared_elsewhere));
            assert!(caller.can_see(&public));
        }
        assert!(admin.can_see(&foreign_private));
        assert!(matches!(matcher.may_change(&own), Err(Denied::Role { .. })));
        assert!(contributor.may_change(&own).is_ok());
        assert!(matches!(
            contributor.may_change(&public),
            Err(Denied::NotOwner { .. })
        ));
        assert!(admin.may_change(&public).is_ok());
        assert!(matcher.require(Role::Matcher).is_ok());
        assert!(matcher.require(Role::Admin).is_err());
    }
}

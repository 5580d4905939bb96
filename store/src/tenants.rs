//! Tenants and their API keys: creation, and authentication by key hash.

use rand::Rng;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::Cached;
use crate::tenancy::Quotas;
use crate::{Error, Scope, Store, Tx, scoped};

/// A tenant as request handling needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub tier: String,
    /// active or suspended (deleted tenants do not authenticate).
    pub status: String,
    pub quotas: Quotas,
}

impl Tenant {
    pub fn is_suspended(&self) -> bool {
        self.status == "suspended"
    }
}

/// A new tenant with its API key, shown once.
#[derive(Debug, Clone)]
pub struct TenantWithKey {
    pub tenant: Tenant,
    pub api_key: String,
}

impl Store {
    /// Creates a tenant and its first API key; only the key's hash is stored.
    pub async fn create_tenant(
        &self,
        slug: &str,
        tier: &str,
        quotas: Quotas,
    ) -> Result<TenantWithKey, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::System).await?;
        if transaction
            .query_opt_c("SELECT 1 FROM tiers WHERE name = $1", &[&tier])
            .await?
            .is_none()
        {
            return Err(Error::Invalid {
                field: "tier".into(),
                message: format!("unknown tier `{tier}`"),
            });
        }
        let tenant_id = Uuid::now_v7();
        let inserted = transaction
            .execute_c(
                "INSERT INTO tenants (id, slug, tier, inflight_max, dispatch_rate_per_s, running_instances_max, \
                 payload_bytes_max) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (slug) DO NOTHING",
                &[
                    &tenant_id,
                    &slug,
                    &tier,
                    &quotas.inflight_max,
                    &quotas.dispatch_rate_per_s,
                    &quotas.running_instances_max,
                    &quotas.payload_bytes_max,
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(Error::TenantExists(slug.to_owned()));
        }
        let (_, api_key) = issue_key(&transaction, tenant_id).await?;
        transaction.commit().await?;
        Ok(TenantWithKey {
            tenant: Tenant {
                id: tenant_id,
                slug: slug.to_owned(),
                tier: tier.to_owned(),
                status: "active".to_owned(),
                quotas,
            },
            api_key,
        })
    }

    /// The tenant owning the unrevoked key whose hash (`key_hash`) is
    /// `hash`, if any.
    pub async fn tenant_for_key_hash(&self, hash: &[u8]) -> Result<Option<Tenant>, Error> {
        // One statement, no transaction: the function sees across tenants.
        let client = self.pool.get().await?;
        let row = client
            .query_opt_c(
                "SELECT id, slug, tier, status, inflight_max, dispatch_rate_per_s, \
                 running_instances_max, payload_bytes_max FROM ward_tenant_for_key($1)",
                &[&hash],
            )
            .await?;
        Ok(row.map(|row| Tenant {
            id: row.get(0),
            slug: row.get(1),
            tier: row.get(2),
            status: row.get(3),
            quotas: Quotas {
                inflight_max: row.get(4),
                dispatch_rate_per_s: row.get(5),
                running_instances_max: row.get(6),
                payload_bytes_max: row.get(7),
            },
        }))
    }
}

/// Issues a key for `tenant_id` in `transaction`: stores its hash and
/// prefix, returns its record and the key itself (shown once).
pub(crate) async fn issue_key(
    transaction: &Tx,
    tenant_id: Uuid,
) -> Result<(crate::KeyRecord, String), Error> {
    let (api_key, prefix) = new_api_key();
    let key_id = Uuid::now_v7();
    let created_at = transaction
        .query_one_c(
            "INSERT INTO api_keys (id, tenant_id, prefix, key_hash) VALUES ($1, $2, $3, $4) RETURNING created_at",
            &[&key_id, &tenant_id, &prefix, &key_hash(&api_key)],
        )
        .await?
        .get(0);
    Ok((
        crate::KeyRecord {
            id: key_id,
            prefix,
            created_at,
            revoked_at: None,
        },
        api_key,
    ))
}

/// A key looks like `ward_<8 hex prefix>_<32 hex secret>`; the prefix is
/// stored in clear so an operator can tell keys apart.
fn new_api_key() -> (String, String) {
    let mut rng = rand::rng();
    let prefix: [u8; 4] = rng.random();
    let secret: [u8; 16] = rng.random();
    let prefix = hex::encode(prefix);
    (format!("ward_{prefix}_{}", hex::encode(secret)), prefix)
}

/// The hash an API key is stored and looked up by (SHA-256).
pub fn key_hash(api_key: &str) -> Vec<u8> {
    Sha256::digest(api_key.as_bytes()).to_vec()
}

//! Tenants and their API keys: creation, and authentication by key hash.

use rand::Rng;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{Error, Scope, Store, scoped};

/// A tenant as request handling needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub tier: String,
}

/// A new tenant with its API key, shown once.
#[derive(Debug, Clone)]
pub struct TenantWithKey {
    pub tenant: Tenant,
    pub api_key: String,
}

impl Store {
    /// Creates a tenant and its first API key; only the key's hash is stored.
    pub async fn create_tenant(&self, slug: &str, tier: &str) -> Result<TenantWithKey, Error> {
        let mut client = self.pool.get().await?;
        let transaction = scoped(&mut client, Scope::System).await?;
        let tenant_id = Uuid::now_v7();
        let inserted = transaction
            .execute(
                "INSERT INTO tenants (id, slug, tier) VALUES ($1, $2, $3) ON CONFLICT (slug) DO NOTHING",
                &[&tenant_id, &slug, &tier],
            )
            .await?;
        if inserted == 0 {
            return Err(Error::TenantExists(slug.to_owned()));
        }
        let (api_key, prefix) = new_api_key();
        transaction
            .execute(
                "INSERT INTO api_keys (id, tenant_id, prefix, key_hash) VALUES ($1, $2, $3, $4)",
                &[&Uuid::now_v7(), &tenant_id, &prefix, &hash_key(&api_key)],
            )
            .await?;
        transaction.commit().await?;
        Ok(TenantWithKey {
            tenant: Tenant {
                id: tenant_id,
                slug: slug.to_owned(),
                tier: tier.to_owned(),
            },
            api_key,
        })
    }

    /// The active tenant owning an unrevoked key, if any.
    pub async fn tenant_for_key(&self, api_key: &str) -> Result<Option<Tenant>, Error> {
        let mut client = self.pool.get().await?;
        let client = scoped(&mut client, Scope::System).await?;
        let row = client
            .query_opt(
                "SELECT t.id, t.slug, t.tier FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
                 WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND t.status = 'active'",
                &[&hash_key(api_key)],
            )
            .await?;
        Ok(row.map(|row| Tenant {
            id: row.get(0),
            slug: row.get(1),
            tier: row.get(2),
        }))
    }
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

fn hash_key(api_key: &str) -> Vec<u8> {
    Sha256::digest(api_key.as_bytes()).to_vec()
}

//! Leases in a KV bucket: held by creating a key, kept by compare-and-swap renewals, lost to
//! whoever creates the key after it expired (the bucket's age limit) or was given up.

use async_nats::jetstream::kv;
use bus_schema::LeaseRecord;

use crate::bus::Error;
use crate::time::now;

/// A lease this process holds.
pub struct Lease {
    store: kv::Store,
    key: String,
    holder: String,
    revision: u64,
}

impl Lease {
    /// Takes the lease `key` for `holder` if nobody holds it; `None` if somebody does.
    pub async fn try_acquire(store: &kv::Store, key: &str, holder: &str) -> Result<Option<Lease>, Error> {
        let value = bus_schema::encode(&LeaseRecord {
            holder: holder.to_owned(),
            since: now(),
        });
        match store.create(key, value.into()).await {
            Ok(revision) => Ok(Some(Lease {
                store: store.clone(),
                key: key.to_owned(),
                holder: holder.to_owned(),
                revision,
            })),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(error) => Err(Error::nats(format!("taking lease {key}"), error)),
        }
    }

    /// Renews the lease. `Ok(false)` means it was lost: it expired and someone else took it.
    pub async fn renew(&mut self) -> Result<bool, Error> {
        let value = bus_schema::encode(&LeaseRecord {
            holder: self.holder.clone(),
            since: now(),
        });
        match self.store.update(&self.key, value.into(), self.revision).await {
            Ok(revision) => {
                self.revision = revision;
                Ok(true)
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(error) => Err(Error::nats(format!("renewing lease {}", self.key), error)),
        }
    }

    /// Gives the lease up so another holder can take it at once.
    pub async fn release(self) {
        if let Err(error) = self
            .store
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
        {
            tracing::debug!(key = %self.key, %error, "lease not released; it will expire");
        }
    }
}

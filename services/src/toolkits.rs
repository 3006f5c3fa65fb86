//! Toolkits: versioned bundles of files (host binaries, extensions) that masters publish to
//! the JetStream object store and agents fetch, verify and unpack on first use.
//!
//! A toolkit `N@V` is the object `N@V` of the `yard-toolkits` store: a tar archive of a
//! directory, with its SHA-256 in the object's metadata under `sha256`.

use std::path::Path;

use async_nats::jetstream::object_store::{ObjectMetadata, ObjectStore};
use bus_schema::subjects;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::bus::{Bus, Error};

/// Metadata key of a toolkit's SHA-256 (hex).
pub const DIGEST_KEY: &str = "sha256";

/// A published toolkit, as `GET /api/v1/toolkits` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ToolkitInfo {
    pub name: String,
    pub version: String,
    pub size: usize,
    pub sha256: String,
}

/// Splits `N@V` into its name and version; `None` unless both are non-empty tokens (a
/// version may also hold dots).
pub fn parse_spec(spec: &str) -> Option<(&str, &str)> {
    let (name, version) = spec.split_once('@')?;
    let version_ok = !version.is_empty()
        && version.len() <= 64
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !version.starts_with('.');
    (subjects::is_valid_token(name) && version_ok).then_some((name, version))
}

/// The SHA-256 of `bytes`, in hex.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A tar archive of everything under `dir` (paths relative to it).
pub fn pack(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    archive.follow_symlinks(false);
    archive.append_dir_all(".", dir)?;
    archive.into_inner()
}

/// Unpacks a toolkit archive into `dir` (which must not exist yet).
pub fn unpack(bytes: &[u8], dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    tar::Archive::new(bytes).unpack(dir)
}

pub async fn store(bus: &Bus, replicas: usize) -> Result<ObjectStore, Error> {
    bus.object_store(subjects::TOOLKITS_BUCKET, replicas).await
}

/// Publishes the directory `dir` as toolkit `name@version`; returns its SHA-256.
pub async fn push(
    bus: &Bus,
    replicas: usize,
    name: &str,
    version: &str,
    dir: &Path,
) -> Result<String, Error> {
    let spec = format!("{name}@{version}");
    if parse_spec(&spec).is_none() {
        return Err(Error::BadToolkit(format!(
            "{spec:?}: a toolkit is NAME@VERSION, the name of letters, digits, `-` and `_`, the version also with dots"
        )));
    }
    let bytes =
        pack(dir).map_err(|error| Error::BadToolkit(format!("cannot pack {}: {error}", dir.display())))?;
    let sha256 = digest(&bytes);
    let metadata = ObjectMetadata {
        name: spec.clone(),
        description: Some(format!("toolkit {spec}")),
        metadata: [(DIGEST_KEY.to_owned(), sha256.clone())].into(),
        ..Default::default()
    };
    store(bus, replicas)
        .await?
        .put(metadata, &mut bytes.as_slice())
        .await
        .map_err(|e| Error::nats(format!("storing toolkit {spec}"), e))?;
    Ok(sha256)
}

/// Every published toolkit.
pub async fn list(bus: &Bus, replicas: usize) -> Result<Vec<ToolkitInfo>, Error> {
    let mut objects = store(bus, replicas)
        .await?
        .list()
        .await
        .map_err(|e| Error::nats("listing toolkits", e))?;
    let mut toolkits = Vec::new();
    while let Some(object) = objects.next().await {
        let object = object.map_err(|e| Error::nats("listing toolkits", e))?;
        if object.deleted {
            continue;
        }
        if let Some((name, version)) = parse_spec(&object.name) {
            toolkits.push(ToolkitInfo {
                name: name.to_owned(),
                version: version.to_owned(),
                size: object.size,
                sha256: object.metadata.get(DIGEST_KEY).cloned().unwrap_or_default(),
            });
        }
    }
    toolkits.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    Ok(toolkits)
}

/// Downloads toolkit `spec` and checks it against its recorded digest; the error says what
/// is wrong (missing, unreadable, corrupt).
pub async fn fetch(store: &ObjectStore, spec: &str) -> Result<Vec<u8>, String> {
    let mut object = store
        .get(spec)
        .await
        .map_err(|error| format!("toolkit {spec} is not published: {error}"))?;
    let expected = object
        .info()
        .metadata
        .get(DIGEST_KEY)
        .cloned()
        .ok_or_else(|| format!("toolkit {spec} has no recorded digest"))?;
    let mut bytes = Vec::new();
    object
        .read_to_end(&mut bytes)
        .await
        .map_err(|error| format!("toolkit {spec} could not be downloaded: {error}"))?;
    let found = digest(&bytes);
    if found != expected {
        return Err(format!(
            "toolkit {spec} is corrupt: its SHA-256 is {found}, the published one {expected}"
        ));
    }
    Ok(bytes)
}

//! The agent's toolkit cache, one per deployment it serves: `<workdir>/<instance>/toolkits/
//! NAME@VERSION/`. A toolkit is fetched on first use (steps needing the same missing toolkit
//! wait for one download), verified against its digest, unpacked into a temporary directory
//! and renamed into place, and evicted least recently used once the cache outgrows its limit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::object_store::ObjectStore;
use bus_schema::subjects;
use services::Bus;

/// Marks a toolkit directory as completely unpacked; its modification time is the last use.
const COMPLETE: &str = ".yard-complete";

pub(crate) struct ToolkitCache {
    root: PathBuf,
    limit_bytes: u64,
    store: tokio::sync::OnceCell<ObjectStore>,
    /// One lock per toolkit, so that one download serves every step waiting for it.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ToolkitCache {
    pub(crate) fn new(root: PathBuf, limit_bytes: u64) -> ToolkitCache {
        ToolkitCache {
            root,
            limit_bytes,
            store: tokio::sync::OnceCell::new(),
            fetching: Mutex::new(HashMap::new()),
        }
    }

    /// The directory of toolkit `spec`, fetched and unpacked first if needed. The error says
    /// what is wrong; nothing half-fetched stays behind, so the next use fetches again.
    pub(crate) async fn ensure(&self, bus: &Bus, spec: &str) -> Result<PathBuf, String> {
        if services::toolkits::parse_spec(spec).is_none() {
            return Err(format!("{spec:?} is not a toolkit (NAME@VERSION)"));
        }
        let dir = self.root.join(spec);
        let lock = {
            let mut fetching = self
                .fetching
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(fetching.entry(spec.to_owned()).or_default())
        };
        let _one_download = lock.lock().await;
        let marker = dir.join(COMPLETE);
        if marker.is_file() {
            touch(&marker);
            return Ok(dir);
        }
        let store = self
            .store
            .get_or_try_init(|| async {
                bus.jetstream
                    .get_object_store(subjects::TOOLKITS_BUCKET)
                    .await
                    .map_err(|error| format!("no toolkits are published in this deployment: {error}"))
            })
            .await?;
        tracing::info!(toolkit = %spec, "fetching a toolkit");
        let bytes = services::toolkits::fetch(store, spec).await?;
        let (root, dir_for_unpack) = (self.root.clone(), dir.clone());
        let (limit, keep) = (self.limit_bytes, spec.to_owned());
        tokio::task::spawn_blocking(move || {
            install(&root, &dir_for_unpack, &bytes)?;
            evict(&root, limit, &keep);
            Ok::<(), String>(())
        })
        .await
        .map_err(|error| format!("unpacking toolkit {spec} stopped: {error}"))??;
        Ok(dir)
    }
}

/// Unpacks `bytes` beside `dir`, then renames it into place.
fn install(root: &Path, dir: &Path, bytes: &[u8]) -> Result<(), String> {
    let staging = root.join(format!(".staging-{}", ulid::Ulid::new()));
    let result = services::toolkits::unpack(bytes, &staging)
        .and_then(|()| std::fs::write(staging.join(COMPLETE), b""))
        .and_then(|()| {
            if dir.exists() {
                // Left by a crash before its marker was written.
                std::fs::remove_dir_all(dir)?;
            }
            std::fs::rename(&staging, dir)
        });
    if let Err(error) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(format!("cannot unpack toolkit into {}: {error}", dir.display()));
    }
    Ok(())
}

fn touch(marker: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(marker) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Removes the least recently used toolkits (never `keep`) while the cache is over `limit`.
fn evict(root: &Path, limit: u64, keep: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut toolkits: Vec<(std::time::SystemTime, u64, PathBuf, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let used = std::fs::metadata(entry.path().join(COMPLETE))
                .ok()?
                .modified()
                .ok()?;
            Some((used, size_of(&entry.path()), entry.path(), name))
        })
        .collect();
    let mut total: u64 = toolkits.iter().map(|(_, size, _, _)| size).sum();
    toolkits.sort();
    for (_, size, path, name) in toolkits {
        if total <= limit {
            break;
        }
        if name == keep {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                total = total.saturating_sub(size);
                tracing::info!(toolkit = %name, size, "evicted a toolkit: the cache is over its limit");
            }
            Err(error) => tracing::warn!(toolkit = %name, %error, "cannot evict a toolkit"),
        }
    }
}

fn size_of(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| size_of(&entry.path()))
                    .sum()
            })
            .unwrap_or(0),
        Ok(metadata) => metadata.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toolkit(root: &Path, name: &str, bytes: usize, used_secs_ago: u64) {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/tool"), vec![b'x'; bytes]).unwrap();
        let marker = dir.join(COMPLETE);
        std::fs::write(&marker, b"").unwrap();
        let used = std::time::SystemTime::now() - std::time::Duration::from_secs(used_secs_ago);
        std::fs::File::options()
            .write(true)
            .open(&marker)
            .unwrap()
            .set_modified(used)
            .unwrap();
    }

    #[test]
    fn the_least_recently_used_toolkits_go_first_and_the_one_just_fetched_stays() {
        let root = tempfile::tempdir().unwrap();
        toolkit(root.path(), "old@1", 1000, 300);
        toolkit(root.path(), "older@1", 1000, 600);
        toolkit(root.path(), "new@1", 1000, 10);
        toolkit(root.path(), "just-fetched@1", 1000, 900);
        evict(root.path(), 2500, "just-fetched@1");
        let left: std::collections::BTreeSet<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            ["new@1", "just-fetched@1"].map(String::from).into(),
            "the two least recently used were evicted, never the one just fetched"
        );
    }

    #[test]
    fn a_cache_under_its_limit_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        toolkit(root.path(), "a@1", 100, 600);
        toolkit(root.path(), "b@1", 100, 10);
        evict(root.path(), 10_000, "b@1");
        assert!(root.path().join("a@1").is_dir() && root.path().join("b@1").is_dir());
    }
}

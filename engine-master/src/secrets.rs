//! Builder secrets: their values, read on this engine master each time a step is assigned (so
//! a rotated file or a changed variable counts from the next step on).
//!
//! A value goes only into the step's assignment, a core request to its agent, together with
//! the list of values the agent masks in the step's log; it is never put in a stored message.
//! A secret that cannot be read fails the step with a message naming the secret and its
//! source, never a value.

use std::collections::BTreeMap;

use services::config::SecretSource;

/// Reads every secret; the error names the first secret that cannot be read and why.
pub(crate) async fn resolve(
    secrets: &BTreeMap<String, SecretSource>,
) -> Result<BTreeMap<String, String>, String> {
    let mut values = BTreeMap::new();
    for (name, source) in secrets {
        let value = read(source)
            .await
            .map_err(|problem| format!("secret {name} ({source}): {problem}"))?;
        values.insert(name.clone(), value);
    }
    Ok(values)
}

/// `text` with every secret value of at least [`bus_schema::MIN_MASKED_BYTES`] bytes replaced
/// by `***`, longest first, for the engine's own messages that quote another party's text.
pub(crate) fn redact(text: &str, secrets: &BTreeMap<String, String>) -> String {
    let mut values: Vec<&str> = secrets
        .values()
        .map(String::as_str)
        .filter(|value| value.len() >= bus_schema::MIN_MASKED_BYTES)
        .collect();
    values.sort_by_key(|value| std::cmp::Reverse(value.len()));
    values
        .into_iter()
        .fold(text.to_owned(), |text, value| text.replace(value, "***"))
}

/// One secret's value. The errors describe the source only: a variable that is not valid
/// UTF-8 or a file that is not text is refused without quoting what it holds.
async fn read(source: &SecretSource) -> Result<String, String> {
    match (&source.env, &source.file) {
        (Some(variable), None) => match std::env::var(variable) {
            Ok(value) => Ok(value),
            Err(std::env::VarError::NotPresent) => Err("not set in this engine master's environment".into()),
            Err(std::env::VarError::NotUnicode(_)) => Err("not valid UTF-8".into()),
        },
        (None, Some(path)) => {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|error| format!("cannot be read on this engine master: {error}"))?;
            let mut text = String::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_owned())?;
            let kept = text.trim_end_matches(['\n', '\r']).len();
            text.truncate(kept);
            Ok(text)
        }
        _ => Err("give exactly one source, `env` or `file`".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(entries: &[(&str, SecretSource)]) -> BTreeMap<String, SecretSource> {
        entries
            .iter()
            .map(|(name, source)| ((*name).to_owned(), source.clone()))
            .collect()
    }

    fn env(variable: &str) -> SecretSource {
        SecretSource {
            env: Some(variable.into()),
            file: None,
        }
    }

    fn file(path: &std::path::Path) -> SecretSource {
        SecretSource {
            env: None,
            file: Some(path.to_owned()),
        }
    }

    #[tokio::test]
    async fn values_come_from_the_environment_and_from_files() {
        let path = std::env::temp_dir().join(format!("yard-secret-{}", ulid::Ulid::new()));
        std::fs::write(&path, "  from a file \r\n\n").unwrap();
        let values = resolve(&secrets(&[("FROM_ENV", env("PATH")), ("FROM_FILE", file(&path))])).await;
        // A rotated file counts from the next read on.
        std::fs::write(&path, "rotated\nsecond line\n").unwrap();
        let rotated = resolve(&secrets(&[("FROM_FILE", file(&path))])).await;
        let _ = std::fs::remove_file(&path);
        let values = values.unwrap();
        assert_eq!(values["FROM_ENV"], std::env::var("PATH").unwrap());
        assert_eq!(values["FROM_FILE"], "  from a file ");
        assert_eq!(rotated.unwrap()["FROM_FILE"], "rotated\nsecond line");
    }

    #[tokio::test]
    async fn a_missing_source_names_the_secret_and_the_source() {
        let variable = format!("YARD_TEST_UNSET_{}", ulid::Ulid::new());
        let error = resolve(&secrets(&[("TOKEN", env(&variable))])).await.unwrap_err();
        assert_eq!(
            error,
            format!(
                "secret TOKEN (environment variable {variable}): not set in this engine master's environment"
            )
        );
        let missing = std::path::Path::new("/nonexistent/yard/secret");
        let error = resolve(&secrets(&[("KEY", file(missing))])).await.unwrap_err();
        assert!(
            error.starts_with(
                "secret KEY (file /nonexistent/yard/secret): cannot be read on this engine master: "
            ),
            "{error}"
        );
    }

    #[test]
    fn quoted_text_is_redacted() {
        let values: BTreeMap<String, String> = [("A", "password"), ("B", "password1234"), ("C", "ab")]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        assert_eq!(
            redact("invalid type: \"password1234\" or password, ab", &values),
            "invalid type: \"***\" or ***, ab"
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_text_is_refused_without_quoting_it() {
        let path = std::env::temp_dir().join(format!("yard-secret-{}", ulid::Ulid::new()));
        std::fs::write(&path, b"abc\xffdef").unwrap();
        let error = resolve(&secrets(&[("KEY", file(&path))])).await.unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(
            error.ends_with(": not valid UTF-8") && !error.contains("abc"),
            "{error}"
        );
    }
}

//! Masking secret values in a step's log lines and result message.
//!
//! Every occurrence of every secret is covered, overlapping ones included, and each run of
//! covered bytes becomes one `***`: no piece of a secret survives, even where two secrets
//! overlap or one contains another. Values shorter than [`MIN_MASKED_BYTES`] are not masked
//! (they would garble every line holding those characters); a value spanning several lines is
//! also masked line by line, since the log is cut into lines before it is masked.

use std::borrow::Cow;

use bus_schema::MIN_MASKED_BYTES;

/// What a masked stretch of text becomes.
pub(crate) const MASK: &str = "***";

/// The secret values of one step.
#[derive(Debug, Clone, Default)]
pub(crate) struct Masker {
    values: Vec<String>,
}

impl Masker {
    pub(crate) fn new(values: &[String]) -> Masker {
        let mut masked: Vec<String> = Vec::new();
        for value in values {
            let lines = value
                .split('\n')
                .map(|line| line.strip_suffix('\r').unwrap_or(line));
            for candidate in std::iter::once(value.as_str()).chain(lines) {
                if candidate.len() >= MIN_MASKED_BYTES && !masked.iter().any(|known| known == candidate) {
                    masked.push(candidate.to_owned());
                }
            }
        }
        Masker { values: masked }
    }

    /// `text` with every secret value in it replaced by `***`.
    pub(crate) fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        // Byte ranges covered by an occurrence of some value, merged where they overlap or
        // touch.
        let mut covered: Vec<(usize, usize)> = Vec::new();
        for value in &self.values {
            let mut from = 0;
            while let Some(found) = text[from..].find(value.as_str()) {
                let start = from + found;
                covered.push((start, start + value.len()));
                // Occurrences may overlap ("aaa" twice in "aaaa"): look again one character on.
                from = start + text[start..].chars().next().map_or(1, char::len_utf8);
            }
        }
        if covered.is_empty() {
            return Cow::Borrowed(text);
        }
        covered.sort_unstable();
        let mut out = String::with_capacity(text.len());
        // Where the last `***` written ends in `text`.
        let mut masked_to: Option<usize> = None;
        for (start, end) in covered {
            match masked_to {
                Some(masked) if start <= masked => masked_to = Some(masked.max(end)),
                _ => {
                    out.push_str(&text[masked_to.unwrap_or(0)..start]);
                    out.push_str(MASK);
                    masked_to = Some(end);
                }
            }
        }
        out.push_str(&text[masked_to.unwrap_or(0)..]);
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(values: &[&str]) -> Masker {
        Masker::new(&values.iter().map(|value| (*value).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn every_occurrence_is_masked_wherever_it_is() {
        let masker = masker(&["s3cr3t"]);
        assert_eq!(masker.mask("token=s3cr3t"), "token=***");
        assert_eq!(masker.mask("s3cr3t at the start"), "*** at the start");
        assert_eq!(masker.mask("s3cr3t"), "***");
        assert_eq!(
            masker.mask("a s3cr3t, b s3cr3t and c s3cr3t."),
            "a ***, b *** and c ***."
        );
        assert_eq!(masker.mask("s3cr3ts3cr3t"), "***");
        assert_eq!(masker.mask("nothing here: s3cr3"), "nothing here: s3cr3");
        assert!(matches!(masker.mask("untouched"), Cow::Borrowed("untouched")));
    }

    #[test]
    fn overlapping_and_nested_values_leave_no_piece_behind() {
        // Masking one value after the other would leave "ef" of "cdef", or "ab" of "abcd".
        let overlapping = masker(&["abcd", "cdef"]);
        assert_eq!(overlapping.mask("xabcdefx"), "x***x");
        assert_eq!(overlapping.mask("cdef abcd"), "*** ***");
        let nested = masker(&["password", "password1234"]);
        assert_eq!(nested.mask("the password1234 and password"), "the *** and ***");
        // Overlapping occurrences of one value.
        let repeated = masker(&["aaa"]);
        assert_eq!(repeated.mask("baaaab"), "b***b");
    }

    #[test]
    fn short_and_empty_values_are_not_masked() {
        let short = masker(&["", "1", "ab", "abc"]);
        assert_eq!(short.mask("1 ab abc"), "1 ab ***");
        assert_eq!(masker(&["", "x"]).mask("x  "), "x  ");
    }

    #[test]
    fn multi_line_values_are_masked_line_by_line() {
        let masker = masker(&["-----BEGIN KEY-----\r\nbm90IGEga2V5\nx\n-----END KEY-----"]);
        assert_eq!(masker.mask("-----BEGIN KEY-----"), "***");
        assert_eq!(masker.mask("  bm90IGEga2V5"), "  ***");
        assert_eq!(masker.mask("x"), "x");
        assert_eq!(masker.mask("-----END KEY----- done"), "*** done");
    }

    #[test]
    fn non_ascii_text_and_values_stay_valid() {
        let masker = masker(&["pässwörd", "ééé"]);
        assert_eq!(masker.mask("→pässwörd←"), "→***←");
        assert_eq!(masker.mask("éééé"), "***");
    }
}

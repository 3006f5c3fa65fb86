//! The `agents` expression language that selects which agents may run a builder or step.
//!
//! Grammar (`||` binds loosest):
//! ```text
//! expr    := and ( "||" and )*
//! and     := unary ( "&&" unary )*
//! unary   := "!" unary | primary
//! primary := "(" expr ")" | IDENT [ ("==" | "!=") STRING ]
//! ```
//! `IDENT` is a label name (`name` is the agent's own name); a bare `IDENT` tests that the
//! label is present. `STRING` is double- or single-quoted with `\` escapes. An empty
//! expression matches every agent. `(` and `!` nest at most [`MAX_NESTING`] deep.

use std::collections::BTreeMap;
use std::fmt;

/// How deep `(` and `!` may nest in an expression. Parsing, matching and dropping a selector
/// recurse once per level, so an expression nested deeper (in a property substituted into an
/// `agents` expression, say) would overflow the stack; it is a syntax error instead.
pub const MAX_NESTING: usize = 100;

/// A parsed `agents` expression.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSelector {
    source: String,
    expr: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Present(String),
    Equals(String, String),
    NotEquals(String, String),
    Not(Box<Expr>),
    /// Every term holds; a chain `a && b && c` is one `And` of its terms (two or more), so
    /// that a long chain is not a deep tree.
    And(Vec<Expr>),
    /// Some term holds; two or more terms, like `And`.
    Or(Vec<Expr>),
}

/// A syntax error, with the 1-based column where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct SelectorError {
    pub column: usize,
    pub message: String,
}

impl AgentSelector {
    /// Parses an expression; whitespace-only text selects every agent.
    pub fn parse(source: &str) -> Result<Self, SelectorError> {
        let tokens = tokenize(source)?;
        let expr = if tokens.is_empty() {
            None
        } else {
            let mut parser = Parser {
                tokens: &tokens,
                position: 0,
                depth: 0,
                end_column: source.chars().count() + 1,
            };
            let expr = parser.or()?;
            if let Some(extra) = parser.peek() {
                return Err(SelectorError {
                    column: extra.column,
                    message: format!("unexpected {} after a complete expression", extra.kind),
                });
            }
            Some(expr)
        };
        Ok(AgentSelector {
            source: source.trim().to_owned(),
            expr,
        })
    }

    /// The selector that matches every agent.
    pub fn any() -> Self {
        AgentSelector {
            source: String::new(),
            expr: None,
        }
    }

    /// The expression as written (trimmed).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True if the agent with this name and these labels is selected.
    pub fn matches(&self, agent_name: &str, labels: &BTreeMap<String, String>) -> bool {
        self.expr
            .as_ref()
            .is_none_or(|expr| evaluate(expr, agent_name, labels))
    }
}

impl AgentSelector {
    /// False only when no agent can match both selectors: one requires a label (or the name)
    /// to have a value that the other requires to be different. Otherwise they may overlap.
    pub fn may_overlap(&self, other: &AgentSelector) -> bool {
        let (Some(mine), Some(theirs)) = (&self.expr, &other.expr) else {
            return true;
        };
        let mut my_requirements = Vec::new();
        requirements(mine, &mut my_requirements);
        let mut their_requirements = Vec::new();
        requirements(theirs, &mut their_requirements);
        !my_requirements.iter().any(|(key, value, equal)| {
            their_requirements
                .iter()
                .any(|(other_key, other_value, other_equal)| {
                    key == other_key
                        && match (equal, other_equal) {
                            (true, true) => value != other_value,
                            (true, false) | (false, true) => value == other_value,
                            (false, false) => false,
                        }
                })
        })
    }
}

/// The comparisons every match must satisfy: the `==` and `!=` terms of the top-level `&&`
/// chain, as (key, value, is-equality).
fn requirements<'a>(expr: &'a Expr, out: &mut Vec<(&'a str, &'a str, bool)>) {
    match expr {
        Expr::Equals(key, value) => out.push((key, value, true)),
        Expr::NotEquals(key, value) => out.push((key, value, false)),
        Expr::And(terms) => {
            for term in terms {
                requirements(term, out);
            }
        }
        _ => {}
    }
}

impl fmt::Display for AgentSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source.is_empty() {
            f.write_str("any agent")
        } else {
            f.write_str(&self.source)
        }
    }
}

impl std::str::FromStr for AgentSelector {
    type Err = SelectorError;

    fn from_str(source: &str) -> Result<Self, Self::Err> {
        AgentSelector::parse(source)
    }
}

fn label_value<'a>(key: &str, agent_name: &'a str, labels: &'a BTreeMap<String, String>) -> Option<&'a str> {
    if key == "name" {
        Some(agent_name)
    } else {
        labels.get(key).map(String::as_str)
    }
}

fn evaluate(expr: &Expr, agent_name: &str, labels: &BTreeMap<String, String>) -> bool {
    match expr {
        Expr::Present(key) => label_value(key, agent_name, labels).is_some(),
        Expr::Equals(key, value) => label_value(key, agent_name, labels) == Some(value.as_str()),
        Expr::NotEquals(key, value) => label_value(key, agent_name, labels) != Some(value.as_str()),
        Expr::Not(inner) => !evaluate(inner, agent_name, labels),
        Expr::And(terms) => terms.iter().all(|term| evaluate(term, agent_name, labels)),
        Expr::Or(terms) => terms.iter().any(|term| evaluate(term, agent_name, labels)),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    Ident(String),
    Str(String),
    Eq,
    NotEq,
    Not,
    And,
    Or,
    Open,
    Close,
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenKind::Ident(name) => write!(f, "label `{name}`"),
            TokenKind::Str(text) => write!(f, "string {text:?}"),
            TokenKind::Eq => f.write_str("`==`"),
            TokenKind::NotEq => f.write_str("`!=`"),
            TokenKind::Not => f.write_str("`!`"),
            TokenKind::And => f.write_str("`&&`"),
            TokenKind::Or => f.write_str("`||`"),
            TokenKind::Open => f.write_str("`(`"),
            TokenKind::Close => f.write_str("`)`"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    column: usize,
}

fn tokenize(source: &str) -> Result<Vec<Token>, SelectorError> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut position = 0;
    while position < chars.len() {
        let column = position + 1;
        let current = chars[position];
        let next = chars.get(position + 1).copied();
        let error = |message: String| SelectorError { column, message };
        let (kind, width) = match (current, next) {
            (c, _) if c.is_whitespace() => {
                position += 1;
                continue;
            }
            ('=', Some('=')) => (TokenKind::Eq, 2),
            ('!', Some('=')) => (TokenKind::NotEq, 2),
            ('&', Some('&')) => (TokenKind::And, 2),
            ('|', Some('|')) => (TokenKind::Or, 2),
            ('!', _) => (TokenKind::Not, 1),
            ('(', _) => (TokenKind::Open, 1),
            (')', _) => (TokenKind::Close, 1),
            ('=', _) => return Err(error("`=` is not an operator; compare with `==`".into())),
            ('&', _) => return Err(error("`&` is not an operator; use `&&`".into())),
            ('|', _) => return Err(error("`|` is not an operator; use `||`".into())),
            (quote @ ('"' | '\''), _) => {
                let mut text = String::new();
                let mut end = position + 1;
                loop {
                    match chars.get(end) {
                        None => return Err(error("string is not closed".into())),
                        Some('\\') => match chars.get(end + 1) {
                            Some(escaped) => {
                                text.push(*escaped);
                                end += 2;
                            }
                            None => return Err(error("string is not closed".into())),
                        },
                        Some(c) if *c == quote => break,
                        Some(c) => {
                            text.push(*c);
                            end += 1;
                        }
                    }
                }
                (TokenKind::Str(text), end + 1 - position)
            }
            (c, _) if c.is_ascii_alphabetic() || c == '_' => {
                let mut end = position;
                while chars
                    .get(end)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
                {
                    end += 1;
                }
                let name: String = chars[position..end].iter().collect();
                (TokenKind::Ident(name), end - position)
            }
            (other, _) => return Err(error(format!("unexpected character {other:?}"))),
        };
        tokens.push(Token { kind, column });
        position += width;
    }
    Ok(tokens)
}

struct Parser<'a> {
    tokens: &'a [Token],
    position: usize,
    end_column: usize,
    /// How many `(` and `!` enclose the token being parsed.
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position)
    }

    fn next(&mut self) -> Option<&Token> {
        let token = self.tokens.get(self.position);
        self.position += 1;
        token
    }

    fn eat(&mut self, kind: &TokenKind) -> bool {
        if self.peek().map(|token| &token.kind) == Some(kind) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.and()?];
        while self.eat(&TokenKind::Or) {
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Expr, SelectorError> {
        let mut terms = vec![self.unary()?];
        while self.eat(&TokenKind::And) {
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    /// Enters one more level of `(` or `!` (the token at `column`), refusing to go deeper than
    /// [`MAX_NESTING`].
    fn nest(&mut self, column: usize) -> Result<(), SelectorError> {
        if self.depth == MAX_NESTING {
            return Err(SelectorError {
                column,
                message: format!("`(` and `!` nest deeper than {MAX_NESTING} levels"),
            });
        }
        self.depth += 1;
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, SelectorError> {
        let Some(Token {
            kind: TokenKind::Not,
            column,
        }) = self.peek()
        else {
            return self.primary();
        };
        let column = *column;
        self.position += 1;
        self.nest(column)?;
        let inner = self.unary()?;
        self.depth -= 1;
        Ok(Expr::Not(Box::new(inner)))
    }

    fn primary(&mut self) -> Result<Expr, SelectorError> {
        let end_column = self.end_column;
        let Some(token) = self.next().cloned() else {
            return Err(SelectorError {
                column: end_column,
                message: "expression ends where a label or `(` was expected".into(),
            });
        };
        match token.kind {
            TokenKind::Open => {
                self.nest(token.column)?;
                let inner = self.or()?;
                self.depth -= 1;
                if !self.eat(&TokenKind::Close) {
                    let column = self.peek().map_or(end_column, |t| t.column);
                    return Err(SelectorError {
                        column,
                        message: format!("`(` at column {} is not closed", token.column),
                    });
                }
                Ok(inner)
            }
            TokenKind::Ident(name) => {
                let negate = match self.peek().map(|t| &t.kind) {
                    Some(TokenKind::Eq) => false,
                    Some(TokenKind::NotEq) => true,
                    _ => return Ok(Expr::Present(name)),
                };
                self.position += 1;
                match self.next().cloned() {
                    Some(Token {
                        kind: TokenKind::Str(value),
                        ..
                    }) => Ok(if negate {
                        Expr::NotEquals(name, value)
                    } else {
                        Expr::Equals(name, value)
                    }),
                    Some(other) => Err(SelectorError {
                        column: other.column,
                        message: format!(
                            "expected a quoted string after the comparison, found {}",
                            other.kind
                        ),
                    }),
                    None => Err(SelectorError {
                        column: end_column,
                        message: "expression ends where a quoted string was expected".into(),
                    }),
                }
            }
            other => Err(SelectorError {
                column: token.column,
                message: format!("expected a label or `(`, found {other}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn check(source: &str, name: &str, pairs: &[(&str, &str)]) -> bool {
        AgentSelector::parse(source)
            .unwrap_or_else(|e| panic!("{source}: {e}"))
            .matches(name, &labels(pairs))
    }

    #[test]
    fn comparisons_presence_and_names() {
        let linux = [("os", "linux"), ("arch", "x86_64"), ("gpu", "")];
        assert!(check(r#"os == "linux""#, "a1", &linux));
        assert!(!check(r#"os == "windows""#, "a1", &linux));
        assert!(check(r#"arch != "arm""#, "a1", &linux));
        assert!(check("gpu", "a1", &linux));
        assert!(!check("docker", "a1", &linux));
        assert!(check(r#"name == "agent-1""#, "agent-1", &[]));
        assert!(!check(r#"name == "agent-1""#, "agent-2", &[]));
        assert!(check("", "anyone", &[]));
        assert!(check("   ", "anyone", &[]));
        assert!(check(r#"os == 'linux'"#, "a1", &linux));
        assert!(check(r#"os == "li\"nux" || gpu"#, "a1", &linux));
    }

    #[test]
    fn precedence_and_parentheses() {
        let agent = [("os", "linux")];
        // `&&` binds tighter than `||`.
        assert!(check(r#"os == "linux" || gpu && docker"#, "a", &agent));
        assert!(!check(r#"(os == "linux" || gpu) && docker"#, "a", &agent));
        assert!(check(r#"!docker && !(os == "mac")"#, "a", &agent));
        assert!(!check(r#"!!docker"#, "a", &agent));
        assert!(check(r#"((((os == "linux"))))"#, "a", &agent));
    }

    #[test]
    fn a_missing_label_is_not_equal_to_anything() {
        assert!(!check(r#"os == "linux""#, "a", &[]));
        assert!(check(r#"os != "linux""#, "a", &[]));
    }

    fn error(source: &str) -> SelectorError {
        AgentSelector::parse(source).expect_err(source)
    }

    #[test]
    fn syntax_errors_report_their_column() {
        assert_eq!(error(r#"os = "linux""#).column, 4);
        assert_eq!(error(r#"os == linux"#).column, 7);
        assert_eq!(error(r#"os == "linux"#).column, 7);
        assert_eq!(error(r#"(os == "linux""#).column, 15);
        assert_eq!(error(r#"os == "linux")"#).column, 14);
        assert_eq!(error(r#"os &&"#).column, 6);
        assert_eq!(error(r#"&& os"#).column, 1);
        assert_eq!(error(r#"os == "a" # comment"#).column, 11);
        assert_eq!(error(r#"os "linux""#).column, 4);
        assert_eq!(error(r#"os | gpu"#).column, 4);
        assert!(error(r#"os = "linux""#).to_string().starts_with("column 4: "));
    }

    #[test]
    fn disjoint_selections_are_recognised() {
        let parse = |source: &str| AgentSelector::parse(source).unwrap();
        assert!(!parse(r#"name == "agent1""#).may_overlap(&parse(r#"name == "agent2""#)));
        assert!(!parse(r#"group == "1" && os == "linux""#).may_overlap(&parse(r#"group == "2""#)));
        assert!(!parse(r#"os == "linux""#).may_overlap(&parse(r#"os != "linux""#)));
        assert!(parse(r#"name == "agent1""#).may_overlap(&parse(r#"name == "agent1""#)));
        assert!(parse(r#"os == "linux""#).may_overlap(&parse(r#"arch == "arm""#)));
        assert!(parse("").may_overlap(&parse(r#"name == "x""#)));
        assert!(parse(r#"name == "a" || name == "b""#).may_overlap(&parse(r#"name == "c""#)));
    }

    #[test]
    fn deep_nesting_is_a_syntax_error_not_a_stack_overflow() {
        let nested = |depth: usize| format!("{}os{}", "(".repeat(depth), ")".repeat(depth));
        assert!(check(&nested(MAX_NESTING), "a", &[("os", "linux")]));
        assert_eq!(error(&nested(MAX_NESTING + 1)).column, MAX_NESTING + 1);
        assert_eq!(error(&nested(100_000)).column, MAX_NESTING + 1);
        // An even number of `!` cancels out.
        assert!(check(
            &format!("{}os", "!".repeat(MAX_NESTING)),
            "a",
            &[("os", "linux")]
        ));
        let message = error(&format!("{}os", "!".repeat(100_000))).to_string();
        assert!(message.contains("nest deeper"), "{message}");
        assert!(error(&"(!".repeat(100_000)).message.contains("nest deeper"));
    }

    #[test]
    fn long_chains_match_without_deep_recursion() {
        let chain = |operator: &str| vec!["os"; 200_000].join(operator);
        assert!(check(&chain(" && "), "a", &[("os", "linux")]));
        assert!(check(&chain(" || "), "a", &[("os", "linux")]));
        assert!(!check(&chain(" && "), "a", &[]));
        let mut equalities = vec![r#"group == "1""#; 100_000];
        equalities.push(r#"group == "2""#);
        let impossible = AgentSelector::parse(&equalities.join(" && ")).unwrap();
        assert!(!impossible.matches("a", &labels(&[("group", "1")])));
        assert!(!impossible.may_overlap(&AgentSelector::parse(r#"group == "3""#).unwrap()));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic sweep over awkward inputs.
        let pieces = [
            "(", ")", "!", "==", "!=", "&&", "||", "\"", "'", "\\", "os", " ", "é", "\"x\"",
        ];
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..5_000 {
            let mut source = String::new();
            for _ in 0..(seed % 9) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                source.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            if let Ok(selector) = AgentSelector::parse(&source) {
                selector.matches("a", &labels(&[("os", "x")]));
            }
        }
    }
}

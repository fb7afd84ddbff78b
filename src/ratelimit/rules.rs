//! Rate-limit rules: their grammar, the defaults, and matching a request to the first rule
//! that applies.
//!
//! ```text
//! METHOD PATH-PREFIX RATE/UNIT burst=N key=ip|user|global [delay=MS]
//! ```
//!
//! `METHOD` is an HTTP method or `*`; `PATH-PREFIX` matches whole path segments (`/users`
//! matches `/users` and `/users/x`, not `/usersx`); `UNIT` is `s`, `min`, `hour` or `day`,
//! optionally with a count (`10/15min`). `key=user` is the username the request claims,
//! falling back to the client address. `delay=MS` lets an over-limit request wait up to MS
//! milliseconds for its token instead of being refused at once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};

use crate::token_bucket::{Limit, NS_PER_SEC};

/// What a rule counts requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The client address (IPv6 by /64 prefix).
    Ip,
    /// The claimed username; the client address when the request names none.
    User,
    /// One bucket for everybody.
    Global,
}

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Policy name shown in `RateLimit-Policy` and `RateLimit`, derived from method and path.
    pub name: Arc<str>,
    /// The `RateLimit-Policy` field, e.g. `"post-users";q=5;w=3600` (built once).
    pub policy: HeaderValue,
    /// `None` for `*`.
    pub method: Option<Method>,
    pub prefix: String,
    pub limit: Limit,
    pub key: KeyKind,
    /// How long an over-limit request may wait for its token.
    pub delay: Option<Duration>,
}

/// A rule that cannot be parsed; the message quotes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError(pub String);

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest window (burst × interval) a rule may have; keeps all arithmetic well inside
/// 64-bit nanoseconds.
const MAX_WINDOW_NS: i128 = 366 * 86_400 * NS_PER_SEC as i128;

/// The rules used when none are configured.
pub const DEFAULT_RULES: &[&str] = &[
    // The caller's own resources (TOTP enrolment) are not registrations: same generous
    // per-user limit as everything else, checked before the registration rule's prefix.
    "POST /users/me 100/s burst=200 key=user",
    "POST /users 10/hour burst=5 key=ip",
    "POST /sessions 10/min burst=5 key=ip",
    // Deriving needs no login, only a capability token: a holder of one link must not be
    // able to mint capabilities at request speed.
    "POST /capabilities/derive 30/min burst=10 key=ip",
    "* / 100/s burst=200 key=user",
];

/// Parses `RATE/UNIT` (e.g. `5/min`, `10/15min`) into tokens and a period in nanoseconds.
pub fn parse_rate(raw: &str) -> Result<(u32, i64), String> {
    let (tokens, unit) = raw
        .split_once('/')
        .ok_or_else(|| format!("rate `{raw}` must look like 5/min"))?;
    let tokens: u32 = tokens
        .parse()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("`{tokens}` in `{raw}` is not a positive whole number"))?;
    let digits = unit.bytes().take_while(u8::is_ascii_digit).count();
    let (count, unit_name) = unit.split_at(digits);
    let count: i64 = if count.is_empty() {
        1
    } else {
        count
            .parse()
            .ok()
            .filter(|&n| (1..=1_000_000).contains(&n))
            .ok_or_else(|| format!("`{count}` in `{raw}` is not a usable count"))?
    };
    let seconds = match unit_name {
        "s" => 1,
        "min" => 60,
        "hour" => 3600,
        "day" => 86_400,
        other => {
            return Err(format!(
                "unit `{other}` in `{raw}`: use s, min, hour or day"
            ))
        }
    };
    Ok((tokens, count * seconds * NS_PER_SEC))
}

fn policy_name(method: &Option<Method>, prefix: &str) -> String {
    let method = method
        .as_ref()
        .map_or("any", Method::as_str)
        .to_ascii_lowercase();
    let path: String = prefix
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if path.is_empty() {
        method
    } else {
        format!("{method}-{path}")
    }
}

/// Parses one rule.
pub fn parse_rule(text: &str) -> Result<Rule, RuleError> {
    let fail = |what: String| RuleError(format!("rate-limit rule \"{text}\": {what}"));
    let words: Vec<&str> = text.split_whitespace().collect();
    let [method, prefix, rate, options @ ..] = words.as_slice() else {
        return Err(fail(
            "expected METHOD PATH-PREFIX RATE/UNIT burst=N key=ip|user|global [delay=MS]".into(),
        ));
    };
    let method = match *method {
        "*" => None,
        m => Some(
            Method::from_bytes(m.as_bytes())
                .ok()
                .filter(|m| m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| fail(format!("`{m}` is not an HTTP method in upper case or *")))?,
        ),
    };
    if !prefix.starts_with('/') {
        return Err(fail(format!("path prefix `{prefix}` must start with /")));
    }
    let (tokens, period_ns) = parse_rate(rate).map_err(fail)?;
    let (mut burst, mut key, mut delay) = (None, None, None);
    for option in options {
        let (name, value) = option
            .split_once('=')
            .ok_or_else(|| fail(format!("`{option}` should be name=value")))?;
        let duplicate = match name {
            "burst" => burst
                .replace(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|b| (1..=1_000_000).contains(b))
                        .ok_or_else(|| {
                            fail(format!(
                                "burst `{value}` must be a whole number from 1 to 1000000"
                            ))
                        })?,
                )
                .is_some(),
            "key" => key
                .replace(match value {
                    "ip" => KeyKind::Ip,
                    "user" => KeyKind::User,
                    "global" => KeyKind::Global,
                    other => return Err(fail(format!("key `{other}` must be ip, user or global"))),
                })
                .is_some(),
            "delay" => delay
                .replace(Duration::from_millis(
                    value
                        .parse::<u64>()
                        .ok()
                        .filter(|d| *d <= 60_000)
                        .ok_or_else(|| {
                            fail(format!(
                                "delay `{value}` must be milliseconds from 0 to 60000"
                            ))
                        })?,
                ))
                .is_some(),
            other => return Err(fail(format!("unknown option `{other}`"))),
        };
        if duplicate {
            return Err(fail(format!("`{name}` is given twice")));
        }
    }
    let burst = burst.ok_or_else(|| fail("burst=N is required".into()))?;
    let key = key.ok_or_else(|| fail("key=ip|user|global is required".into()))?;
    let limit = Limit::new(tokens, period_ns, burst);
    if limit.window_ns() > MAX_WINDOW_NS {
        return Err(fail(
            "burst ÷ rate exceeds a year; use a faster rate or a smaller burst".into(),
        ));
    }
    let mut rule = Rule {
        name: policy_name(&method, prefix).into(),
        policy: HeaderValue::from_static(""),
        method,
        prefix: prefix.trim_end_matches('/').to_owned(),
        limit,
        key,
        delay: delay.filter(|d| !d.is_zero()),
    };
    rule.policy = rule.policy_header();
    Ok(rule)
}

/// Parses a rule list; `none` alone disables rate limiting by rule. Policy names are made
/// unique by suffixing the rule's position.
pub fn parse_rules(texts: &[String]) -> Result<Vec<Rule>, RuleError> {
    if texts.len() == 1 && texts[0].trim() == "none" {
        return Ok(Vec::new());
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let mut rule = parse_rule(text.trim())?;
        if rules.iter().any(|r| r.name == rule.name) {
            rule.name = format!("{}-{}", rule.name, i + 1).into();
            rule.policy = rule.policy_header();
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// The default rules, parsed.
pub fn default_rules() -> Vec<Rule> {
    let texts: Vec<String> = DEFAULT_RULES.iter().map(|s| (*s).to_owned()).collect();
    // The defaults are constants checked by a unit test.
    parse_rules(&texts).expect("default rules parse")
}

impl Rule {
    /// Whether this rule applies to the request.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        // `prefix` has no trailing slash; "" is the root and matches everything.
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// `RateLimit-Policy` field: quota and window in seconds.
    fn policy_header(&self) -> HeaderValue {
        let window_s =
            (self.limit.window_ns() + i128::from(NS_PER_SEC) - 1) / i128::from(NS_PER_SEC);
        policy_header(&self.name, self.limit.burst, window_s)
    }
}

/// A `RateLimit-Policy` field value: `"name";q=<quota>;w=<window seconds>`.
pub fn policy_header(name: &str, quota: u32, window_s: impl fmt::Display) -> HeaderValue {
    // Policy names are built from [a-z0-9-] only, so the value is always valid.
    HeaderValue::try_from(format!("\"{name}\";q={quota};w={window_s}"))
        .unwrap_or_else(|_| HeaderValue::from_static("\"policy\""))
}

/// The first rule that applies, if any.
pub fn first_match<'r>(
    rules: &'r [Rule],
    method: &Method,
    path: &str,
) -> Option<(usize, &'r Rule)> {
    rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.matches(method, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_as_designed() {
        let rule = parse_rule("POST /sessions 5/min burst=5 key=ip").unwrap();
        assert_eq!(rule.method, Some(Method::POST));
        assert_eq!(rule.prefix, "/sessions");
        assert_eq!(
            rule.limit,
            Limit {
                burst: 5,
                interval_ns: 12 * NS_PER_SEC
            }
        );
        assert_eq!(rule.key, KeyKind::Ip);
        assert_eq!(rule.delay, None);
        assert_eq!(&*rule.name, "post-sessions");
        assert_eq!(rule.policy, "\"post-sessions\";q=5;w=60");

        let rule = parse_rule("* / 100/s burst=200 key=user delay=250").unwrap();
        assert_eq!(rule.method, None);
        assert_eq!(&*rule.name, "any");
        assert_eq!(rule.delay, Some(Duration::from_millis(250)));
        assert_eq!(rule.limit.interval_ns, NS_PER_SEC / 100);

        let rule = parse_rule("GET /accounts 10/15min burst=10 key=global").unwrap();
        assert_eq!(rule.limit.interval_ns, 90 * NS_PER_SEC);
        assert_eq!(parse_rate("1/day").unwrap(), (1, 86_400 * NS_PER_SEC));
    }

    #[test]
    fn malformed_rules_are_quoted_and_explained() {
        let cases = [
            ("POST /users", "expected METHOD"),
            ("post /users 5/min burst=5 key=ip", "upper case"),
            ("POST users 5/min burst=5 key=ip", "must start with /"),
            ("POST /users 5 burst=5 key=ip", "5/min"),
            ("POST /users 0/min burst=5 key=ip", "positive"),
            ("POST /users 5/week burst=5 key=ip", "unit `week`"),
            ("POST /users 5/min key=ip", "burst=N is required"),
            ("POST /users 5/min burst=0 key=ip", "burst `0`"),
            (
                "POST /users 5/min burst=5",
                "key=ip|user|global is required",
            ),
            ("POST /users 5/min burst=5 key=device", "key `device`"),
            ("POST /users 5/min burst=5 key=ip key=ip", "given twice"),
            (
                "POST /users 5/min burst=5 key=ip colour=red",
                "unknown option",
            ),
            (
                "POST /users 5/min burst=5 key=ip delay=soon",
                "delay `soon`",
            ),
            ("POST /users 1/day burst=1000 key=ip", "exceeds a year"),
        ];
        for (text, expected) in cases {
            let err = parse_rule(text).unwrap_err().0;
            assert!(
                err.contains(&format!("\"{text}\"")),
                "quotes the rule: {err}"
            );
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn first_match_wins_on_whole_segments() {
        let rules = parse_rules(&[
            "POST /users 5/min burst=5 key=ip".to_owned(),
            "* /users 50/min burst=50 key=ip".to_owned(),
            "* / 100/s burst=200 key=user".to_owned(),
        ])
        .unwrap();
        let index = |m: Method, p: &str| first_match(&rules, &m, p).map(|(i, _)| i);
        assert_eq!(index(Method::POST, "/users"), Some(0));
        assert_eq!(index(Method::GET, "/users/alice"), Some(1));
        assert_eq!(index(Method::POST, "/usersx"), Some(2));
        assert_eq!(index(Method::GET, "/"), Some(2));
        assert_eq!(index(Method::GET, "/apiStatus"), Some(2));
    }

    #[test]
    fn defaults_parse_and_none_disables() {
        assert_eq!(default_rules().len(), DEFAULT_RULES.len());
        let defaults = default_rules();
        let matched = |method: Method, path: &str| {
            first_match(&defaults, &method, path).map(|(_, rule)| rule.limit.burst)
        };
        assert_eq!(matched(Method::POST, "/users"), Some(5), "registration");
        assert_eq!(matched(Method::POST, "/users/me/totp"), Some(200));
        assert_eq!(matched(Method::POST, "/users/me/totp/confirm"), Some(200));
        assert_eq!(matched(Method::POST, "/sessions"), Some(5));
        assert!(parse_rules(&["none".to_owned()]).unwrap().is_empty());
        let dup = parse_rules(&[
            "GET /a 1/s burst=1 key=ip".to_owned(),
            "GET /a 2/s burst=1 key=ip".to_owned(),
        ])
        .unwrap();
        assert_ne!(dup[0].name, dup[1].name);
    }
}

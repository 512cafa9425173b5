//! Role policy: which role a pod asks for, and whether its namespace permits it.
//!
//! Pure functions over plain data (no Kubernetes or AWS types), so every rule is table-tested.
//!
//! - The pod annotation (`iam.amazonaws.com/role` by default) names a role: a name, optionally
//!   with a path (`team/app`), joined to the base ARN; or a full role ARN (cross-account).
//! - The namespace permits roles with kiam's `iam.amazonaws.com/permitted` regular expression
//!   (anchored at both ends) and/or kube2iam's `iam.amazonaws.com/allowed-roles` JSON list,
//!   whose entries are roles or `*` globs (kube2iam's `--namespace-restriction-format glob`).
//!   No rule permits nothing; a rule that does not parse denies and says why.
//! - The operator's pass-through rules (server flags, never pod annotations) select system
//!   pods that get the node's own metadata service instead of a role.

use std::fmt;

use regex::Regex;

pub const ANNOTATION_ROLE: &str = "iam.amazonaws.com/role";
pub const ANNOTATION_PERMITTED: &str = "iam.amazonaws.com/permitted";
pub const ANNOTATION_ALLOWED_ROLES: &str = "iam.amazonaws.com/allowed-roles";
pub const ANNOTATION_EXTERNAL_ID: &str = "iam.amazonaws.com/external-id";
pub const ANNOTATION_SESSION_NAME: &str = "iam.amazonaws.com/session-name";

/// A role ARN, split into the parts the policy needs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn {
    /// `arn:<partition>:iam::<account>:role/<path/name>`.
    pub arn: String,
    pub partition: String,
    pub account: String,
    /// Path and name without the leading `role/`, e.g. `team/app`.
    pub name: String,
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    #[error("{0:?} is not a role ARN (want arn:<partition>:iam::<12-digit account>:role/<name>)")]
    NotARoleArn(String),
    #[error("role name {0:?} is empty or has characters IAM does not allow")]
    BadName(String),
}

/// Characters IAM allows in role names and paths (`[\w+=,.@-]`, and `/` between path parts).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_/".contains(c))
}

impl RoleArn {
    /// Parses a full role ARN.
    pub fn parse(arn: &str) -> Result<Self, ArnError> {
        let bad = || ArnError::NotARoleArn(arn.to_owned());
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        if !partition.starts_with("aws")
            || account.len() != 12
            || !account.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let name = resource.strip_prefix("role/").ok_or_else(bad)?;
        if !valid_name(name) {
            return Err(ArnError::BadName(name.to_owned()));
        }
        Ok(Self {
            arn: arn.to_owned(),
            partition: partition.to_owned(),
            account: account.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// Where role names without an account are looked up: `arn:<partition>:iam::<account>:role/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseArn {
    pub partition: String,
    pub account: String,
}

impl BaseArn {
    /// Accepts `arn:aws:iam::123456789012:role/` (the trailing `/` optional) or a bare
    /// 12-digit account id.
    pub fn parse(base: &str) -> Result<Self, ArnError> {
        if base.len() == 12 && base.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Self {
                partition: "aws".into(),
                account: base.into(),
            });
        }
        let probe = format!("{}/x", base.trim_end_matches('/'));
        let parsed = RoleArn::parse(&probe).map_err(|_| ArnError::NotARoleArn(base.into()))?;
        if parsed.name != "x" {
            return Err(ArnError::NotARoleArn(base.into()));
        }
        Ok(Self {
            partition: parsed.partition,
            account: parsed.account,
        })
    }

    /// The base of the account of an STS caller ARN, for `--role-base-arn-autodetect`:
    /// `arn:aws:sts::123456789012:assumed-role/kiam/i-0abc` or an IAM user/role ARN.
    pub fn from_caller_arn(arn: &str) -> Result<Self, ArnError> {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        match parts.as_slice() {
            ["arn", partition, "sts" | "iam", "", account, _]
                if account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Ok(Self {
                    partition: (*partition).to_owned(),
                    account: (*account).to_owned(),
                })
            }
            _ => Err(ArnError::NotARoleArn(arn.to_owned())),
        }
    }

    /// Resolves an annotation value: a full ARN stays as it is, a name (with optional path,
    /// optional leading `/`) joins this base.
    pub fn resolve(&self, role: &str) -> Result<RoleArn, ArnError> {
        let role = role.trim();
        if role.starts_with("arn:") {
            return RoleArn::parse(role);
        }
        let name = role.trim_start_matches('/');
        if !valid_name(name) {
            return Err(ArnError::BadName(role.to_owned()));
        }
        RoleArn::parse(&format!(
            "arn:{}:iam::{}:role/{name}",
            self.partition, self.account
        ))
    }
}

/// A namespace's rules, parsed once per namespace version.
#[derive(Clone, Debug)]
pub struct NamespaceRules {
    permitted: Option<Result<Regex, String>>,
    allowed: Option<Result<Vec<AllowedEntry>, String>>,
}

/// One entry of an `allowed-roles` list.
#[derive(Clone, Debug)]
enum AllowedEntry {
    /// A role name (joined to the base ARN when checked) or a full role ARN.
    Role(String),
    /// kube2iam's glob (`--namespace-restriction-format glob`): `*` matches any run of
    /// characters, `/` included, and the whole role must match. Over full role ARNs (an entry
    /// starting with `arn:`) or over the names, path included, of roles in the base account
    /// (kube2iam joins such an entry to the base ARN, which comes to the same).
    Glob { pattern: Glob, arn: bool },
}

/// A `*`-only glob, split at its stars.
#[derive(Clone, Debug)]
struct Glob(Vec<String>);

impl Glob {
    fn new(pattern: &str) -> Self {
        Self(pattern.split('*').map(str::to_owned).collect())
    }

    fn matches(&self, text: &str) -> bool {
        let parts = &self.0;
        let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
            return false;
        };
        if parts.len() == 1 {
            return text == first;
        }
        let Some(mut rest) = text.strip_prefix(first.as_str()) else {
            return false;
        };
        for middle in &parts[1..parts.len() - 1] {
            match rest.find(middle.as_str()) {
                Some(at) => rest = &rest[at + middle.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last.as_str())
    }
}

impl AllowedEntry {
    fn parse(raw: &str) -> Result<Self, String> {
        let entry = raw.trim();
        let bad = |why: String| format!("entry {raw:?}: {why}");
        // Any base gives the same verdict on a name.
        let probe = BaseArn {
            partition: "aws".into(),
            account: "000000000000".into(),
        };
        if !entry.contains('*') {
            // Checked now, so a typo denies with a reason rather than silently matching
            // nothing.
            probe.resolve(entry).map_err(|e| bad(e.to_string()))?;
            return Ok(Self::Role(entry.to_owned()));
        }
        let arn = entry.starts_with("arn:");
        let name = match arn {
            true => {
                let shape = || {
                    bad("a glob over ARNs must read arn:<partition>:iam::<12-digit account>:role/<name glob> (* allowed in the partition, account and name)".into())
                };
                let (prefix, name) = entry.split_once(":role/").ok_or_else(shape)?;
                let parts: Vec<&str> = prefix.split(':').collect();
                let [_, partition, "iam", "", account] = parts.as_slice() else {
                    return Err(shape());
                };
                let partition_ok = !partition.is_empty()
                    && partition
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '-' || c == '*');
                let account_ok = (account.len() == 12 || account.contains('*'))
                    && !account.is_empty()
                    && account.chars().all(|c| c.is_ascii_digit() || c == '*');
                if !partition_ok || !account_ok {
                    return Err(shape());
                }
                name
            }
            false => entry.trim_start_matches('/'),
        };
        // With the stars taken out, what is left must be role-name characters.
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_/*".contains(c))
        {
            return Err(bad(
                "a role glob may only use role-name characters and *".into()
            ));
        }
        Ok(Self::Glob {
            pattern: Glob::new(match arn {
                true => entry,
                false => name,
            }),
            arn,
        })
    }

    fn permits(&self, role: &RoleArn, base: &BaseArn, in_base: bool) -> bool {
        match self {
            Self::Role(entry) => base.resolve(entry).is_ok_and(|arn| arn.arn == role.arn),
            Self::Glob { pattern, arn: true } => pattern.matches(&role.arn),
            Self::Glob {
                pattern,
                arn: false,
            } => in_base && pattern.matches(&role.name),
        }
    }
}

/// Why a role is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "namespace {namespace} has no {ANNOTATION_PERMITTED} or {ANNOTATION_ALLOWED_ROLES} annotation, so it permits no role"
    )]
    NoRule { namespace: String },
    #[error("namespace {namespace} does not permit role {role}")]
    NotPermitted { namespace: String, role: String },
    #[error(
        "namespace {namespace} has an invalid {annotation} annotation ({reason}); no role is permitted until it is fixed"
    )]
    InvalidRule {
        namespace: String,
        annotation: &'static str,
        reason: String,
    },
    #[error("role annotation {value:?}: {reason}")]
    BadRole { value: String, reason: String },
}

impl NamespaceRules {
    /// From the namespace's annotations (`permitted`, `allowed_roles`: their values, if set).
    pub fn parse(permitted: Option<&str>, allowed_roles: Option<&str>) -> Self {
        let permitted = permitted.map(|expr| {
            Regex::new(&format!("^(?:{expr})$")).map_err(|e| {
                // The regex error is multi-line; its last line says what is wrong.
                e.to_string()
                    .lines()
                    .last()
                    .unwrap_or("invalid")
                    .trim()
                    .to_owned()
            })
        });
        let allowed = allowed_roles.map(|json| {
            serde_json::from_str::<Vec<String>>(json)
                .map_err(|e| format!("want a JSON list of role names, ARNs or globs: {e}"))?
                .iter()
                .map(|entry| AllowedEntry::parse(entry))
                .collect()
        });
        Self { permitted, allowed }
    }

    /// Whether `role` is permitted in `namespace`. The `permitted` expression matches the
    /// role's full ARN, or, for a role in the base account, its name (path included); an
    /// `allowed-roles` entry matches when it resolves to the same ARN, or, for a glob, when
    /// it matches the same way the expression does.
    pub fn check(&self, namespace: &str, role: &RoleArn, base: &BaseArn) -> Result<(), Denied> {
        if self.permitted.is_none() && self.allowed.is_none() {
            return Err(Denied::NoRule {
                namespace: namespace.to_owned(),
            });
        }
        let invalid = |annotation, reason: &String| Denied::InvalidRule {
            namespace: namespace.to_owned(),
            annotation,
            reason: reason.clone(),
        };
        let mut permitted = false;
        // A name is only meaningful in the base account: a role of another account must be
        // permitted by its full ARN, or `app-.*` would permit `app-x` in any account.
        let in_base = role.account == base.account && role.partition == base.partition;
        if let Some(rule) = &self.permitted {
            let re = rule
                .as_ref()
                .map_err(|e| invalid(ANNOTATION_PERMITTED, e))?;
            permitted |= (in_base && re.is_match(&role.name)) || re.is_match(&role.arn);
        }
        if let Some(rule) = &self.allowed {
            let list = rule
                .as_ref()
                .map_err(|e| invalid(ANNOTATION_ALLOWED_ROLES, e))?;
            permitted |= list.iter().any(|entry| entry.permits(role, base, in_base));
        }
        match permitted {
            true => Ok(()),
            false => Err(Denied::NotPermitted {
                namespace: namespace.to_owned(),
                role: role.arn.clone(),
            }),
        }
    }
}

/// An operator's rule selecting pods that get the node's own metadata service, verbatim
/// (`--node-metadata-passthrough namespace=kube-system,host-network=true`). It only ever
/// comes from the servers' flags: nothing a pod or a namespace user controls selects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassThroughRule {
    /// The pod's namespace (exact).
    pub namespace: String,
    /// The pod's service account (exact); any when unset.
    pub service_account: Option<String>,
    /// Whether the pod must (or must not) use the host network; either when unset.
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PassThroughError {
    #[error("{0:?}: want namespace=<ns>[,service-account=<sa>][,host-network=true|false], or none")]
    Syntax(String),
    #[error("{rule:?}: unknown key {key:?} (namespace, service-account, host-network)")]
    UnknownKey { rule: String, key: String },
    #[error("{0:?}: namespace=<ns> is required")]
    NoNamespace(String),
    #[error("{0:?}: host-network must be true or false")]
    HostNetwork(String),
    #[error("\"none\" cannot be combined with other rules")]
    NoneWithOthers,
}

/// The value of `--node-metadata-passthrough` that selects no pod.
pub const PASSTHROUGH_NONE: &str = "none";

impl PassThroughRule {
    /// Parses one rule: comma-separated `key=value` pairs.
    pub fn parse(text: &str) -> Result<Self, PassThroughError> {
        let mut rule = Self {
            namespace: String::new(),
            service_account: None,
            host_network: None,
        };
        for pair in text.split(',') {
            let (key, value) = pair
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .ok_or_else(|| PassThroughError::Syntax(text.to_owned()))?;
            match key {
                "namespace" => rule.namespace = value.to_owned(),
                "service-account" => rule.service_account = Some(value.to_owned()),
                "host-network" => {
                    rule.host_network = Some(
                        value
                            .parse()
                            .map_err(|_| PassThroughError::HostNetwork(text.to_owned()))?,
                    )
                }
                other => {
                    return Err(PassThroughError::UnknownKey {
                        rule: text.to_owned(),
                        key: other.to_owned(),
                    });
                }
            }
        }
        if rule.namespace.is_empty() {
            return Err(PassThroughError::NoNamespace(text.to_owned()));
        }
        Ok(rule)
    }

    /// Parses the whole flag: `none` alone selects nothing.
    pub fn parse_all(values: &[String]) -> Result<Vec<Self>, PassThroughError> {
        if values.iter().any(|v| v.trim() == PASSTHROUGH_NONE) {
            return match values.len() {
                1 => Ok(Vec::new()),
                _ => Err(PassThroughError::NoneWithOthers),
            };
        }
        values.iter().map(|v| Self::parse(v)).collect()
    }

    /// Whether the rule selects a pod with these properties.
    pub fn selects(&self, namespace: &str, service_account: &str, host_network: bool) -> bool {
        self.namespace == namespace
            && self
                .service_account
                .as_deref()
                .is_none_or(|sa| sa == service_account)
            && self.host_network.is_none_or(|h| h == host_network)
    }
}

/// STS session names: `[\w+=,.@-]`, 2 to 64 characters.
pub fn session_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    while name.len() < 2 {
        name.push('-');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").expect("base")
    }

    #[test]
    fn role_annotations_resolve() {
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("app", Ok("arn:aws:iam::123456789012:role/app")),
            ("/app", Ok("arn:aws:iam::123456789012:role/app")),
            ("team/app", Ok("arn:aws:iam::123456789012:role/team/app")),
            (" app ", Ok("arn:aws:iam::123456789012:role/app")),
            (
                "arn:aws:iam::999999999999:role/other",
                Ok("arn:aws:iam::999999999999:role/other"),
            ),
            (
                "arn:aws-cn:iam::999999999999:role/p/q",
                Ok("arn:aws-cn:iam::999999999999:role/p/q"),
            ),
            ("", Err(())),
            ("team//app", Err(())),
            ("app/", Err(())),
            ("bad name", Err(())),
            ("arn:aws:iam::123:role/short-account", Err(())),
            ("arn:aws:iam::123456789012:user/bob", Err(())),
            ("arn:aws:s3:::bucket", Err(())),
            ("arn:aws:iam::123456789012:role/", Err(())),
        ];
        for (value, want) in cases {
            let got = base().resolve(value).map(|a| a.arn).map_err(|_| ());
            assert_eq!(got.as_deref(), want.as_ref().map(|s| *s), "{value:?}");
        }
    }

    #[test]
    fn base_arns() {
        assert_eq!(BaseArn::parse("123456789012"), Ok(base()));
        assert_eq!(BaseArn::parse("arn:aws:iam::123456789012:role"), Ok(base()));
        assert!(BaseArn::parse("arn:aws:iam::123456789012:role/path/").is_err());
        assert!(BaseArn::parse("nonsense").is_err());
        assert_eq!(
            BaseArn::from_caller_arn("arn:aws:sts::123456789012:assumed-role/kiam/i-0abc"),
            Ok(base())
        );
        assert!(BaseArn::from_caller_arn("arn:aws:sts::12:assumed-role/kiam/x").is_err());
    }

    fn check(permitted: Option<&str>, allowed: Option<&str>, role: &str) -> Result<(), Denied> {
        let role = base().resolve(role).expect("role");
        NamespaceRules::parse(permitted, allowed).check("ns", &role, &base())
    }

    #[test]
    fn namespace_rules() {
        use Denied::*;
        // Anchored regex against the name (with path) or the full ARN.
        assert_eq!(check(Some("app"), None, "app"), Ok(()));
        assert!(matches!(
            check(Some("app"), None, "app2"),
            Err(NotPermitted { .. })
        ));
        assert!(matches!(
            check(Some("app"), None, "myapp"),
            Err(NotPermitted { .. })
        ));
        assert_eq!(check(Some("team/.*"), None, "team/app"), Ok(()));
        assert!(matches!(
            check(Some("team/.*"), None, "other/app"),
            Err(NotPermitted { .. })
        ));
        assert_eq!(
            check(Some(".*"), None, "arn:aws:iam::999999999999:role/x"),
            Ok(())
        );
        // A name rule does not reach into other accounts, nor another partition.
        assert!(matches!(
            check(Some("app-.*"), None, "arn:aws:iam::999999999999:role/app-x"),
            Err(NotPermitted { .. })
        ));
        assert!(matches!(
            check(
                Some("app-.*"),
                None,
                "arn:aws-cn:iam::123456789012:role/app-x"
            ),
            Err(NotPermitted { .. })
        ));
        assert_eq!(
            check(Some("app-.*"), None, "arn:aws:iam::123456789012:role/app-x"),
            Ok(())
        );
        assert_eq!(
            check(
                Some(r"arn:aws:iam::999999999999:role/x"),
                None,
                "arn:aws:iam::999999999999:role/x"
            ),
            Ok(())
        );
        // Alternation stays inside the anchors.
        assert!(matches!(
            check(Some("a|b"), None, "ab"),
            Err(NotPermitted { .. })
        ));
        assert_eq!(check(Some("a|b"), None, "b"), Ok(()));
        // kube2iam's list, by resolved ARN.
        let list = r#"["app", "arn:aws:iam::999999999999:role/x"]"#;
        assert_eq!(check(None, Some(list), "app"), Ok(()));
        assert_eq!(check(None, Some(list), "/app"), Ok(()));
        assert_eq!(
            check(None, Some(list), "arn:aws:iam::123456789012:role/app"),
            Ok(())
        );
        assert_eq!(
            check(None, Some(list), "arn:aws:iam::999999999999:role/x"),
            Ok(())
        );
        assert!(matches!(
            check(None, Some(list), "x"),
            Err(NotPermitted { .. })
        ));
        // Either rule may permit.
        assert_eq!(check(Some("nope"), Some(list), "app"), Ok(()));
        // No rule, bad rules: denied with the reason.
        assert!(matches!(check(None, None, "app"), Err(NoRule { .. })));
        let err = check(Some("("), None, "app").expect_err("bad regex");
        assert!(
            matches!(
                err,
                InvalidRule {
                    annotation: ANNOTATION_PERMITTED,
                    ..
                }
            ),
            "{err}"
        );
        let err = check(None, Some("app"), "app").expect_err("bad json");
        assert!(
            matches!(
                err,
                InvalidRule {
                    annotation: ANNOTATION_ALLOWED_ROLES,
                    ..
                }
            ),
            "{err}"
        );
        // An invalid rule denies even when the other one would permit.
        assert!(matches!(
            check(Some("("), Some(list), "app"),
            Err(InvalidRule { .. })
        ));
    }

    #[test]
    fn globs_match_as_kube2iams() {
        let glob = |p: &str, t: &str| Glob::new(p).matches(t);
        assert!(glob("app-*", "app-"));
        assert!(glob("app-*", "app-web"));
        assert!(glob("app-*", "app-web/x"));
        assert!(!glob("app-*", "my-app-web"));
        assert!(glob("*-web", "app-web"));
        assert!(!glob("*-web", "app-web2"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(glob("a*b*c", "abc"));
        assert!(!glob("a*b*c", "acb"));
        assert!(glob("a**", "abc"));
        assert!(glob("*", ""));
        // The prefix and suffix may not overlap.
        assert!(!glob("ab*ba", "aba"));
        assert!(glob("team/*/db", "team/x/y/db"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exact2"));
    }

    #[test]
    fn allowed_roles_globs() {
        use Denied::*;
        let list = r#"["app-*", "team/*", "arn:aws:iam::999999999999:role/ci-*"]"#;
        for role in [
            "app-web",
            "app-",
            "team/app",
            // As in kube2iam, `*` crosses `/`.
            "team/x/app",
            "app-web/x",
            "arn:aws:iam::999999999999:role/ci-1",
            "arn:aws:iam::999999999999:role/ci-12",
        ] {
            assert_eq!(check(None, Some(list), role), Ok(()), "{role}");
        }
        for role in [
            "my-app-web",
            "other",
            "arn:aws:iam::999999999999:role/path/ci-1",
            "arn:aws:iam::999999999999:role/dev",
            // A name glob does not reach into another account or partition.
            "arn:aws:iam::999999999999:role/app-web",
            "arn:aws-cn:iam::123456789012:role/app-web",
        ] {
            assert!(
                matches!(check(None, Some(list), role), Err(NotPermitted { .. })),
                "{role}"
            );
        }
        // An ARN glob may name every account or partition: the namespace's owner wrote it.
        for list in [
            r#"["arn:aws:iam::*:role/reader"]"#,
            r#"["arn:*:iam::999999999999:role/read*"]"#,
        ] {
            assert_eq!(
                check(None, Some(list), "arn:aws:iam::999999999999:role/reader"),
                Ok(()),
                "{list}"
            );
        }
        // Entries are validated: one bad entry denies everything, with the reason.
        for bad in [
            r#"["app-[ab]", "app"]"#,
            r#"["app", "bad name*"]"#,
            r#"["arn:aws:iam::*:user/*"]"#,
            r#"["app", "no spaces"]"#,
            r#"["app", ""]"#,
            r#"["*", "a//b"]"#,
            r#"["app?"]"#,
            // An ARN glob that could never match is refused, not silently useless.
            r#"["arn:aws:iam::123:role/app-*"]"#,
            r#"["arn:aws:iam:123456789012:role/app-*"]"#,
            r#"["arn:aws:sts::123456789012:role/app-*"]"#,
        ] {
            let err = check(None, Some(bad), "app").expect_err(bad);
            assert!(
                matches!(
                    err,
                    InvalidRule {
                        annotation: ANNOTATION_ALLOWED_ROLES,
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn pass_through_rules() {
        let rule = |text: &str| PassThroughRule::parse(text);
        let default = rule("namespace=kube-system,host-network=true").expect("valid");
        assert!(default.selects("kube-system", "aws-node", true));
        assert!(!default.selects("kube-system", "aws-node", false));
        assert!(!default.selects("default", "aws-node", true));
        let sa = rule("namespace=kube-system, service-account=ebs-csi-node").expect("valid");
        assert!(sa.selects("kube-system", "ebs-csi-node", false));
        assert!(sa.selects("kube-system", "ebs-csi-node", true));
        assert!(!sa.selects("kube-system", "default", true));
        let any = rule("namespace=monitoring").expect("valid");
        assert!(any.selects("monitoring", "x", false));
        for bad in [
            "",
            "kube-system",
            "namespace=",
            "service-account=x",
            "namespace=a,host-network=yes",
            "namespace=a,labels=x",
            "namespace=a,,host-network=true",
        ] {
            assert!(rule(bad).is_err(), "{bad:?}");
        }
        let all = |v: &[&str]| {
            PassThroughRule::parse_all(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(all(&["none"]), Ok(Vec::new()));
        assert_eq!(
            all(&["none", "namespace=a"]),
            Err(PassThroughError::NoneWithOthers)
        );
        assert_eq!(all(&["namespace=a", "namespace=b"]).map(|r| r.len()), Ok(2));
    }

    #[test]
    fn session_names_fit_sts() {
        assert_eq!(session_name("default/web-1"), "default-web-1");
        assert_eq!(session_name("a"), "a-");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
        assert_eq!(session_name("ns:pod@x"), "ns-pod@x");
    }
}

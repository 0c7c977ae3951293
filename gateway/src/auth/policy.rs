//! Device groups and policies in the Greengrass client-device-auth shape, compiled once.
//!
//! A config's groups and policies become a [`PolicySet`]. When a device connects, the policies
//! of every group it belongs to are unioned and the policy variables are substituted from its
//! [`Facts`] (its thing name, and what the AWS IoT registry says of it: thing type,
//! attributes), giving its [`Permissions`]: plain lists of patterns per operation, so the
//! per-packet check is a hash lookup or a short pattern walk. A substituted value must pass the
//! thing-name rule; a resource whose variable has no such value grants nothing, so a value
//! can never widen a policy.
//!
//! Resource patterns: `*` matches any run of characters (also across `/`), as in AWS policies.
//! In `mqtt:topic:` and `mqtt:topicfilter:` resources a whole level `+` matches one level and a
//! trailing `#` matches the rest, as MQTT wildcards do. For a SUBSCRIBE the requested filter is
//! matched as text, so `mqtt:topicfilter:cmd/+` allows `cmd/a` and `cmd/+` but never `cmd/#`.

use std::collections::{BTreeMap, HashSet};

use super::config::{AuthConfig, StatementConfig};
use crate::invalid::Invalid;

/// The built-in group of devices that chain to the CA but were never approved.
pub const PROVISIONING_GROUP: &str = "provisioning";
/// The topic prefix a pending device may publish to, followed by its thing name.
pub const PROVISIONING_TOPIC_PREFIX: &str = "$sitegate/provisioning/";
/// The policy variable replaced by the connecting device's thing name.
pub const THING_NAME_VAR: &str = "${iot:Connection.Thing.ThingName}";
/// Same value as [`THING_NAME_VAR`], since the client id must equal the thing name.
pub const CLIENT_ID_VAR: &str = "${iot:ClientId}";
/// The thing's type in the AWS IoT registry.
pub const THING_TYPE_VAR: &str = "${iot:Connection.Thing.ThingTypeName}";
/// An attribute of the thing in the AWS IoT registry: `${iot:Connection.Thing.Attributes[KEY]}`.
pub const ATTRIBUTE_VAR_PREFIX: &str = "${iot:Connection.Thing.Attributes[";

/// The KEY of `${iot:Connection.Thing.Attributes[KEY]}`.
fn attribute_key(var: &str) -> Option<&str> {
    var.strip_prefix(ATTRIBUTE_VAR_PREFIX)?.strip_suffix("]}")
}

/// What a device's groups and permissions are chosen by: its thing name, and what the AWS IoT
/// registry says of the thing (empty when no registry vouched for it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    pub thing: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thing_groups: Vec<String>,
}

impl Facts {
    /// A thing known by its name only.
    pub fn named(thing: &str) -> Facts {
        Facts {
            thing: thing.to_owned(),
            ..Facts::default()
        }
    }

    /// The value of policy variable `var` (with its `${…}`), if it has one that is safe to
    /// substitute.
    fn value(&self, var: &str) -> Option<&str> {
        let v = if var == THING_NAME_VAR || var == CLIENT_ID_VAR {
            Some(self.thing.as_str())
        } else if var == THING_TYPE_VAR {
            self.thing_type.as_deref()
        } else {
            self.attributes.get(attribute_key(var)?).map(String::as_str)
        };
        v.filter(|v| crate::identity::valid_thing_name(v))
    }
}

/// The MQTT operations a policy can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Connect,
    Publish,
    Subscribe,
}

impl Operation {
    const ALL: [Operation; 3] = [Operation::Connect, Operation::Publish, Operation::Subscribe];

    fn index(self) -> usize {
        self as usize
    }

    fn resource_prefix(self) -> &'static str {
        match self {
            Operation::Connect => "mqtt:clientId:",
            Operation::Publish => "mqtt:topic:",
            Operation::Subscribe => "mqtt:topicfilter:",
        }
    }
}

/// One statement after parsing: for each operation, the resource templates it allows.
#[derive(Debug, Clone, Default)]
struct Statement {
    templates: [Vec<String>; 3],
}

/// A parsed `selectionRule`: clauses joined by `OR`, each `thingName: <glob>`, or (from the
/// AWS IoT registry) `thingType: <glob>`, `thingGroup: <glob>`, `attribute.KEY: <glob>`.
#[derive(Debug, Clone)]
pub struct SelectionRule {
    alternatives: Vec<(Field, Pattern)>,
}

/// What a selection clause looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    ThingName,
    ThingType,
    ThingGroup,
    Attribute(String),
}

impl SelectionRule {
    pub fn parse(text: &str) -> Result<SelectionRule, String> {
        let mut alternatives = Vec::new();
        for clause in text.split(" OR ") {
            let clause = clause.trim();
            let (field, pattern) = match clause.split_once(':') {
                Some(("thingName", p)) => (Field::ThingName, p),
                Some(("thingType", p)) => (Field::ThingType, p),
                Some(("thingGroup", p)) => (Field::ThingGroup, p),
                Some((f, p)) if f.starts_with("attribute.") => {
                    let key = &f["attribute.".len()..];
                    if !crate::identity::valid_thing_name(key) {
                        return Err(format!("{key:?} is not an attribute name (letters, digits, : _ -)"));
                    }
                    (Field::Attribute(key.to_owned()), p)
                }
                _ => {
                    return Err(format!(
                        "expected `thingName: <name or prefix*>` (or thingType:, thingGroup:, attribute.KEY:) but found {clause:?} (clauses are joined by OR)"
                    ))
                }
            };
            let pattern = pattern.trim();
            if pattern.is_empty()
                || !pattern.bytes().all(|b| {
                    b == b'*' || b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-')
                })
            {
                return Err(format!(
                    "{pattern:?} is not a thing name pattern (letters, digits, : _ - and *)"
                ));
            }
            alternatives.push((field, Pattern::compile(pattern)));
        }
        Ok(SelectionRule { alternatives })
    }

    pub fn matches(&self, facts: &Facts) -> bool {
        self.alternatives.iter().any(|(field, p)| match field {
            Field::ThingName => p.matches(&facts.thing),
            Field::ThingType => facts.thing_type.as_deref().is_some_and(|t| p.matches(t)),
            Field::ThingGroup => facts.thing_groups.iter().any(|g| p.matches(g)),
            Field::Attribute(key) => facts.attributes.get(key).is_some_and(|v| p.matches(v)),
        })
    }
}

#[derive(Debug, Clone)]
struct Group {
    name: String,
    rule: SelectionRule,
    policy: usize,
}

/// Every group and policy of a config, ready to give a device its permissions.
#[derive(Debug, Clone)]
pub struct PolicySet {
    groups: Vec<Group>,
    policies: Vec<Vec<Statement>>,
    provisioning: Vec<Statement>,
}

impl PolicySet {
    /// Compiles `[auth]`; the error names the offending key.
    pub fn compile(auth: &AuthConfig) -> Result<PolicySet, Invalid> {
        let mut policy_index = BTreeMap::new();
        let mut policies = Vec::new();
        for (name, statements) in &auth.policies {
            let mut compiled = Vec::new();
            for (sname, statement) in statements {
                let key = format!("auth.policies.{name}.{sname}");
                compiled.push(compile_statement(&key, statement)?);
            }
            policy_index.insert(name.as_str(), policies.len());
            policies.push(compiled);
        }
        let mut groups = Vec::new();
        for (name, group) in &auth.device_groups {
            let key = format!("auth.device_groups.{name}");
            if name == PROVISIONING_GROUP {
                return Err(Invalid::new(
                    key,
                    "`provisioning` is built in (pending devices) and cannot be redefined",
                ));
            }
            let rule = SelectionRule::parse(&group.selection_rule)
                .map_err(|reason| Invalid::new(format!("{key}.selection_rule"), reason))?;
            let Some(&policy) = policy_index.get(group.policy.as_str()) else {
                let known: Vec<&str> = policy_index.keys().copied().collect();
                return Err(Invalid::new(
                    format!("{key}.policy"),
                    format!("unknown policy {:?} (defined: {known:?})", group.policy),
                ));
            };
            groups.push(Group {
                name: name.clone(),
                rule,
                policy,
            });
        }
        Ok(PolicySet {
            groups,
            policies,
            provisioning: vec![provisioning_statement()],
        })
    }

    /// Names of the configured groups whose selection rule matches the device.
    pub fn groups_matching(&self, facts: &Facts) -> Vec<String> {
        self.groups
            .iter()
            .filter(|g| g.rule.matches(facts))
            .map(|g| g.name.clone())
            .collect()
    }

    /// True when a group of that name is configured (or is the built-in provisioning group).
    pub fn has_group(&self, name: &str) -> bool {
        name == PROVISIONING_GROUP || self.groups.iter().any(|g| g.name == name)
    }

    /// The union of the named groups' policies with the device's facts substituted.
    pub fn permissions(&self, facts: &Facts, groups: &[String]) -> Permissions {
        let mut statements: Vec<&Statement> = Vec::new();
        for name in groups {
            if name == PROVISIONING_GROUP {
                statements.extend(self.provisioning.iter());
            } else if let Some(g) = self.groups.iter().find(|g| &g.name == name) {
                statements.extend(self.policies[g.policy].iter());
            }
        }
        Permissions::build(facts, statements)
    }

    /// What a pending device may do: connect, and publish to its own provisioning topic.
    pub fn provisioning_permissions(&self, thing: &str) -> Permissions {
        Permissions::build(&Facts::named(thing), self.provisioning.iter())
    }
}

fn provisioning_statement() -> Statement {
    let mut s = Statement::default();
    s.templates[Operation::Connect.index()].push(THING_NAME_VAR.to_owned());
    s.templates[Operation::Publish.index()]
        .push(format!("{PROVISIONING_TOPIC_PREFIX}{THING_NAME_VAR}"));
    s
}

fn compile_statement(key: &str, statement: &StatementConfig) -> Result<Statement, Invalid> {
    let mut ops = Vec::new();
    if statement.operations.is_empty() {
        return Err(Invalid::new(
            format!("{key}.operations"),
            "must list at least one operation",
        ));
    }
    for op in &statement.operations {
        match op.as_str() {
            "mqtt:connect" => ops.push(Operation::Connect),
            "mqtt:publish" => ops.push(Operation::Publish),
            "mqtt:subscribe" => ops.push(Operation::Subscribe),
            "*" | "mqtt:*" => ops.extend(Operation::ALL),
            other => {
                return Err(Invalid::new(
                    format!("{key}.operations"),
                    format!(
                    "unknown operation {other:?} (mqtt:connect, mqtt:publish, mqtt:subscribe or *)"
                ),
                ))
            }
        }
    }
    if statement.resources.is_empty() {
        return Err(Invalid::new(
            format!("{key}.resources"),
            "must list at least one resource",
        ));
    }
    let mut compiled = Statement::default();
    for resource in &statement.resources {
        check_variables(resource)
            .map_err(|reason| Invalid::new(format!("{key}.resources"), reason))?;
        if resource == "*" {
            for op in &ops {
                compiled.templates[op.index()].push("*".to_owned());
            }
            continue;
        }
        let Some(op) = Operation::ALL
            .into_iter()
            .find(|op| resource.starts_with(op.resource_prefix()))
        else {
            return Err(Invalid::new(
                format!("{key}.resources"),
                format!("{resource:?} must start with mqtt:clientId:, mqtt:topic:, mqtt:topicfilter: or be *"),
            ));
        };
        // A resource only ever speaks to the operation of its kind (clientId ↔ connect, …).
        if ops.contains(&op) {
            let template = &resource[op.resource_prefix().len()..];
            if template.is_empty() {
                return Err(Invalid::new(
                    format!("{key}.resources"),
                    format!("{resource:?} names nothing after the prefix"),
                ));
            }
            if op != Operation::Connect {
                // MQTT wildcards in a topic resource must be whole levels, or the resource can
                // never match anything a device is allowed to send (§4.7.1).
                let sample = template
                    .replace(THING_NAME_VAR, "x")
                    .replace(CLIENT_ID_VAR, "x")
                    .replace('*', "x");
                if let Err(e) = crate::topic::check_wildcards(&sample) {
                    return Err(Invalid::new(
                        format!("{key}.resources"),
                        format!("{resource:?} can never match: {e}"),
                    ));
                }
            }
            compiled.templates[op.index()].push(template.to_owned());
        }
    }
    if compiled.templates.iter().all(|t| t.is_empty()) {
        return Err(Invalid::new(
            key.to_owned(),
            "grants nothing: none of its resources is of a kind its operations use (mqtt:connect takes mqtt:clientId:, mqtt:publish mqtt:topic:, mqtt:subscribe mqtt:topicfilter:)",
        ));
    }
    Ok(compiled)
}

fn check_variables(resource: &str) -> Result<(), String> {
    let mut rest = resource;
    while let Some(start) = rest.find("${") {
        let tail = &rest[start..];
        let end = tail
            .find('}')
            .ok_or_else(|| format!("unclosed variable in {resource:?}"))?;
        let var = &tail[..=end];
        let attribute = attribute_key(var).is_some_and(crate::identity::valid_thing_name);
        if var != THING_NAME_VAR && var != CLIENT_ID_VAR && var != THING_TYPE_VAR && !attribute {
            return Err(format!(
                "unknown variable {var} in {resource:?} (supported: {THING_NAME_VAR}, {CLIENT_ID_VAR}, {THING_TYPE_VAR}, {ATTRIBUTE_VAR_PREFIX}KEY]}})"
            ));
        }
        rest = &tail[end + 1..];
    }
    Ok(())
}

/// `template` with every policy variable replaced by the device's value; `None` when one has
/// no value that passes the thing-name rule.
fn substitute(template: &str, facts: &Facts) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail.find('}')?;
        out.push_str(facts.value(&tail[..=end])?);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// What one connected device may do, with its thing name already substituted.
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    by_operation: [Matchers; 3],
}

#[derive(Debug, Clone, Default)]
struct Matchers {
    any: bool,
    exact: HashSet<String>,
    patterns: Vec<Pattern>,
}

impl Permissions {
    /// Nothing allowed.
    pub fn none() -> Permissions {
        Permissions::default()
    }

    fn build<'a>(
        facts: &Facts,
        statements: impl IntoIterator<Item = &'a Statement>,
    ) -> Permissions {
        let mut perms = Permissions::default();
        let mut seen: [HashSet<String>; 3] = Default::default();
        for statement in statements {
            for op in Operation::ALL {
                let matchers = &mut perms.by_operation[op.index()];
                for template in &statement.templates[op.index()] {
                    // A variable with no safe value: the resource grants nothing.
                    let Some(concrete) = substitute(template, facts) else {
                        continue;
                    };
                    let pattern = Pattern::compile(&concrete);
                    if pattern.is_match_all() {
                        matchers.any = true;
                    } else if pattern.is_literal() {
                        matchers.exact.insert(concrete);
                    } else if seen[op.index()].insert(concrete) {
                        // Groups often share a statement shape; each distinct pattern is walked once.
                        matchers.patterns.push(pattern);
                    }
                }
            }
        }
        perms
    }

    /// True when `op` on `resource` (client id, topic, or topic filter) is allowed.
    pub fn allows(&self, op: Operation, resource: &str) -> bool {
        let m = &self.by_operation[op.index()];
        m.any || m.exact.contains(resource) || m.patterns.iter().any(|p| p.matches(resource))
    }
}

/// A resource pattern: literals, `*` globs, and whole-level `+` / trailing `#`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// Any run of characters, `/` included.
    Star,
    /// One whole level, not itself `#`.
    Level,
    /// A trailing `/#`: nothing, or `/` and anything.
    RestAfterSlash,
    /// A pattern that is just `#`: anything.
    Rest,
}

impl Pattern {
    fn compile(text: &str) -> Pattern {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let levels: Vec<&str> = text.split('/').collect();
        let last = levels.len() - 1;
        for (i, level) in levels.iter().enumerate() {
            if *level == "#" && i == last {
                if i == 0 {
                    flush_literal(&mut literal, &mut tokens);
                    tokens.push(Token::Rest);
                } else {
                    flush_literal(&mut literal, &mut tokens);
                    tokens.push(Token::RestAfterSlash);
                }
                break;
            }
            if i > 0 {
                literal.push('/');
            }
            if *level == "+" {
                flush_literal(&mut literal, &mut tokens);
                tokens.push(Token::Level);
                continue;
            }
            for (j, part) in level.split('*').enumerate() {
                if j > 0 {
                    flush_literal(&mut literal, &mut tokens);
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                literal.push_str(part);
            }
        }
        flush_literal(&mut literal, &mut tokens);
        Pattern { tokens }
    }

    fn is_literal(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(_)))
    }

    fn is_match_all(&self) -> bool {
        matches!(self.tokens.as_slice(), [Token::Star] | [Token::Rest])
    }

    fn matches(&self, input: &str) -> bool {
        match_tokens(&self.tokens, input)
    }
}

fn flush_literal(literal: &mut String, tokens: &mut Vec<Token>) {
    if !literal.is_empty() {
        tokens.push(Token::Literal(std::mem::take(literal)));
    }
}

fn match_tokens(tokens: &[Token], input: &str) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return input.is_empty();
    };
    match first {
        Token::Literal(lit) => input
            .strip_prefix(lit.as_str())
            .is_some_and(|remaining| match_tokens(rest, remaining)),
        Token::Star => {
            if rest.is_empty() {
                return true;
            }
            input
                .char_indices()
                .map(|(i, _)| i)
                .chain(std::iter::once(input.len()))
                .any(|i| match_tokens(rest, &input[i..]))
        }
        Token::Level => {
            let end = input.find('/').unwrap_or(input.len());
            let level = &input[..end];
            level != "#" && match_tokens(rest, &input[end..])
        }
        Token::RestAfterSlash => input.is_empty() || input.starts_with('/'),
        Token::Rest => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::config::DeviceGroupConfig;

    fn statement(ops: &[&str], resources: &[&str]) -> StatementConfig {
        StatementConfig {
            description: None,
            operations: ops.iter().map(|s| s.to_string()).collect(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn auth(groups: &[(&str, &str, &str)], policies: &[(&str, StatementConfig)]) -> AuthConfig {
        let mut a = AuthConfig::default();
        for (name, rule, policy) in groups {
            a.device_groups.insert(
                name.to_string(),
                DeviceGroupConfig {
                    selection_rule: rule.to_string(),
                    policy: policy.to_string(),
                },
            );
        }
        for (i, (name, s)) in policies.iter().enumerate() {
            a.policies
                .entry(name.to_string())
                .or_default()
                .insert(format!("s{i}"), s.clone());
        }
        a
    }

    #[test]
    fn selection_rules() {
        let r = SelectionRule::parse("thingName: pump-* OR thingName: door-1").unwrap();
        assert!(r.matches(&Facts::named("pump-1")));
        assert!(r.matches(&Facts::named("pump-")));
        assert!(r.matches(&Facts::named("door-1")));
        assert!(!r.matches(&Facts::named("door-10")));
        assert!(!r.matches(&Facts::named("xpump-1")));
        let all = SelectionRule::parse("thingName: *").unwrap();
        assert!(all.matches(&Facts::named("anything")));
        assert!(SelectionRule::parse("name: pump")
            .unwrap_err()
            .contains("thingName"));
        assert!(SelectionRule::parse("thingName: pump/#").is_err());
        assert!(SelectionRule::parse("thingName: ").is_err());
    }

    #[test]
    fn topic_patterns_with_wildcards() {
        let p = Pattern::compile("dt/pump-1/#");
        assert!(p.matches("dt/pump-1"));
        assert!(p.matches("dt/pump-1/temp"));
        assert!(p.matches("dt/pump-1/a/b"));
        assert!(!p.matches("dt/pump-10/temp"));
        assert!(!p.matches("dt/pump-1x"));
        let p = Pattern::compile("dt/+/temp");
        assert!(p.matches("dt/a/temp"));
        assert!(!p.matches("dt/a/b/temp"));
        assert!(!p.matches("dt/#/temp"));
        let p = Pattern::compile("dt/sensor-*");
        assert!(p.matches("dt/sensor-1"));
        assert!(p.matches("dt/sensor-1/deep/path"));
        assert!(!p.matches("dt/pump-1"));
        assert!(Pattern::compile("*").is_match_all());
        assert!(Pattern::compile("#").is_match_all());
        assert!(Pattern::compile("a/b").is_literal());
    }

    #[test]
    fn filter_patterns_are_supersets_only() {
        let p = Pattern::compile("cmd/+");
        assert!(p.matches("cmd/a"));
        assert!(p.matches("cmd/+"));
        assert!(
            !p.matches("cmd/#"),
            "a single-level grant must not allow a multi-level filter"
        );
        let p = Pattern::compile("cmd/#");
        assert!(p.matches("cmd/#"));
        assert!(p.matches("cmd/+/x"));
        assert!(!p.matches("#"));
    }

    /// Selection by what the AWS IoT registry knows, and its policy variables: a value that
    /// is not a valid name (a wildcard, a `/`) is never substituted, so the resource grants
    /// nothing rather than more.
    #[test]
    fn registry_facts_select_groups_and_fill_variables() {
        let a = auth(
            &[(
                "freezers",
                "thingGroup: freezers OR thingType: freezer-* OR attribute.site: north",
                "zone",
            )],
            &[(
                "zone",
                statement(
                    &["mqtt:publish"],
                    &[
                        "mqtt:topic:zone/${iot:Connection.Thing.Attributes[zone]}/#",
                        "mqtt:topic:type/${iot:Connection.Thing.ThingTypeName}",
                    ],
                ),
            )],
        );
        let set = PolicySet::compile(&a).unwrap();
        let mut f = Facts::named("fz-1");
        assert!(set.groups_matching(&f).is_empty());
        f.thing_groups = vec!["freezers".into()];
        assert_eq!(set.groups_matching(&f), vec!["freezers"]);
        let by_type = Facts {
            thing_type: Some("freezer-x".into()),
            ..Facts::named("fz-2")
        };
        assert_eq!(set.groups_matching(&by_type), vec!["freezers"]);
        let mut by_attr = Facts::named("fz-3");
        by_attr.attributes.insert("site".into(), "north".into());
        assert_eq!(set.groups_matching(&by_attr), vec!["freezers"]);

        f.attributes.insert("zone".into(), "b".into());
        f.thing_type = Some("freezer-x".into());
        let p = set.permissions(&f, &["freezers".into()]);
        assert!(p.allows(Operation::Publish, "zone/b/t"));
        assert!(p.allows(Operation::Publish, "type/freezer-x"));
        assert!(!p.allows(Operation::Publish, "zone/c/t"));
        for hostile in ["#", "*", "b/#", "a b", ""] {
            f.attributes.insert("zone".into(), hostile.into());
            let p = set.permissions(&f, &["freezers".into()]);
            assert!(
                !p.allows(Operation::Publish, "zone/b/t"),
                "{hostile:?} widened"
            );
            assert!(
                !p.allows(Operation::Publish, "zone/#/t"),
                "{hostile:?} substituted"
            );
        }
        // Without a type, the type resource grants nothing.
        f.thing_type = None;
        assert!(!set
            .permissions(&f, &["freezers".into()])
            .allows(Operation::Publish, "type/"));
        assert!(SelectionRule::parse("attribute.a b: x").is_err());
        assert!(SelectionRule::parse("thingColor: red")
            .unwrap_err()
            .contains("thingGroup"));
        let bad = statement(
            &["mqtt:publish"],
            &["mqtt:topic:${iot:Connection.Thing.Attributes[a/b]}"],
        );
        assert!(PolicySet::compile(&auth(&[], &[("p", bad)])).is_err());
    }

    #[test]
    fn thing_variable_and_union_of_groups() {
        let a = auth(
            &[
                ("sensors", "thingName: sensor-*", "telemetry"),
                ("cmd", "thingName: sensor-1", "commands"),
            ],
            &[
                (
                    "telemetry",
                    statement(
                        &["mqtt:connect", "mqtt:publish"],
                        &[
                            "mqtt:clientId:${iot:Connection.Thing.ThingName}",
                            "mqtt:topic:dt/${iot:Connection.Thing.ThingName}/#",
                        ],
                    ),
                ),
                (
                    "commands",
                    statement(
                        &["mqtt:subscribe"],
                        &["mqtt:topicfilter:cmd/${iot:Connection.Thing.ThingName}/#"],
                    ),
                ),
            ],
        );
        let set = PolicySet::compile(&a).unwrap();
        assert_eq!(
            set.groups_matching(&Facts::named("sensor-1")),
            vec!["cmd", "sensors"]
        );
        assert_eq!(
            set.groups_matching(&Facts::named("sensor-2")),
            vec!["sensors"]
        );
        let p = set.permissions(
            &Facts::named("sensor-1"),
            &set.groups_matching(&Facts::named("sensor-1")),
        );
        assert!(p.allows(Operation::Connect, "sensor-1"));
        assert!(!p.allows(Operation::Connect, "sensor-2"));
        assert!(p.allows(Operation::Publish, "dt/sensor-1/temp"));
        assert!(!p.allows(Operation::Publish, "dt/sensor-2/temp"));
        assert!(p.allows(Operation::Subscribe, "cmd/sensor-1/#"));
        // Resources of another kind never leak into an operation.
        assert!(!p.allows(Operation::Subscribe, "dt/sensor-1/temp"));
        let p2 = set.permissions(
            &Facts::named("sensor-2"),
            &set.groups_matching(&Facts::named("sensor-2")),
        );
        assert!(!p2.allows(Operation::Subscribe, "cmd/sensor-2/#"));
    }

    #[test]
    fn provisioning_allows_only_its_own_topic() {
        let set = PolicySet::compile(&AuthConfig::default()).unwrap();
        let p = set.provisioning_permissions("new-1");
        assert!(p.allows(Operation::Connect, "new-1"));
        assert!(p.allows(Operation::Publish, "$sitegate/provisioning/new-1"));
        assert!(!p.allows(Operation::Publish, "$sitegate/provisioning/new-2"));
        assert!(!p.allows(Operation::Publish, "dt/new-1/temp"));
        assert!(!p.allows(Operation::Subscribe, "#"));
    }

    #[test]
    fn errors_name_the_key() {
        let a = auth(&[("g", "thingName: a", "missing")], &[]);
        let e = PolicySet::compile(&a).unwrap_err();
        assert_eq!(e.key, "auth.device_groups.g.policy");
        let a = auth(&[], &[("p", statement(&["mqtt:fly"], &["*"]))]);
        let e = PolicySet::compile(&a).unwrap_err();
        assert_eq!(e.key, "auth.policies.p.s0.operations");
        let a = auth(
            &[],
            &[(
                "p",
                statement(&["mqtt:publish"], &["mqtt:topic:${iot:Nope}/x"]),
            )],
        );
        let e = PolicySet::compile(&a).unwrap_err();
        assert!(e.reason.contains("unknown variable"), "{e}");
        let a = auth(
            &[("provisioning", "thingName: *", "p")],
            &[("p", statement(&["*"], &["*"]))],
        );
        assert!(PolicySet::compile(&a)
            .unwrap_err()
            .reason
            .contains("built in"));
    }
}

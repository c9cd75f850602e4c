//! Who asks, and may they: test identities from bearer tokens, RBAC evaluated against the Roles,
//! ClusterRoles and their bindings stored in the server, and an audit log of every resource request.
//!
//! Authentication is a test convention, not security: the bearer token *is* the user name. A token
//! `system:serviceaccount:<namespace>:<name>` is that ServiceAccount (groups `system:serviceaccounts`,
//! `system:serviceaccounts:<namespace>`, `system:authenticated`); any other token is a user of that name
//! in `system:authenticated`; a request without a token is `system:admin` in `system:masters`, which is
//! always allowed (the tests' own clients, kubectl and helm).
//!
//! With [`Options::authorize`](crate::Options::authorize) on, a request the stored RBAC does not allow
//! gets kube-apiserver's `403 Forbidden`. Rules match as kube-apiserver's RBAC authorizer does: API
//! groups, resources (`resource/subresource` for subresources, `*`, `*/subresource`), verbs (`*`), and
//! `resourceNames` (only for requests naming an object). RoleBindings grant in their namespace only.
//! Aggregated ClusterRoles and non-resource URLs are not evaluated (discovery, OpenAPI and health are
//! open to everyone).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::Value;

use crate::api::Target;
use crate::store::Inner;

/// The user of [`Identity::admin`], who may do everything.
pub const ADMIN_USER: &str = "system:admin";
const MASTERS_GROUP: &str = "system:masters";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// A requester: user name and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name, e.g. `system:serviceaccount:lockstep:lockstep-operator`.
    pub user: String,
    /// The groups the user is in.
    pub groups: Vec<String>,
}

impl Identity {
    /// The identity of a request without credentials: the cluster administrator.
    pub fn admin() -> Self {
        Self {
            user: ADMIN_USER.to_owned(),
            groups: vec![MASTERS_GROUP.to_owned(), "system:authenticated".to_owned()],
        }
    }

    /// The identity a bearer token names (see the module documentation).
    pub fn from_token(token: &str) -> Self {
        let mut groups = Vec::new();
        if let Some((namespace, _)) = token
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        {
            groups.push("system:serviceaccounts".to_owned());
            groups.push(format!("system:serviceaccounts:{namespace}"));
        }
        groups.push("system:authenticated".to_owned());
        Self {
            user: token.to_owned(),
            groups,
        }
    }

    /// The identity of a request, from its `Authorization` header value (if any).
    pub fn from_authorization(header: Option<&str>) -> Self {
        match header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
        {
            Some(token) if !token.is_empty() => Self::from_token(token),
            _ => Self::admin(),
        }
    }

    /// The ServiceAccount `(namespace, name)` this identity is, if it is one.
    fn service_account(&self) -> Option<(&str, &str)> {
        self.user
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
    }
}

/// What a resource request asks to do, in RBAC's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `deletecollection`.
    pub verb: &'static str,
    /// The API group (empty for core).
    pub group: String,
    /// The resource plural.
    pub resource: String,
    /// The subresource, e.g. `status`.
    pub subresource: Option<String>,
    /// The namespace, for namespaced requests.
    pub namespace: Option<String>,
    /// The object's name, when the request names one.
    pub name: Option<String>,
}

impl Attributes {
    /// The attributes of a request on `target` with HTTP `method`; `None` for methods RBAC has no verb for.
    pub fn of(method: &str, target: &Target, watch: bool) -> Option<Self> {
        let named = target.name.is_some();
        let verb = match method {
            "GET" | "HEAD" if watch => "watch",
            "GET" | "HEAD" if named => "get",
            "GET" | "HEAD" => "list",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" if named => "delete",
            "DELETE" => "deletecollection",
            _ => return None,
        };
        Some(Self {
            verb,
            group: target.group.clone(),
            resource: target.plural.clone(),
            subresource: target.subresource.clone(),
            namespace: target.namespace.clone(),
            name: target.name.clone(),
        })
    }

    /// `resource` or `resource/subresource`.
    pub fn resource_path(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// kube-apiserver's wording of a refusal.
    pub fn forbidden_message(&self, user: &str) -> String {
        let qualified = crate::error::qualified_resource(&self.group, &self.resource);
        let subject = match &self.name {
            Some(name) => format!("{qualified} \"{name}\""),
            None => qualified,
        };
        let scope = match &self.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        format!(
            "{subject} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.verb,
            self.resource_path(),
            self.group
        )
    }
}

/// One resource request, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Who asked.
    pub user: String,
    /// What they asked.
    pub attributes: Attributes,
    /// Whether RBAC allows it (recorded whether or not authorization is enforced).
    pub allowed: bool,
}

/// How many entries the audit log keeps: the oldest go first, so a long run (the demo, a benchmark)
/// does not grow without bound.
pub const AUDIT_CAPACITY: usize = 100_000;

/// The resource requests since the server started (or since [`clear`](Self::clear)), the latest
/// [`AUDIT_CAPACITY`] of them.
#[derive(Debug, Default)]
pub struct AuditLog {
    entries: Mutex<VecDeque<AuditEntry>>,
}

impl AuditLog {
    /// Appends an entry, forgetting the oldest when full.
    pub fn record(&self, entry: AuditEntry) {
        let mut entries = self.lock();
        if entries.len() == AUDIT_CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// A copy of the entries, oldest first.
    pub fn entries(&self) -> Vec<AuditEntry> {
        self.lock().iter().cloned().collect()
    }

    /// The entries RBAC did not allow.
    pub fn denied(&self) -> Vec<AuditEntry> {
        self.lock().iter().filter(|e| !e.allowed).cloned().collect()
    }

    /// Forgets every entry.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<AuditEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// Whether the RBAC objects in `inner` allow `identity` to do `attributes`.
pub fn is_allowed(inner: &Inner, identity: &Identity, attributes: &Attributes) -> bool {
    if identity.groups.iter().any(|g| g == MASTERS_GROUP) {
        return true;
    }
    let bindings = |plural: &str| -> Vec<Value> {
        inner
            .list(&(RBAC_GROUP.to_owned(), plural.to_owned()), None, None)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let role_rules = |plural: &str, namespace: Option<&str>, name: &str| -> Vec<Value> {
        let key = (namespace.unwrap_or_default().to_owned(), name.to_owned());
        inner
            .get(&(RBAC_GROUP.to_owned(), plural.to_owned()), &key)
            .and_then(|role| role.get("rules"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let grants = |rules: Vec<Value>| rules.iter().any(|rule| rule_allows(rule, attributes));

    for binding in bindings("clusterrolebindings") {
        if binds(&binding, identity, None)
            && role_ref(&binding).0 == "ClusterRole"
            && grants(role_rules("clusterroles", None, role_ref(&binding).1))
        {
            return true;
        }
    }
    let Some(namespace) = attributes.namespace.as_deref() else {
        return false;
    };
    for binding in bindings("rolebindings") {
        let binding_ns = binding
            .pointer("/metadata/namespace")
            .and_then(Value::as_str);
        if binding_ns != Some(namespace) || !binds(&binding, identity, Some(namespace)) {
            continue;
        }
        let rules = match role_ref(&binding) {
            ("ClusterRole", name) => role_rules("clusterroles", None, name),
            ("Role", name) => role_rules("roles", Some(namespace), name),
            _ => Vec::new(),
        };
        if grants(rules) {
            return true;
        }
    }
    false
}

fn role_ref(binding: &Value) -> (&str, &str) {
    let field = |f: &str| {
        binding
            .pointer(&format!("/roleRef/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    (field("kind"), field("name"))
}

/// Whether one of the binding's subjects is `identity`. A ServiceAccount subject without a namespace
/// takes the RoleBinding's.
fn binds(binding: &Value, identity: &Identity, binding_namespace: Option<&str>) -> bool {
    let Some(subjects) = binding.get("subjects").and_then(Value::as_array) else {
        return false;
    };
    subjects.iter().any(|subject| {
        let field = |f: &str| subject.get(f).and_then(Value::as_str);
        match field("kind") {
            Some("User") => field("name") == Some(identity.user.as_str()),
            Some("Group") => field("name").is_some_and(|g| identity.groups.iter().any(|m| m == g)),
            Some("ServiceAccount") => {
                let namespace = field("namespace").or(binding_namespace);
                identity.service_account() == namespace.zip(field("name"))
            }
            _ => false,
        }
    })
}

fn rule_allows(rule: &Value, attributes: &Attributes) -> bool {
    let list = |f: &str| -> Vec<&str> {
        rule.get(f)
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let groups = list("apiGroups");
    let resources = list("resources");
    let verbs = list("verbs");
    let names = list("resourceNames");
    let group_ok = groups.iter().any(|g| *g == "*" || *g == attributes.group);
    let verb_ok = verbs.iter().any(|v| *v == "*" || *v == attributes.verb);
    let path = attributes.resource_path();
    let resource_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == path
            || attributes
                .subresource
                .as_deref()
                .is_some_and(|sub| r.strip_prefix("*/") == Some(sub))
    });
    let name_ok = names.is_empty()
        || attributes
            .name
            .as_deref()
            .is_some_and(|name| names.contains(&name));
    group_ok && verb_ok && resource_ok && name_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attributes(verb: &'static str, resource: &str, sub: Option<&str>) -> Attributes {
        Attributes {
            verb,
            group: "lockstep.dev".into(),
            resource: resource.into(),
            subresource: sub.map(Into::into),
            namespace: Some("orders".into()),
            name: Some("g".into()),
        }
    }

    #[test]
    fn tokens_name_service_accounts_and_users() {
        let sa = Identity::from_authorization(Some("Bearer system:serviceaccount:lockstep:op"));
        assert_eq!(sa.service_account(), Some(("lockstep", "op")));
        assert!(
            sa.groups
                .contains(&"system:serviceaccounts:lockstep".to_owned())
        );
        assert_eq!(Identity::from_authorization(None), Identity::admin());
        assert_eq!(
            Identity::from_token("alice").groups,
            ["system:authenticated"]
        );
    }

    #[test]
    fn a_subresource_needs_its_own_resource_entry() {
        let rule = json!({"apiGroups": ["lockstep.dev"], "resources": ["consistencygroups"], "verbs": ["patch"]});
        assert!(rule_allows(
            &rule,
            &attributes("patch", "consistencygroups", None)
        ));
        assert!(!rule_allows(
            &rule,
            &attributes("patch", "consistencygroups", Some("status"))
        ));
        let star = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]});
        assert!(rule_allows(
            &star,
            &attributes("update", "consistencygroups", Some("status"))
        ));
    }

    #[test]
    fn resource_names_restrict_to_named_requests() {
        let rule = json!({"apiGroups": ["lockstep.dev"], "resources": ["consistencygroups"],
                          "verbs": ["get", "list"], "resourceNames": ["g"]});
        assert!(rule_allows(
            &rule,
            &attributes("get", "consistencygroups", None)
        ));
        let mut list = attributes("list", "consistencygroups", None);
        list.name = None;
        assert!(!rule_allows(&rule, &list));
    }

    #[test]
    fn refusals_read_like_kube_apiserver() {
        let a = attributes("patch", "consistencygroups", Some("status"));
        assert_eq!(
            a.forbidden_message("system:serviceaccount:lockstep:sidecar"),
            "consistencygroups.lockstep.dev \"g\" is forbidden: User \
             \"system:serviceaccount:lockstep:sidecar\" cannot patch resource \
             \"consistencygroups/status\" in API group \"lockstep.dev\" in the namespace \"orders\""
        );
    }
}

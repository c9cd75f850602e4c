//! The committed CRD YAML matches the types, and the examples are accepted or refused as they say.
//!
//! Valid examples must pass the generated OpenAPI schema (`jsonschema`) and every CEL rule (evaluated by
//! `kube-cel`, with defaults applied as the API server does). Each invalid example (the corpus in
//! `examples/invalid/`, see `lockstep_testapi::invalid_examples`) carries a `# expect: <text>` header: the
//! text must appear in the refusal, worded as kube-apiserver words it (`path: Too many: …`, `Invalid value:
//! "…": path in body should match '…'`), in a failed CEL rule's message, in the object name's refusal or in
//! the request size limit's. The corpus covers every category of attack with at least three manifests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use jsonschema::error::{TypeKind, ValidationErrorKind};
use lockstep_api::crds;
use lockstep_testapi::api::name_ok;
use lockstep_testapi::error::go_quote;
use lockstep_testapi::invalid_examples::{CATEGORIES, InvalidExample};
use lockstep_testapi::schema::json_type;
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    manifest_dir().join("..")
}

/// The openAPIV3Schema of the CRD serving `kind`.
fn schema_for(kind: &str) -> Value {
    let crd = crds::all()
        .into_iter()
        .find(|crd| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD serves kind {kind}"));
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

/// Every error the API server would give for `object` (schema first, then CEL), as `path: message`.
fn admission_errors(object: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = object["kind"]
        .as_str()
        .expect("every example names its kind");
    let schema = schema_for(kind);
    let validator = jsonschema::draft4::new(&schema).expect("the generated schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|error| {
            let path = kube_path(error.instance_path().as_str());
            kube_wording(&path, error.kind(), error.instance())
                .unwrap_or_else(|| format!("{path}: {error}"))
        })
        .collect();
    list_type_errors(&schema, object, "", &mut errors);
    if let Err(failures) = kube_cel::Validator::new().validate(&schema, object, old) {
        errors.extend(failures.iter().map(ToString::to_string));
    }
    errors
}

/// A JSON pointer (`/spec/members/0/pvcNames`) as kube-apiserver writes a field path
/// (`spec.members[0].pvcNames`).
fn kube_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').filter(|segment| !segment.is_empty()) {
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    path
}

/// A schema error as kube-apiserver words it, for the kinds of error the corpus provokes.
fn kube_wording(path: &str, kind: &ValidationErrorKind, instance: &Value) -> Option<String> {
    Some(match kind {
        ValidationErrorKind::Type {
            kind: TypeKind::Single(expected),
        } => {
            let actual = json_type(instance);
            format!(
                "{path}: Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""
            )
        }
        ValidationErrorKind::MaxItems { limit } => format!(
            "{path}: Too many: {}: must have at most {limit} items",
            instance.as_array().map_or(0, Vec::len)
        ),
        ValidationErrorKind::MaxLength { limit } => {
            format!("{path}: Too long: may not be more than {limit} bytes")
        }
        ValidationErrorKind::Pattern { pattern } => format!(
            "{path}: Invalid value: {}: {path} in body should match '{pattern}'",
            go_quote(instance.as_str()?)
        ),
        ValidationErrorKind::Required { property } => {
            format!("{path}.{}: Required value", property.as_str()?)
        }
        _ => return None,
    })
}

/// What kube-apiserver says of an object name that is no lowercase RFC 1123 subdomain.
fn name_errors(object: &Value) -> Vec<String> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if name_ok(name) {
        return Vec::new();
    }
    vec![format!(
        "metadata.name: Invalid value: {}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        go_quote(name)
    )]
}

/// kube-apiserver's limit on a request body (`--max-request-bytes`' default).
const MAX_REQUEST_BYTES: usize = 3 << 20;

/// Every error kube-apiserver would give for an invalid example sent by `kubectl apply`: a body over
/// the request size limit is refused before it is read; otherwise the name and the schema are checked.
fn refusal(example: &InvalidExample) -> Vec<String> {
    let body = serde_json::to_vec(&example.as_kubectl_applies()).unwrap();
    if body.len() > MAX_REQUEST_BYTES {
        return vec![format!(
            "Request entity too large: limit is {MAX_REQUEST_BYTES}"
        )];
    }
    let mut errors = name_errors(&example.object);
    errors.extend(admission_errors(&example.object, None));
    errors
}

/// What the API server says of a list whose `x-kubernetes-list-type` is `set` and that repeats an item
/// (JSON Schema has no such keyword, and Kubernetes forbids `uniqueItems`).
fn list_type_errors(schema: &Value, object: &Value, path: &str, errors: &mut Vec<String>) {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match object {
        Value::Object(fields) => {
            for (key, value) in fields {
                if let Some(sub) = schema.pointer(&format!("/properties/{key}")) {
                    list_type_errors(sub, value, &at(key), errors);
                }
            }
        }
        Value::Array(items) => {
            let is_set = schema["x-kubernetes-list-type"] == "set";
            for (index, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{index}]");
                if is_set && items[..index].contains(item) {
                    errors.push(format!("{item_path}: Duplicate value: {item}"));
                }
                list_type_errors(&schema["items"], item, &item_path, errors);
            }
        }
        _ => {}
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            let value: serde_yaml_ng::Value = serde::Deserialize::deserialize(document).unwrap();
            serde_json::to_value(value).unwrap()
        })
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    for crd in crds::all() {
        for dir in ["crds", crds::HELM_CHART_CRDS] {
            let file = repo_root().join(dir).join(crds::file_name(&crd));
            let committed = std::fs::read_to_string(&file).unwrap_or_default();
            let generated = crds::to_yaml(&crd).unwrap();
            assert!(
                committed == generated,
                "{} is out of date with the types in crds/src/v1alpha1: run `{}` and commit the result",
                file.display(),
                crds::REGENERATE_COMMAND
            );
        }
    }
}

#[test]
fn every_valid_example_is_accepted() {
    let files = yaml_files(&repo_root().join("examples"));
    assert!(
        files.len() >= 4,
        "expected the example manifests, found {files:?}"
    );
    for file in files {
        for object in documents(&file) {
            let errors = admission_errors(&object, None);
            assert!(
                errors.is_empty(),
                "{} should be valid, but: {errors:#?}",
                file.display()
            );
        }
    }
}

fn corpus() -> Vec<InvalidExample> {
    InvalidExample::read_all(&repo_root().join("examples/invalid")).unwrap()
}

#[test]
fn every_invalid_example_is_refused_for_its_stated_reason() {
    for example in corpus() {
        let errors = refusal(&example);
        assert!(
            errors.iter().any(|error| error.contains(&example.expect)),
            "{} should be refused with {:?}, got {errors:#?}",
            example.file_name,
            example.expect
        );
    }
}

#[test]
fn the_invalid_corpus_has_at_least_three_manifests_of_every_category() {
    let corpus = corpus();
    let mut per_category: std::collections::BTreeMap<&str, usize> =
        CATEGORIES.iter().map(|category| (*category, 0)).collect();
    for example in &corpus {
        let [category] = example.categories.as_slice() else {
            panic!(
                "{} needs exactly one `# category:` line, has {:?}",
                example.file_name, example.categories
            );
        };
        let count = per_category.get_mut(category.as_str()).unwrap_or_else(|| {
            panic!(
                "{}: unknown category {category:?}, not one of {CATEGORIES:?}",
                example.file_name
            )
        });
        *count += 1;
    }
    for (category, count) in &per_category {
        assert!(
            *count >= 3,
            "{count} manifests of category {category}, want at least 3: {per_category:?}"
        );
    }
    assert!(
        corpus.len() >= 30,
        "{} manifests, want at least 30",
        corpus.len()
    );
}

fn group_with_status_epoch(epoch: u64) -> Value {
    json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": {"name": "orders-db"},
        "spec": {"members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["wal"]}]},
        "status": {"epoch": epoch, "phase": "Frozen", "stage": "Freeze"}
    })
}

#[test]
fn the_status_epoch_never_decreases() {
    let old = group_with_status_epoch(5);
    let lowered = admission_errors(&group_with_status_epoch(4), Some(&old));
    assert!(
        lowered
            .iter()
            .any(|error| error.contains("status.epoch never decreases")),
        "lowering the epoch must be refused, got {lowered:#?}"
    );
    assert_eq!(
        admission_errors(&group_with_status_epoch(5), Some(&old)),
        Vec::<String>::new()
    );
    assert_eq!(
        admission_errors(&group_with_status_epoch(6), Some(&old)),
        Vec::<String>::new()
    );
}

fn group_with_failover(epoch: Option<u64>) -> Value {
    let mut group = json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "ConsistencyGroup",
        "metadata": {"name": "orders-db"},
        "spec": {"members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["wal"]}]}
    });
    if let Some(epoch) = epoch {
        group["spec"]["failover"] = json!({"epoch": epoch});
    }
    group
}

#[test]
fn the_failover_intent_is_never_removed_or_lowered() {
    let old = group_with_failover(Some(7));
    for (new, what) in [(None, "removing"), (Some(6), "lowering")] {
        let errors = admission_errors(&group_with_failover(new), Some(&old));
        assert!(
            errors
                .iter()
                .any(|error| error.contains("spec.failover is never removed or lowered")),
            "{what} spec.failover must be refused, got {errors:#?}"
        );
    }
    for (new, old) in [
        (Some(7), Some(7)),
        (Some(8), Some(7)),
        (Some(3), None),
        (None, None),
    ] {
        assert_eq!(
            admission_errors(&group_with_failover(new), Some(&group_with_failover(old))),
            Vec::<String>::new(),
            "{old:?} -> {new:?}"
        );
    }
    // At creation it is an ordinary intent by epoch, bounded like the others.
    assert_eq!(
        admission_errors(&group_with_failover(Some(3)), None),
        Vec::<String>::new()
    );
    assert!(!admission_errors(&group_with_failover(Some(1 << 53)), None).is_empty());
}

/// The strings of a schema node and its children that have neither a `maxLength` nor an `enum`, or a
/// `maxLength` above 1024, as paths.
fn unbounded_strings(node: &Value, path: &str, found: &mut Vec<String>) {
    if node["type"] == "string" && node.get("enum").is_none() {
        match node["maxLength"].as_u64() {
            Some(max) if max <= 1024 => {}
            // A cluster's JWKS (a few public keys, pasted as `kubectl get --raw /openid/v1/jwks` prints
            // it): bounded, one per MemberCluster, never copied into a status.
            Some(max) if path == ".spec.serviceAccountKeys" && max <= 65536 => {}
            Some(max) => found.push(format!("{path}: maxLength {max} above 1024")),
            None => found.push(format!("{path}: no maxLength")),
        }
    }
    if let Some(properties) = node["properties"].as_object() {
        for (name, child) in properties {
            unbounded_strings(child, &format!("{path}.{name}"), found);
        }
    }
    if let Some(items) = node.get("items") {
        unbounded_strings(items, &format!("{path}[]"), found);
    }
    if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
        unbounded_strings(values, &format!("{path}{{}}"), found);
    }
}

#[test]
fn every_spec_and_status_string_has_a_max_length_of_at_most_1024() {
    // One oversized string (a 2 MiB copy error) made a group's status unwritable (issue 21 item 2): the API
    // server must refuse it at the door, and the operator bounds what it writes to the same limits.
    for crd in crds::all() {
        let kind = crd.spec.names.kind.clone();
        let mut found = Vec::new();
        unbounded_strings(&schema_for(&kind), "", &mut found);
        assert!(found.is_empty(), "{kind}: unbounded strings: {found:#?}");
    }
}

/// Every rule in a compiled schema, with the cost analysis of the node it sits on.
fn cost_warnings(node: &kube_cel::CompiledSchema, found: &mut Vec<String>, rules: &mut usize) {
    for compiled in &node.validations {
        let compiled = compiled.as_ref().expect("every CEL rule compiles");
        *rules += 1;
        let warnings = kube_cel::estimate_rule_cost(&compiled.rule.rule, node);
        found.extend(
            warnings
                .into_iter()
                .map(|warning| format!("{}: {}", warning.rule, warning.message)),
        );
    }
    let children = node
        .properties
        .values()
        .chain(node.items.as_deref())
        .chain(node.additional_properties.as_deref());
    for child in children {
        cost_warnings(child, found, rules);
    }
}

#[test]
fn cel_rules_compile_and_touch_only_bounded_lists_and_strings() {
    // kube-apiserver refuses rules whose estimated cost is unbounded; kube-cel's estimator warns the same.
    let mut rules = 0;
    for crd in crds::all() {
        let schema = schema_for(&crd.spec.names.kind);
        let compiled = kube_cel::compile_schema(&schema);
        assert!(
            !compiled.has_errors(),
            "{}: {:?}",
            crd.spec.names.kind,
            compiled.compilation_errors()
        );
        let mut warnings = Vec::new();
        cost_warnings(&compiled, &mut warnings, &mut rules);
        assert!(
            warnings.is_empty(),
            "{}: {warnings:#?}",
            crd.spec.names.kind
        );
    }
    assert!(
        rules >= 8,
        "expected the project's CEL rules, found {rules}"
    );
}

/// The crate's directory: where cargo says it is when it runs this (a binary reused from a build in
/// another checkout of the same tree would otherwise read that checkout's files), else where it was built.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

#[test]
fn status_epochs_beyond_2_53_are_refused() {
    let errors = admission_errors(
        &group_with_status_epoch(lockstep_api::domain::MAX_EPOCH + 1),
        None,
    );
    assert!(
        errors
            .iter()
            .any(|error| error.contains("9007199254740991")),
        "an epoch beyond 2^53 - 1 must be refused, got {errors:#?}"
    );
    assert_eq!(
        admission_errors(
            &group_with_status_epoch(lockstep_api::domain::MAX_EPOCH),
            None
        ),
        Vec::<String>::new()
    );
}

//! The API as a kube-rs client sees it: CRUD, kube-apiserver-shaped errors, selectors, finalizers, CRDs
//! with schema and CEL validation, the status subresource, generation, patches and server-side apply.

mod common;

use std::collections::BTreeMap;

use common::{TestResult, api_error, install_widgets, server, widget_resource};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
    cm
}

fn names(list: &kube::core::ObjectList<ConfigMap>) -> Vec<String> {
    list.items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect()
}

#[tokio::test]
async fn crud_with_kube_apiserver_errors() -> TestResult {
    let (_server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    let created = cms.create(&pp, &config_map("a", &[("app", "web")])).await?;
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default()
        .parse()?;

    // 409 AlreadyExists.
    let err = cms
        .create(&pp, &config_map("a", &[]))
        .await
        .err()
        .ok_or("second create succeeded")?;
    assert_eq!(
        api_error(&err),
        Some((
            409,
            "AlreadyExists".into(),
            "configmaps \"a\" already exists".into()
        ))
    );

    // 404 NotFound.
    let err = cms
        .get("nope")
        .await
        .err()
        .ok_or("get of a missing object succeeded")?;
    assert_eq!(
        api_error(&err),
        Some((
            404,
            "NotFound".into(),
            "configmaps \"nope\" not found".into()
        ))
    );

    // Update moves the resourceVersion; a stale one is a 409 Conflict.
    let mut changed = created.clone();
    changed.data = Some(BTreeMap::from([("k".to_string(), "w".to_string())]));
    let updated = cms.replace("a", &pp, &changed).await?;
    let rv2: u64 = updated
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default()
        .parse()?;
    assert!(rv2 > rv1);
    let err = cms
        .replace("a", &pp, &changed)
        .await
        .err()
        .ok_or("stale update succeeded")?;
    let (code, reason, message) = api_error(&err).ok_or("not an API error")?;
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(
        message.contains("the object has been modified"),
        "{message}"
    );

    // An update that changes nothing keeps the resourceVersion.
    let same = cms.replace("a", &pp, &updated).await?;
    assert_eq!(
        same.metadata.resource_version,
        updated.metadata.resource_version
    );

    // generateName.
    let mut generated_cm = config_map("", &[("app", "db")]);
    generated_cm.metadata.name = None;
    generated_cm.metadata.generate_name = Some("gen-".into());
    let generated = cms.create(&pp, &generated_cm).await?;
    let gname = generated.metadata.name.clone().unwrap_or_default();
    assert!(gname.starts_with("gen-") && gname.len() == 9, "{gname}");

    // No such namespace.
    let missing: Api<ConfigMap> = Api::namespaced(client.clone(), "missing");
    let err = missing
        .create(&pp, &config_map("x", &[]))
        .await
        .err()
        .ok_or("create in a missing namespace")?;
    assert_eq!(api_error(&err).map(|e| e.0), Some(404));

    // Selectors.
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("other".into());
    nss.create(&pp, &ns).await?;
    let other: Api<ConfigMap> = Api::namespaced(client.clone(), "other");
    other
        .create(&pp, &config_map("b", &[("app", "web"), ("tier", "front")]))
        .await?;
    let all: Api<ConfigMap> = Api::all(client.clone());
    let lp = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(&all.list(&lp("app=web")).await?), vec!["a", "b"]);
    assert_eq!(
        names(&all.list(&lp("app!=web")).await?),
        vec![gname.clone()]
    );
    assert_eq!(
        names(&all.list(&lp("app in (db,web),tier")).await?),
        vec!["b"]
    );
    assert_eq!(
        names(&all.list(&lp("app notin (web)")).await?),
        vec![gname.clone()]
    );
    assert_eq!(names(&all.list(&lp("!tier")).await?).len(), 2);
    let fp = |s: &str| ListParams::default().fields(s);
    assert_eq!(names(&all.list(&fp("metadata.name=b")).await?), vec!["b"]);
    assert_eq!(
        names(
            &all.list(&fp("metadata.namespace=default,metadata.name!=a"))
                .await?
        ),
        vec![gname.clone()]
    );

    // Pagination.
    let page = all.list(&ListParams::default().limit(2)).await?;
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().ok_or("no continue token")?;
    let rest = all
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await?;
    assert_eq!(rest.items.len(), 1);
    assert!(rest.metadata.continue_.is_none());

    // Delete.
    cms.delete("a", &DeleteParams::default()).await?;
    assert!(cms.get_opt("a").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn finalizers_keep_a_deleted_object_until_removed() -> TestResult {
    let (_server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut cm = config_map("held", &[]);
    cm.metadata.finalizers = Some(vec!["lockstep.dev/test".into()]);
    cms.create(&PostParams::default(), &cm).await?;
    let deleted = cms.delete("held", &DeleteParams::default()).await?;
    let marked = deleted.left().ok_or("expected the object back")?;
    assert!(marked.metadata.deletion_timestamp.is_some());
    let still = cms.get("held").await?;
    assert!(still.metadata.deletion_timestamp.is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    assert!(
        cms.get_opt("held").await?.is_none(),
        "gone once the last finalizer is removed"
    );
    Ok(())
}

#[tokio::test]
async fn patches_json_merge_and_strategic() -> TestResult {
    let (_server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(&PostParams::default(), &config_map("p", &[]))
        .await?;
    let pp = PatchParams::default();
    let patched = cms
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"data": {"m": "1", "k": null}})),
        )
        .await?;
    assert_eq!(
        patched.data,
        Some(BTreeMap::from([("m".to_string(), "1".to_string())]))
    );
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/data/j", "value": "2"}]))?;
    let patched = cms.patch("p", &pp, &Patch::<()>::Json(jp)).await?;
    assert_eq!(
        patched
            .data
            .as_ref()
            .and_then(|d| d.get("j"))
            .map(String::as_str),
        Some("2")
    );
    let patched = cms
        .patch(
            "p",
            &pp,
            &Patch::Strategic(json!({"data": {"s": "3"}, "$retainKeys": ["data"]})),
        )
        .await?;
    assert_eq!(patched.data.map(|d| d.len()), Some(3));
    Ok(())
}

#[tokio::test]
async fn crds_register_and_validate_custom_resources() -> TestResult {
    let (_server, client) = server().await?;
    install_widgets(&client).await?;
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &widget_resource());
    let widget =
        |name: &str, spec: serde_json::Value| -> Result<DynamicObject, serde_json::Error> {
            serde_json::from_value(
                json!({"apiVersion": "test.lockstep.dev/v1", "kind": "Widget",
                                      "metadata": {"name": name}, "spec": spec}),
            )
        };
    let pp = PostParams::default();

    // Defaults applied, unknown fields pruned, status dropped on create, generation 1.
    let mut w = widget("w", json!({"size": 2, "bogus": true}))?;
    w.data["status"] = json!({"epoch": 9});
    let created = widgets.create(&pp, &w).await?;
    assert_eq!(created.data["spec"], json!({"size": 2, "mode": "Safe"}));
    assert!(created.data.get("status").is_none());
    assert_eq!(created.metadata.generation, Some(1));

    // Schema errors, worded like kube-apiserver's.
    let err = widgets
        .create(
            &pp,
            &widget("bad", json!({"size": 11, "mode": "Slow", "label": "X"}))?,
        )
        .await
        .err()
        .ok_or("invalid widget accepted")?;
    let (code, reason, message) = api_error(&err).ok_or("not an API error")?;
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(
        message.starts_with("Widget.test.lockstep.dev \"bad\" is invalid: ["),
        "{message}"
    );
    assert!(
        message.contains(
            "spec.size: Invalid value: 11: spec.size in body should be less than or equal to 10"
        ),
        "{message}"
    );
    assert!(
        message.contains(
            "spec.mode: Unsupported value: \"Slow\": supported values: \"Fast\", \"Safe\""
        ),
        "{message}"
    );
    assert!(
        message.contains(
            "spec.label: Invalid value: \"X\": spec.label in body should match '^[a-z]+$'"
        ),
        "{message}"
    );
    let err = widgets
        .create(&pp, &widget("bad", json!({}))?)
        .await
        .err()
        .ok_or("missing size accepted")?;
    assert_eq!(
        api_error(&err).map(|e| e.2),
        // A required field missing skips the schema's CEL rules, and kube-apiserver says so.
        Some("Widget.test.lockstep.dev \"bad\" is invalid: [spec.size: Required value, <nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation]".into())
    );

    // A CEL rule, with its message and field path.
    let err = widgets
        .create(
            &pp,
            &widget("bad", json!({"size": 1, "members": ["a", "b"]}))?,
        )
        .await
        .err()
        .ok_or("CEL rule not enforced")?;
    assert_eq!(
        api_error(&err).map(|e| e.2),
        Some("Widget.test.lockstep.dev \"bad\" is invalid: spec.members: Invalid value: \"array\": a widget has at most size members".into())
    );

    // Writes to the object ignore status; metadata changes keep the generation; spec changes raise it.
    let labelled = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}, "status": {"epoch": 5}})),
        )
        .await?;
    assert_eq!(labelled.metadata.generation, Some(1));
    assert!(labelled.data.get("status").is_none());
    let grown = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 3}})),
        )
        .await?;
    assert_eq!(grown.metadata.generation, Some(2));

    // /status changes only status, and the transition rule refuses a lower epoch.
    let status = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"epoch": 4}, "spec": {"size": 9}})),
        )
        .await?;
    assert_eq!(status.data["status"]["epoch"], 4);
    assert_eq!(status.data["spec"]["size"], 3);
    assert_eq!(status.metadata.generation, Some(2));
    let err = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"epoch": 3}})),
        )
        .await
        .err()
        .ok_or("epoch lowered")?;
    assert_eq!(
        api_error(&err).map(|e| e.2),
        Some("Widget.test.lockstep.dev \"w\" is invalid: status: Invalid value: \"object\": status.epoch never decreases".into())
    );

    // Re-applying the same CRD changes nothing (its conditions keep their times).
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let before = crds.get("widgets.test.lockstep.dev").await?;
    let again = crds
        .patch(
            "widgets.test.lockstep.dev",
            &PatchParams::apply("installer").force(),
            &Patch::Apply(common::widget_crd()),
        )
        .await?;
    let again2 = crds
        .patch(
            "widgets.test.lockstep.dev",
            &PatchParams::apply("installer").force(),
            &Patch::Apply(common::widget_crd()),
        )
        .await?;
    assert_eq!(
        again.metadata.resource_version,
        again2.metadata.resource_version
    );
    assert_eq!(
        before.status.and_then(|s| s.conditions),
        again2.status.and_then(|s| s.conditions)
    );

    // Short names and the resource show in discovery.
    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await?;
    let found = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .any(|(ar, _)| ar.kind == "Widget" && ar.plural == "widgets");
    assert!(found, "widgets are discoverable");
    Ok(())
}

#[tokio::test]
async fn server_side_apply_from_two_managers() -> TestResult {
    let (_server, client) = server().await?;
    install_widgets(&client).await?;
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, "default", &widget_resource());
    let config = |spec: serde_json::Value| json!({"apiVersion": "test.lockstep.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec});
    let alice = PatchParams::apply("alice");
    let bob = PatchParams::apply("bob");

    // Apply creates.
    let a = widgets
        .patch(
            "w",
            &alice,
            &Patch::Apply(config(json!({"size": 2, "label": "a"}))),
        )
        .await?;
    assert_eq!(a.data["spec"]["size"], 2);
    let managers: Vec<String> = a
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, vec!["alice"]);

    // Bob sets a field alice does not own, and shares one with the same value: no conflict.
    let b = widgets
        .patch(
            "w",
            &bob,
            &Patch::Apply(config(json!({"size": 2, "mode": "Fast"}))),
        )
        .await?;
    assert_eq!(b.data["spec"]["mode"], "Fast");
    assert_eq!(b.data["spec"]["label"], "a");

    // Bob changing alice's field conflicts, naming her and the field.
    let err = widgets
        .patch(
            "w",
            &bob,
            &Patch::Apply(config(json!({"size": 2, "mode": "Fast", "label": "b"}))),
        )
        .await
        .err()
        .ok_or("conflicting apply accepted")?;
    let (code, reason, message) = api_error(&err).ok_or("not an API error")?;
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        message,
        "Apply failed with 1 conflict: conflict with \"alice\": .spec.label"
    );

    // With force, bob takes it.
    let forced = widgets
        .patch(
            "w",
            &bob.clone().force(),
            &Patch::Apply(config(json!({"size": 2, "mode": "Fast", "label": "b"}))),
        )
        .await?;
    assert_eq!(forced.data["spec"]["label"], "b");

    // Alice drops size from her config: bob still owns it, so it stays. Bob drops mode: nobody else owns
    // it, so it goes (and the default comes back).
    widgets
        .patch("w", &alice, &Patch::Apply(config(json!({}))))
        .await?;
    let after = widgets
        .patch(
            "w",
            &bob,
            &Patch::Apply(config(json!({"size": 2, "label": "b"}))),
        )
        .await?;
    assert_eq!(after.data["spec"]["size"], 2);
    assert_eq!(after.data["spec"]["mode"], "Safe");

    // An apply without a field manager is refused.
    let err = widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Apply(config(json!({"size": 2}))),
        )
        .await
        .err()
        .ok_or("apply without a field manager")?;
    assert_eq!(api_error(&err).map(|e| e.0), Some(400));
    Ok(())
}

#[tokio::test]
async fn events_are_one_resource_in_two_api_groups() -> TestResult {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event;
    let (_server, client) = server().await?;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": "freeze.1"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reason": "Frozen", "note": "epoch 3: every member suspended", "type": "Normal", "action": "Freeze",
        "reportingController": "lockstep.dev/operator", "reportingInstance": "operator-0",
        "regarding": {"kind": "ConsistencyGroup", "name": "orders-db", "apiVersion": "lockstep.dev/v1alpha1"}
    }))?;
    events.create(&PostParams::default(), &event).await?;
    let core: Api<CoreEvent> = Api::namespaced(client, "default");
    let seen = core.get("freeze.1").await?;
    assert_eq!(
        seen.message.as_deref(),
        Some("epoch 3: every member suspended")
    );
    assert_eq!(seen.involved_object.name.as_deref(), Some("orders-db"));
    assert_eq!(
        seen.reporting_component.as_deref(),
        Some("lockstep.dev/operator")
    );
    let back = events.get("freeze.1").await?;
    assert_eq!(
        back.note.as_deref(),
        Some("epoch 3: every member suspended")
    );
    Ok(())
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_objects() -> TestResult {
    let (_server, client) = server().await?;
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "doomed"}}))?;
    let created = nss.create(&PostParams::default(), &ns).await?;
    assert_eq!(
        created.status.and_then(|s| s.phase).as_deref(),
        Some("Active")
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    cms.create(&PostParams::default(), &config_map("inside", &[]))
        .await?;
    nss.delete("doomed", &DeleteParams::default()).await?;
    assert!(nss.get_opt("doomed").await?.is_none());
    assert!(cms.get_opt("inside").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn once_stop_returns_no_request_is_answered_even_on_an_open_connection() -> TestResult {
    let (server, client) = server().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for round in 0..20 {
        // The client's pooled connection is open and idle when the server stops.
        cms.list(&ListParams::default()).await?;
        server.stop().await;
        assert!(
            cms.list(&ListParams::default()).await.is_err(),
            "round {round}: answered after stop"
        );
        server.restart().await?;
    }
    Ok(())
}

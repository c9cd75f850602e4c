//! RBAC, as a ServiceAccount's client meets it: with `authorize` on, requests the stored Roles,
//! ClusterRoles and bindings do not allow get kube-apiserver's 403, and the audit log names every request.

mod common;

use common::{TestResult, api_error, server_with};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use lockstep_testapi::Options;
use serde_json::json;

const READER: &str = "system:serviceaccount:apps:reader";

#[tokio::test]
async fn a_service_account_gets_what_its_bindings_grant_and_403_for_the_rest() -> TestResult {
    let (server, admin) = server_with(Options {
        authorize: true,
        ..Options::default()
    })
    .await?;
    let reader = server.client_as(Some(READER)).await?;
    let pp = PostParams::default();
    let mut apps = Namespace::default();
    apps.metadata.name = Some("apps".into());
    Api::<Namespace>::all(admin.clone())
        .create(&pp, &apps)
        .await?;

    let in_apps: Api<ConfigMap> = Api::namespaced(reader.clone(), "apps");
    let err = in_apps.list(&ListParams::default()).await.unwrap_err();
    let (code, reason, message) = api_error(&err).ok_or("not an API error")?;
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        message,
        "configmaps is forbidden: User \"system:serviceaccount:apps:reader\" cannot list resource \
         \"configmaps\" in API group \"\" in the namespace \"apps\""
    );

    // A Role and RoleBinding in `apps` grant reading ConfigMaps there, and nowhere else.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "read-config", "namespace": "apps"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
    }))?;
    Api::<Role>::namespaced(admin.clone(), "apps")
        .create(&pp, &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "reader", "namespace": "apps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-config"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "apps"}],
    }))?;
    Api::<RoleBinding>::namespaced(admin.clone(), "apps")
        .create(&pp, &binding)
        .await?;
    assert!(in_apps.list(&ListParams::default()).await?.items.is_empty());
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("c".into());
    let err = in_apps.create(&pp, &cm).await.unwrap_err();
    assert_eq!(api_error(&err).map(|e| e.0), Some(403));
    let elsewhere: Api<ConfigMap> = Api::namespaced(reader.clone(), "default");
    let err = elsewhere.list(&ListParams::default()).await.unwrap_err();
    assert_eq!(api_error(&err).map(|e| e.0), Some(403));

    // A ClusterRoleBinding to the group of every ServiceAccount grants cluster-wide.
    let cluster_role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": "create-config"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}],
    }))?;
    Api::<ClusterRole>::all(admin.clone())
        .create(&pp, &cluster_role)
        .await?;
    let cluster_binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "all-service-accounts-create-config"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "create-config"},
        "subjects": [{"kind": "Group", "name": "system:serviceaccounts", "apiGroup": "rbac.authorization.k8s.io"}],
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&pp, &cluster_binding)
        .await?;
    in_apps.create(&pp, &cm).await?;
    elsewhere.create(&pp, &cm).await?;

    let audit = server.audit().entries();
    let by_reader: Vec<_> = audit
        .iter()
        .filter(|e| e.user == READER)
        .map(|e| (e.attributes.verb, e.allowed))
        .collect();
    assert_eq!(
        by_reader,
        [
            ("list", false),
            ("list", true),
            ("create", false),
            ("list", false),
            ("create", true),
            ("create", true)
        ]
    );
    assert!(
        audit
            .iter()
            .filter(|e| e.user == lockstep_testapi::authz::ADMIN_USER)
            .all(|e| e.allowed)
    );
    Ok(())
}

#[tokio::test]
async fn without_authorize_every_request_is_answered_and_still_audited() -> TestResult {
    let (server, _admin) = server_with(Options::default()).await?;
    let reader = server.client_as(Some(READER)).await?;
    let cms: Api<ConfigMap> = Api::namespaced(reader, "apps");
    assert!(cms.list(&ListParams::default()).await?.items.is_empty());
    let denied = server.audit().denied();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].attributes.resource, "configmaps");
    Ok(())
}

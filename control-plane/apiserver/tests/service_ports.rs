//! Node ports and health-check node ports of Services, through kube-rs: each port belongs to
//! one Service at a time, updates keep what the Service holds, and ports a Service stops
//! using (type change, traffic policy change, deletion) are free for others at once.

mod common;

use common::start;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

fn service(name: &str, spec: Value) -> Service {
    let mut spec = spec;
    if spec.get("ports").is_none() {
        spec["ports"] = json!([{"name": "web", "port": 80, "targetPort": 8080}]);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("service")
}

/// A NodePort Service asking for node port `n`.
fn node_port(name: &str, n: impl Into<Value>) -> Service {
    service(
        name,
        json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": n.into()}]}),
    )
}

fn node_ports(s: &Service) -> Vec<i32> {
    s.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| p.node_port)
        .collect()
}

fn health_port(s: &Service) -> Option<i32> {
    s.spec.as_ref().and_then(|s| s.health_check_node_port)
}

/// The 422 message of a refused write.
fn refused(result: kube::Result<Service>) -> String {
    match result {
        Err(kube::Error::Api(s)) if s.code == 422 => s.message,
        other => panic!("expected a 422, got {other:?}"),
    }
}

async fn merge(api: &Api<Service>, name: &str, patch: Value) -> kube::Result<Service> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

#[tokio::test]
async fn node_ports_are_held_by_one_service_and_freed_when_unused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, _stop) = start(dir.path()).await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let pp = PostParams::default();

    let a = api.create(&pp, &node_port("a", 30080)).await?;
    assert_eq!(node_ports(&a), [30080]);
    let taken = refused(api.create(&pp, &node_port("b", 30080)).await);
    assert!(taken.contains("already allocated"), "{taken}");
    let b = api
        .create(&pp, &service("b", json!({"type": "NodePort"})))
        .await?;
    let b_port = node_ports(&b)[0];
    assert!((30000..=32767).contains(&b_port) && b_port != 30080);

    // An update may not take another Service's port either.
    let taken = refused(
        merge(
            &api,
            "b",
            json!({"spec": {"ports": [{"name": "web", "port": 80, "nodePort": 30080}]}}),
        )
        .await,
    );
    assert!(taken.contains("already allocated"), "{taken}");
    // A replace that leaves the node port out keeps it.
    let mut replaced = api.get("b").await?;
    for p in replaced
        .spec
        .as_mut()
        .and_then(|s| s.ports.as_mut())
        .expect("ports")
    {
        p.node_port = None;
    }
    assert_eq!(
        node_ports(&api.replace("b", &pp, &replaced).await?),
        [b_port]
    );

    // A node port may not be asked for on a ClusterIP Service; one carried over from a
    // NodePort type is dropped and freed.
    let forbidden = refused(
        api.create(
            &pp,
            &service("c", json!({"ports": [{"port": 80, "nodePort": 30081}]})),
        )
        .await,
    );
    assert!(forbidden.contains("may not be used"), "{forbidden}");
    let a = merge(&api, "a", json!({"spec": {"type": "ClusterIP"}})).await?;
    assert!(node_ports(&a).is_empty(), "{:?}", a.spec);
    let b = merge(
        &api,
        "b",
        json!({"spec": {"ports": [{"name": "web", "port": 80, "nodePort": 30080}]}}),
    )
    .await?;
    assert_eq!(
        node_ports(&b),
        [30080],
        "a's port is free once a dropped it"
    );
    // And b's old port is free again.
    let c = api.create(&pp, &node_port("c", b_port)).await?;
    assert_eq!(node_ports(&c), [b_port]);
    Ok(())
}

#[tokio::test]
async fn local_load_balancers_get_a_health_check_node_port() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, _stop) = start(dir.path()).await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let pp = PostParams::default();

    let cluster = api
        .create(&pp, &service("cluster", json!({"type": "LoadBalancer"})))
        .await?;
    assert_eq!(health_port(&cluster), None);
    let local = api
        .create(
            &pp,
            &service(
                "local",
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local"}),
            ),
        )
        .await?;
    let health = health_port(&local).expect("a health-check node port");
    assert!((30000..=32767).contains(&health));
    assert!(!node_ports(&local).contains(&health));
    let taken = refused(api.create(&pp, &node_port("other", health)).await);
    assert!(taken.contains("already allocated"), "{taken}");
    let wrong = refused(
        api.create(
            &pp,
            &service(
                "other",
                json!({"type": "NodePort", "healthCheckNodePort": 30555}),
            ),
        )
        .await,
    );
    assert!(wrong.contains("healthCheckNodePort"), "{wrong}");

    // Updates keep it; switching the policy to Cluster drops and frees it.
    let relabelled = merge(&api, "local", json!({"metadata": {"labels": {"x": "y"}}})).await?;
    assert_eq!(health_port(&relabelled), Some(health));
    let switched = merge(
        &api,
        "local",
        json!({"spec": {"externalTrafficPolicy": "Cluster"}}),
    )
    .await?;
    assert_eq!(health_port(&switched), None);
    let other = api.create(&pp, &node_port("other", health)).await?;
    assert_eq!(node_ports(&other), [health]);

    // A requested one is honoured, and deleting the Service frees it.
    let named = api
        .create(
            &pp,
            &service(
                "named",
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": 31999}),
            ),
        )
        .await?;
    assert_eq!(health_port(&named), Some(31999));
    api.delete("named", &DeleteParams::default()).await?;
    let reused = api.create(&pp, &node_port("reused", 31999)).await?;
    assert_eq!(node_ports(&reused), [31999]);
    Ok(())
}

/// The cluster is IPv4 single-stack: what needs IPv6 is refused with Kubernetes' messages
/// instead of being answered with an IPv4 address; `PreferDualStack` is kept, with IPv4 only.
#[tokio::test]
async fn ip_families_other_than_ipv4_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (client, _stop) = start(dir.path()).await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let pp = PostParams::default();

    // Each refused with its field and Kubernetes' wording, and nothing stored.
    for (name, spec, wants) in [
        (
            "v6",
            json!({"ipFamilies": ["IPv6"]}),
            ["spec.ipFamilies[0]", "not configured on this cluster"],
        ),
        (
            "dual",
            json!({"ipFamilyPolicy": "RequireDualStack"}),
            ["spec.ipFamilyPolicy", "not configured for dual-stack"],
        ),
        (
            "addr",
            json!({"clusterIP": "fd00::10"}),
            ["spec.clusterIP", "IPv6 is not configured"],
        ),
        (
            "typo",
            json!({"ipFamilyPolicy": "DualStack"}),
            ["spec.ipFamilyPolicy", "Unsupported value: \"DualStack\""],
        ),
    ] {
        let message = refused(api.create(&pp, &service(name, spec)).await);
        for want in wants {
            assert!(message.contains(want), "{name}: {message}");
        }
        assert!(api.get_opt(name).await?.is_none(), "{name} was stored");
    }

    let prefer = api
        .create(
            &pp,
            &service("prefer", json!({"ipFamilyPolicy": "PreferDualStack"})),
        )
        .await?;
    let spec = prefer.spec.expect("spec");
    assert_eq!(spec.ip_family_policy.as_deref(), Some("PreferDualStack"));
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_owned()]));
    assert_eq!(spec.cluster_ips.map(|ips| ips.len()), Some(1));

    // An update may not ask for dual-stack either; the Service stays as it was.
    let update = refused(
        merge(
            &api,
            "prefer",
            json!({"spec": {"ipFamilyPolicy": "RequireDualStack"}}),
        )
        .await,
    );
    assert!(update.contains("not configured for dual-stack"), "{update}");
    let kept = api.get("prefer").await?.spec.expect("spec");
    assert_eq!(kept.ip_family_policy.as_deref(), Some("PreferDualStack"));
    Ok(())
}

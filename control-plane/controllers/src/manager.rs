//! Wires the shared informers to the scheduler and the controllers and runs them together.

use std::{future::Future, pin::Pin};

use k8s_openapi::api::{
    apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet},
    batch::v1::Job,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Endpoints, Node, Pod, Secret, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, runtime::watcher};
use tokio_util::sync::CancellationToken;

use crate::{
    Options, daemonset::DaemonSets, deployment::Deployments, endpoints::EndpointsController,
    endpointslice::EndpointSlices, eventttl, gc::GarbageCollector, informer::Informer, ipam::Ipam,
    job::Jobs, nodelifecycle::NodeLifecycle, podgc::PodGc, replicaset::ReplicaSets,
    scheduler::Scheduler,
};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs every enabled controller until `cancel`.
pub(crate) async fn run_all(client: Client, opts: &Options, cancel: CancellationToken) {
    let cfg = watcher::Config::default;
    let mut pods = Informer::<Pod>::new(Api::all(client.clone()), cfg());
    let mut nodes = Informer::<Node>::new(Api::all(client.clone()), cfg());
    let mut sets = Informer::<ReplicaSet>::new(Api::all(client.clone()), cfg());
    let mut deploys = Informer::<Deployment>::new(Api::all(client.clone()), cfg());
    let mut daemons = Informer::<DaemonSet>::new(Api::all(client.clone()), cfg());
    let mut jobs = Informer::<Job>::new(Api::all(client.clone()), cfg());
    let mut services = Informer::<Service>::new(Api::all(client.clone()), cfg());
    let mut slices = Informer::<EndpointSlice>::new(Api::all(client.clone()), cfg());
    let mut endpoints = Informer::<Endpoints>::new(Api::all(client.clone()), cfg());
    // All namespaces: node lifecycle reads those in kube-node-lease, the collector all.
    let mut leases = Informer::<Lease>::new(Api::all(client.clone()), cfg());
    let mut revisions = Informer::<ControllerRevision>::new(Api::all(client.clone()), cfg());

    let mut tasks: Vec<Task> = Vec::new();
    let c = || cancel.clone();
    if opts.scheduler {
        let s = Scheduler::register(client.clone(), opts, &mut pods, &mut nodes);
        tasks.push(Box::pin(s.run(c())));
    }
    if opts.workloads {
        let rs = ReplicaSets::register(client.clone(), &mut sets, &mut pods);
        tasks.push(Box::pin(rs.run(c())));
        let d = Deployments::register(client.clone(), &mut deploys, &mut sets, &mut pods);
        tasks.push(Box::pin(d.run(c())));
    }
    if opts.daemon_sets {
        let d = DaemonSets::register(
            client.clone(),
            &mut daemons,
            &mut pods,
            &mut nodes,
            &mut revisions,
        );
        tasks.push(Box::pin(d.run(c())));
    }
    if opts.jobs {
        let j = Jobs::register(client.clone(), opts, &mut jobs, &mut pods);
        tasks.push(Box::pin(j.run(c())));
    }
    if opts.endpoint_slices {
        let e = EndpointSlices::register(client.clone(), &mut services, &mut pods, &mut slices);
        tasks.push(Box::pin(e.run(c())));
    }
    if opts.endpoints {
        let e =
            EndpointsController::register(client.clone(), &mut services, &mut pods, &mut endpoints);
        tasks.push(Box::pin(e.run(c())));
    }
    if opts.node_lifecycle {
        let n = NodeLifecycle::new(client.clone(), opts, &nodes, &leases, &pods);
        tasks.push(Box::pin(n.run(c())));
    }
    if opts.node_ipam {
        let i = Ipam::register(client.clone(), opts, &mut nodes);
        tasks.push(Box::pin(i.run(c())));
    }
    if opts.pod_gc {
        let g = PodGc::new(client.clone(), opts, pods.store(), nodes.store());
        tasks.push(Box::pin(g.run(c())));
    }
    if !opts.event_ttl.is_zero() {
        let (client, opts, cancel) = (client.clone(), opts.clone(), c());
        tasks.push(Box::pin(async move {
            eventttl::run(client, &opts, cancel).await
        }));
    }
    if let Some(dir) = &opts.csr_signing_ca {
        match crate::csr::Signer::load(dir) {
            Ok(signer) => {
                let csrs = crate::csr::Csrs::new(client.clone(), signer);
                tasks.push(Box::pin(csrs.run(c())));
            }
            Err(e) => tracing::error!(error = %e, "not approving or signing node CSRs"),
        }
    }
    if opts.token_cleaner {
        let period = opts.token_cleaner_period;
        tasks.push(Box::pin(crate::tokencleaner::run(
            client.clone(),
            period,
            c(),
        )));
    }
    let mut watches = Vec::new();
    if opts.garbage_collector {
        // Every served type but Events and Namespaces (as in Kubernetes, whose collector
        // ignores Events; namespaces are emptied by their own deletion), as owner and as
        // dependent. Config maps, secrets and service accounts are watched for it alone.
        let mut g = GarbageCollector::new(client.clone(), opts);
        g.track(&mut pods);
        g.track(&mut sets);
        g.track(&mut deploys);
        g.track(&mut daemons);
        g.track(&mut jobs);
        g.track(&mut services);
        g.track(&mut slices);
        g.track(&mut endpoints);
        g.track(&mut nodes);
        g.track(&mut leases);
        g.track(&mut revisions);
        let mut maps = Informer::<ConfigMap>::new(Api::all(client.clone()), cfg());
        let mut secrets = Informer::<Secret>::new(Api::all(client.clone()), cfg());
        let mut accounts = Informer::<ServiceAccount>::new(Api::all(client.clone()), cfg());
        g.track(&mut maps);
        g.track(&mut secrets);
        g.track(&mut accounts);
        watches.extend([maps.spawn(c()), secrets.spawn(c()), accounts.spawn(c())]);
        tasks.push(Box::pin(g.run(c())));
    }
    watches.extend([
        pods.spawn(c()),
        nodes.spawn(c()),
        sets.spawn(c()),
        deploys.spawn(c()),
        daemons.spawn(c()),
        jobs.spawn(c()),
        services.spawn(c()),
        slices.spawn(c()),
        endpoints.spawn(c()),
        leases.spawn(c()),
        revisions.spawn(c()),
    ]);
    futures::future::join_all(tasks).await;
    cancel.cancel();
    for w in watches {
        let _ = w.await;
    }
}

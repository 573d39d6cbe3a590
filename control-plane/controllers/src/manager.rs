//! Wires the shared informers to the scheduler and the controllers and runs them together.

use std::{future::Future, pin::Pin};

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    coordination::v1::Lease,
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, runtime::watcher};
use tokio_util::sync::CancellationToken;

use crate::{
    Options, deployment::Deployments, endpointslice::EndpointSlices, gc::GarbageCollector,
    informer::Informer, ipam::Ipam, nodelifecycle::NodeLifecycle, replicaset::ReplicaSets,
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
    let mut services = Informer::<Service>::new(Api::all(client.clone()), cfg());
    let mut slices = Informer::<EndpointSlice>::new(Api::all(client.clone()), cfg());
    let leases = Informer::<Lease>::new(Api::namespaced(client.clone(), "kube-node-lease"), cfg());

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
    if opts.endpoint_slices {
        let e = EndpointSlices::register(client.clone(), &mut services, &mut pods, &mut slices);
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
    if opts.garbage_collector {
        let g = GarbageCollector::register(
            client.clone(),
            opts,
            &mut pods,
            &mut sets,
            &mut deploys,
            &mut services,
            &slices,
            &mut nodes,
        );
        tasks.push(Box::pin(g.run(c())));
    }
    let watches = [
        pods.spawn(c()),
        nodes.spawn(c()),
        sets.spawn(c()),
        deploys.spawn(c()),
        services.spawn(c()),
        slices.spawn(c()),
        leases.spawn(c()),
    ];
    futures::future::join_all(tasks).await;
    cancel.cancel();
    for w in watches {
        let _ = w.await;
    }
}

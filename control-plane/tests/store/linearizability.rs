//! A concurrent client history against a 3-member in-process cluster, with the leader shut
//! down half-way, checked for linearizability with stateright's tester (a single register:
//! writes of unique values and linearizable reads, through every member).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_server::store::{Consistency, Store};
use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};
use tokio::time::Instant;

use crate::support::Cluster;

const KEY: &str = "/register";
const WORKERS: u64 = 3;
const OPS_PER_WORKER: u64 = 24;

#[derive(Debug, Clone)]
enum Step {
    Invoke(u64, RegisterOp<Option<u64>>),
    Return(u64, RegisterRet<Option<u64>>),
}

type History = Arc<Mutex<Vec<Step>>>;

fn record(history: &History, step: Step) {
    history.lock().expect("history lock").push(step);
}

/// Whether the recorded history is linearizable for a register that starts absent.
fn linearizable(steps: &[Step]) -> bool {
    let mut tester = LinearizabilityTester::new(Register(None::<u64>));
    for step in steps {
        let valid = match step.clone() {
            Step::Invoke(thread, op) => tester.on_invoke(thread, op).map(|_| ()),
            Step::Return(thread, ret) => tester.on_return(thread, ret).map(|_| ()),
        };
        valid.expect("well-formed history");
    }
    tester.is_consistent()
}

#[test]
fn the_checker_rejects_a_stale_read_and_accepts_an_unfinished_write() {
    use RegisterOp::{Read, Write};
    use RegisterRet::{ReadOk, WriteOk};
    let stale = [
        Step::Invoke(0, Write(Some(1))),
        Step::Return(0, WriteOk),
        Step::Invoke(1, Read),
        Step::Return(1, ReadOk(None)),
    ];
    assert!(!linearizable(&stale));
    // A write whose outcome is unknown may be seen, or not.
    let unfinished = [
        Step::Invoke(0, Write(Some(1))),
        Step::Invoke(1, Read),
        Step::Return(1, ReadOk(Some(1))),
        Step::Invoke(2, Read),
        Step::Return(2, ReadOk(Some(1))),
    ];
    assert!(linearizable(&unfinished));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_history_under_leader_failure_is_linearizable() {
    let mut cluster = Cluster::bootstrap(
        |c| c.with_request_timeout(Duration::from_secs(2)),
        &[1, 2, 3],
    )
    .await;
    let leader = cluster.leader().await;
    let stores: Vec<Arc<Store>> = cluster.members.values().cloned().collect();
    let history: History = Arc::default();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let stores = stores.clone();
        let history = history.clone();
        workers.push(tokio::spawn(async move {
            // A thread id per uninterrupted run: after an operation with an unknown outcome
            // the tester needs a fresh thread, since that operation stays in flight.
            let mut thread = w * 1_000;
            let mut member = w as usize;
            let mut completed = 0;
            for i in 0..OPS_PER_WORKER {
                let store = &stores[member % stores.len()];
                if (i + w) % 2 == 0 {
                    let value = w * 1_000 + i;
                    record(
                        &history,
                        Step::Invoke(thread, RegisterOp::Write(Some(value))),
                    );
                    match store.put(KEY, value.to_le_bytes().to_vec()).await {
                        Ok(_) => {
                            record(&history, Step::Return(thread, RegisterRet::WriteOk));
                            completed += 1;
                        }
                        Err(_) => {
                            thread += 1;
                            member += 1;
                        }
                    }
                } else {
                    record(&history, Step::Invoke(thread, RegisterOp::Read));
                    match store.get(KEY, None, Consistency::Linearizable).await {
                        Ok(kv) => {
                            let value = kv.map(|kv| {
                                let bytes: [u8; 8] = kv.value.try_into().expect("8-byte value");
                                u64::from_le_bytes(bytes)
                            });
                            record(&history, Step::Return(thread, RegisterRet::ReadOk(value)));
                            completed += 1;
                        }
                        Err(_) => {
                            thread += 1;
                            member += 1;
                        }
                    }
                }
            }
            completed
        }));
    }
    // Shut the leader down while the clients run.
    let deadline = Instant::now() + Duration::from_secs(20);
    while history.lock().expect("history lock").len() < 30 {
        assert!(Instant::now() < deadline, "clients made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(leader).await;
    let mut completed = 0;
    for worker in workers {
        completed += worker.await.expect("worker");
    }
    assert!(
        completed > WORKERS * OPS_PER_WORKER / 2,
        "only {completed} operations completed"
    );

    let steps = history.lock().expect("history lock").clone();
    let checking = Instant::now();
    let consistent = linearizable(&steps);
    eprintln!(
        "checked {} steps ({completed} completed operations) in {:?}",
        steps.len(),
        checking.elapsed()
    );
    assert!(
        consistent,
        "history of {} steps is not linearizable: {steps:?}",
        steps.len()
    );
    cluster.stop_all().await;
}

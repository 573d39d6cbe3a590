//! The one thread that writes a member's database, with group commit.
//!
//! Every change to the database (log appends, vote, commit index, truncation, purge, applied
//! state, snapshots) is a job queued here. The thread takes all jobs waiting, runs them in order
//! in one redb transaction and commits it once: with an fsync if any job asked for durability,
//! without one otherwise. So concurrent appends share one fsync, the Raft core never blocks on
//! the disk while it could be replicating, and the async runtime's few threads never block in
//! an fsync.
//!
//! After a failed transaction the writer refuses every later job: a later commit must never
//! make durable a state that skipped a failed one.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use redb::{Durability, WriteTransaction};

use crate::store::storage::{Disk, DiskError, Result};

/// Most jobs in one transaction.
const MAX_JOBS: usize = 1024;

/// Work on the open write transaction.
pub(crate) type Job = Box<dyn FnOnce(&Disk, &WriteTransaction) -> Result<()> + Send>;
/// Told the outcome once the transaction that ran the job committed or failed.
pub(crate) type Done = Box<dyn FnOnce(Result<(), Arc<DiskError>>) + Send>;

struct Request {
    durable: bool,
    job: Job,
    done: Done,
}

/// Queues jobs for the writer thread; the thread ends (and releases the database) when the last
/// handle drops, after finishing what was queued.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Start the writer thread for `disk`.
    pub(crate) fn start(disk: Arc<Disk>) -> std::io::Result<Arc<Writer>> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(&disk, &rx))?;
        Ok(Arc::new(Writer {
            tx: Some(tx),
            thread: Some(thread),
        }))
    }

    /// Queue `job`; `done` learns how its transaction ended. `durable`: the transaction is
    /// fsynced before `done` runs.
    pub(crate) fn submit(&self, durable: bool, job: Job, done: Done) {
        let request = Request { durable, job, done };
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::SendError(request)) = tx.send(request) {
            (request.done)(Err(Arc::new(DiskError::WriterStopped)));
        }
    }

    /// Queue `job` and wait until its transaction committed.
    pub(crate) async fn run(&self, durable: bool, job: Job) -> Result<(), Arc<DiskError>> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.submit(
            durable,
            job,
            Box::new(move |result| {
                let _ = reply.send(result);
            }),
        );
        outcome
            .await
            .unwrap_or_else(|_| Err(Arc::new(DiskError::WriterStopped)))
    }

    /// Queue `job` without waiting; a failure is logged (and stops every later job).
    pub(crate) fn detach(&self, durable: bool, job: Job) {
        self.submit(
            durable,
            job,
            Box::new(|result| {
                if let Err(e) = result {
                    tracing::error!(error = %e, "store write failed");
                }
            }),
        );
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has drained it; waiting here means the
        // database file is closed when the last storage handle is gone.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(disk: &Disk, rx: &mpsc::Receiver<Request>) {
    let mut failed = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_JOBS {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (jobs, dones): (Vec<(bool, Job)>, Vec<Done>) = batch
            .into_iter()
            .map(|r| ((r.durable, r.job), r.done))
            .unzip();
        let outcome = commit(disk, jobs, &mut failed);
        for done in dones {
            done(outcome.clone());
        }
    }
}

fn commit(
    disk: &Disk,
    jobs: Vec<(bool, Job)>,
    failed: &mut Option<Arc<DiskError>>,
) -> Result<(), Arc<DiskError>> {
    if let Some(e) = failed {
        return Err(e.clone());
    }
    let durability = if jobs.iter().any(|(durable, _)| *durable) {
        Durability::Immediate
    } else {
        Durability::None
    };
    disk.write(durability, |txn| {
        jobs.into_iter().try_for_each(|(_, job)| job(disk, txn))
    })
    .map_err(|e| failed.insert(Arc::new(e)).clone())
}

//! Events expire: Kubernetes stores them with a one-hour lease in etcd; here a sweep deletes
//! the Events last seen longer than the TTL ago, reading them a page at a time so a large
//! backlog never sits in memory at once.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Event;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use tokio_util::sync::CancellationToken;

use crate::Options;

/// Events read per list call.
const PAGE: u32 = 500;

/// When an Event was last seen: the newest of its series, last and first timestamps, event
/// time and creation.
pub(crate) fn last_seen(e: &Event) -> Option<Timestamp> {
    [
        e.series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| t.0),
        e.last_timestamp.as_ref().map(|t| t.0),
        e.event_time.as_ref().map(|t| t.0),
        e.first_timestamp.as_ref().map(|t| t.0),
        e.metadata.creation_timestamp.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max()
}

/// Whether an Event last seen at `seen` has outlived `ttl` at `now`. An Event with no time at
/// all is left alone.
pub(crate) fn expired(seen: Option<Timestamp>, ttl: Duration, now: Timestamp) -> bool {
    let Some(seen) = seen else { return false };
    let Ok(ttl) = jiff::SignedDuration::try_from(ttl) else {
        return false;
    };
    now.duration_since(seen) > ttl
}

/// Deletes expired Events every `period` until `cancel`.
pub(crate) async fn run(client: Client, opts: &Options, cancel: CancellationToken) {
    let (ttl, period) = (opts.event_ttl, opts.event_ttl_period);
    let api: Api<Event> = Api::all(client.clone());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sweep(&client, &api, ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired events removed"),
            Err(e) => tracing::warn!(error = %e, "event ttl sweep"),
        }
    }
}

async fn sweep(client: &Client, api: &Api<Event>, ttl: Duration) -> kube::Result<usize> {
    let mut deleted = 0;
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(t) = token.take() {
            lp = lp.continue_token(&t);
        }
        let page = api.list(&lp).await?;
        let now = Timestamp::now();
        for e in &page.items {
            if !expired(last_seen(e), ttl, now) {
                continue;
            }
            let (Some(ns), Some(name)) = (&e.metadata.namespace, &e.metadata.name) else {
                continue;
            };
            let one: Api<Event> = Api::namespaced(client.clone(), ns);
            match one.delete(name, &DeleteParams::default()).await {
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(deleted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(last: Option<&str>, created: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "e", "namespace": "d", "creationTimestamp": created},
            "involvedObject": {},
            "lastTimestamp": last,
        }))
        .expect("event")
    }

    #[test]
    fn last_seen_takes_the_newest_time() {
        let e = event(Some("2026-01-01T02:00:00Z"), "2026-01-01T00:00:00Z");
        assert_eq!(
            last_seen(&e).map(|t| t.to_string()),
            Some("2026-01-01T02:00:00Z".to_owned())
        );
    }

    #[test]
    fn events_expire_after_the_ttl() {
        let now: Timestamp = "2026-01-01T03:00:00Z".parse().expect("time");
        let hour = Duration::from_secs(3600);
        let recent = last_seen(&event(Some("2026-01-01T02:30:00Z"), "2026-01-01T00:00:00Z"));
        let old = last_seen(&event(None, "2026-01-01T01:00:00Z"));
        assert!(!expired(recent, hour, now));
        assert!(expired(old, hour, now));
        assert!(!expired(None, hour, now));
    }
}

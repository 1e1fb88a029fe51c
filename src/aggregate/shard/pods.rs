//! The pods (resource identities) one shard has seen within the TTL, with their service: what
//! the cardinality report counts as pods per service.
//!
//! Invariants, whatever clients send: at most `cap` pods are held (the shard's share of
//! `limits.max_source_streams`; a pod whose points land here has a stream here, so only a
//! client making up resources reaches it), and each service name is held once however many
//! pods name it (a name can be 4 KiB; a pod entry is ~40 bytes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ahash::RandomState;

/// A pod as the shard saw it.
#[derive(Debug, Clone)]
struct Pod {
    service: Arc<str>,
    /// Shard clock when last seen.
    touched: u32,
}

/// Pods by resource identity hash.
#[derive(Debug, Default)]
pub struct Pods {
    pods: HashMap<u64, Pod, RandomState>,
    /// The service names the pods share.
    names: HashSet<Arc<str>, RandomState>,
}

impl Pods {
    /// Marks `resource` seen at `clock`; `service` names it the first time. A new pod past
    /// `cap` is not recorded.
    pub fn saw(&mut self, resource: u64, clock: u32, cap: u64, service: impl FnOnce() -> Box<str>) {
        if let Some(pod) = self.pods.get_mut(&resource) {
            pod.touched = clock;
        } else if (self.pods.len() as u64) < cap {
            self.insert(resource, &service(), clock);
        }
    }

    fn insert(&mut self, resource: u64, service: &str, clock: u32) {
        let service = match self.names.get(service) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = service.into();
                self.names.insert(name.clone());
                name
            }
        };
        self.pods.insert(
            resource,
            Pod {
                service,
                touched: clock,
            },
        );
    }

    /// Resource identity hash and service of every pod.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &str)> {
        self.pods.iter().map(|(k, p)| (*k, &*p.service))
    }

    /// Records a pod read back from a checkpoint.
    pub fn restore(&mut self, resource: u64, service: &str, clock: u32) {
        self.insert(resource, service, clock);
    }

    /// Forgets the pods `idle` says were not seen within the TTL, and names no pod holds.
    pub fn sweep(&mut self, idle: impl Fn(u32) -> bool) {
        self.pods.retain(|_, p| !idle(p.touched));
        self.names.retain(|n| Arc::strong_count(n) > 1);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Service names held (each once).
    #[cfg(test)]
    pub fn names(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_pods_past_the_cap_are_not_remembered_and_known_ones_still_are() {
        let mut pods = Pods::default();
        for resource in 0..10 {
            pods.saw(resource, 1, 4, || "checkout".into());
        }
        assert_eq!((pods.len(), pods.names()), (4, 1));
        pods.saw(0, 2, 4, || "checkout".into());
        pods.sweep(|touched| touched < 2);
        assert_eq!(pods.iter().map(|(r, _)| r).collect::<Vec<_>>(), [0]);
    }
}

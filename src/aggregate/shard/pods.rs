//! The pods (resource identities) one shard has seen within the TTL, with their service: what
//! the cardinality report counts as pods per service.

use std::collections::HashMap;

use ahash::RandomState;

/// A pod as the shard saw it.
#[derive(Debug, Clone)]
struct Pod {
    service: Box<str>,
    /// Shard clock when last seen.
    touched: u32,
}

/// Pods by resource identity hash.
#[derive(Debug, Default)]
pub struct Pods(HashMap<u64, Pod, RandomState>);

impl Pods {
    /// Marks `resource` seen at `clock`; `service` names it the first time.
    pub fn saw(&mut self, resource: u64, clock: u32, service: impl FnOnce() -> Box<str>) {
        match self.0.get_mut(&resource) {
            Some(pod) => pod.touched = clock,
            None => {
                let pod = Pod {
                    service: service(),
                    touched: clock,
                };
                self.0.insert(resource, pod);
            }
        }
    }

    /// Resource identity hash and service of every pod.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &str)> {
        self.0.iter().map(|(k, p)| (*k, &*p.service))
    }

    /// Records a pod read back from a checkpoint.
    pub fn restore(&mut self, resource: u64, service: &str, clock: u32) {
        let pod = Pod {
            service: service.into(),
            touched: clock,
        };
        self.0.insert(resource, pod);
    }

    /// Forgets the pods `idle` says were not seen within the TTL.
    pub fn sweep(&mut self, idle: impl Fn(u32) -> bool) {
        self.0.retain(|_, p| !idle(p.touched));
    }
}

//! What the driver and the runners publish for readers on other threads
//! (status, metrics, tests) without a round trip to the driver.

use std::collections::HashMap;
use std::sync::Mutex;

use slinfer_engine::LlmInstance;
use slinfer_scheduler::{InstanceId, Probe, RequestId, Snapshot};

use crate::api::{InferenceStats, InstanceStats};

#[derive(Default)]
pub(crate) struct SharedStats {
    live: Mutex<usize>,
    instances: Mutex<HashMap<InstanceId, InstanceStats>>,
    scheduler: Mutex<Snapshot>,
    /// Per model: where a typical new request would go now.
    admission: Mutex<HashMap<usize, Probe>>,
    /// Why each failed device failed, by node.
    failures: Mutex<HashMap<usize, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SharedStats {
    pub fn scheduler(&self) -> Snapshot {
        lock(&self.scheduler).clone()
    }

    /// The driver, after each message: live requests and the scheduler.
    pub fn publish(&self, live: usize, snapshot: Snapshot) {
        *lock(&self.live) = live;
        *lock(&self.scheduler) = snapshot;
    }

    /// The driver, every [`crate::driver::ADMISSION_EVERY`].
    pub fn publish_admission(&self, admission: HashMap<usize, Probe>) {
        *lock(&self.admission) = admission;
    }

    /// Where a typical new request for `model` would go, as last probed.
    pub fn admission(&self, model: usize) -> Option<Probe> {
        lock(&self.admission).get(&model).copied()
    }

    pub fn snapshot(&self) -> InferenceStats {
        let live = *lock(&self.live);
        let mut instances: Vec<InstanceStats> = lock(&self.instances).values().cloned().collect();
        instances.sort_by_key(|i| i.instance);
        InferenceStats {
            live_requests: live,
            instances,
        }
    }

    /// A runner, after each job: what its engine instance holds (`None`:
    /// nothing loaded), `kept` the ended requests' sequences it keeps.
    pub fn set_instance(
        &self,
        id: InstanceId,
        model: &str,
        device: &str,
        inst: Option<&dyn LlmInstance>,
        kept: &[RequestId],
    ) {
        let mut m = lock(&self.instances);
        match inst {
            Some(i) => {
                let kept = i.kv_blocks_held_only_by(kept);
                m.insert(
                    id,
                    InstanceStats {
                        instance: id,
                        model: model.to_string(),
                        device: device.to_string(),
                        kv_blocks_in_use: i.kv_blocks_in_use() - kept,
                        kv_blocks_kept: kept,
                        kv_blocks_capacity: i.kv_capacity_blocks(),
                    },
                );
            }
            None => {
                m.remove(&id);
            }
        }
    }

    pub fn set_failed(&self, node: usize, why: String) {
        lock(&self.failures).insert(node, why);
    }

    pub fn failure(&self, node: usize) -> Option<String> {
        lock(&self.failures).get(&node).cloned()
    }
}

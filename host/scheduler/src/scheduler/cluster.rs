//! What a cluster's router asks of a member's scheduler: a dry run of
//! placing a request on (a stale copy of) it, how busy its devices are,
//! and taking back a request it could not place so that the request can
//! try the next member. The decisions stay this scheduler's own.

use super::*;

/// What a dry run of placing a request found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// On an instance the scheduler has (possibly by preempting).
    Existing,
    /// On a new instance.
    New,
    /// On a new instance, once idle instances are unloaded to make room.
    NewAfterUnload,
    /// Not now.
    No,
}

/// The order a cluster tries its members in for a request (an id, the
/// member's probe of it, its kind of device and its load): those that
/// would place it on an instance they have, then on a new one in free
/// room, then in room that idle instances give up, then the rest; each
/// group in [`bin_packing_order`]. A live router and the simulator's
/// `--cluster` both order members with it.
pub fn routing_order<T: Ord + Copy>(
    candidates: impl IntoIterator<Item = (T, Probe, DeviceKind, Option<f64>)>,
) -> Vec<T> {
    let candidates: Vec<_> = candidates.into_iter().collect();
    [
        Probe::Existing,
        Probe::New,
        Probe::NewAfterUnload,
        Probe::No,
    ]
    .into_iter()
    .flat_map(|probe| {
        bin_packing_order(
            candidates
                .iter()
                .filter(|c| c.1 == probe)
                .map(|&(id, _, kind, load)| (id, kind, load)),
        )
    })
    .collect()
}

impl<C: CostModel + Clone> Scheduler<C> {
    /// Would `req` be placed now, and on what? A dry run on a copy: the
    /// scheduler is unchanged.
    pub fn probe(&self, req: &Request, now_s: f64) -> Probe {
        if !self.servable(req) {
            return Probe::No;
        }
        let mut shadow = self.clone();
        shadow.enqueue_request(req.clone(), now_s);
        if !shadow.try_place(req.id, now_s) {
            return Probe::No;
        }
        let retiring = |s: &Self| s.instances.values().filter(|i| i.retiring).count();
        match shadow.requests[&req.id].instance {
            Some(i) if self.instances.contains_key(&i) => Probe::Existing,
            _ if retiring(&shadow) > retiring(self) => Probe::NewAfterUnload,
            _ => Probe::New,
        }
    }
}

impl<C: CostModel> Scheduler<C> {
    /// Whether `request` waits for placement (submitted, on no instance).
    pub fn waiting(&self, request: RequestId) -> bool {
        self.requests
            .get(&request)
            .is_some_and(|r| r.instance.is_none())
    }

    /// Take back a waiting request as if it had never been submitted (no
    /// command says it ended): a router sends it to another member. False
    /// when it was not waiting here.
    pub fn withdraw(&mut self, request: RequestId, now_s: f64) -> bool {
        if !self.waiting(request) {
            return false;
        }
        self.detach(request, now_s);
        true
    }

    /// A node's kind and how busy it is for bin-packing
    /// ([`bin_packing_order`]); `None` load with no instance.
    pub fn node_load(&self, node: NodeId) -> (DeviceKind, Option<f64>) {
        (self.nodes[node].spec.kind, self.load_of(node))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;

    #[test]
    fn a_probe_says_where_a_request_would_go_and_changes_nothing() {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
        assert_eq!(s.probe(&req(1, 1, 100, 1.0), 0.0), Probe::New);
        assert!(s.snapshot().instances.is_empty() && s.drain_commands().is_empty());
        s.submit(req(1, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        assert_eq!(s.probe(&req(2, 1, 100, 1.0), 0.0), Probe::Existing);
        assert_eq!(s.live_requests(), 1);
        // A model the node has no slot and no room for: not now.
        let tiny = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 10)], FAST);
        assert_eq!(tiny.probe(&req(3, 1, 100, 1.0), 0.0), Probe::No);
    }

    #[test]
    fn a_waiting_request_is_withdrawn_without_a_trace_and_a_placed_one_stays() {
        // Room for one instance: the second model's request waits.
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, WEIGHTS + 600)], FAST);
        s.submit(req(1, 1, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        s.submit(req(2, 2, 100, 1.0), 0.0);
        settle(&mut s, 0.0);
        assert!(!s.waiting(1) && s.waiting(2));
        assert!(!s.withdraw(1, 0.0), "a placed request is not withdrawn");
        assert!(s.withdraw(2, 0.0));
        assert!(!s.waiting(2) && s.drain_commands().is_empty());
        assert_eq!(s.live_requests(), 1);
    }

    #[test]
    fn members_and_devices_order_alike_cpu_first_busiest_first_empty_last() {
        let order = bin_packing_order([
            (0, DeviceKind::Gpu, None),
            (1, DeviceKind::Gpu, Some(5.0)),
            (2, DeviceKind::Cpu, None),
            (3, DeviceKind::Cpu, Some(1.0)),
            (4, DeviceKind::Cpu, Some(3.0)),
            (5, DeviceKind::Gpu, Some(9.0)),
        ]);
        assert_eq!(order, [4, 3, 2, 5, 1, 0]);
    }
}

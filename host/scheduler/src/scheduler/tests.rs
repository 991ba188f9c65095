use super::*;
use crate::model::PerKind;

/// Simple costs, so each test controls exactly which check binds.
#[derive(Clone)]
pub(super) struct Flat {
    pub(super) prefill_s: f64,
    pub(super) decode_s: f64,
    pub(super) decode_per_request_s: f64,
    pub(super) load_s: f64,
    /// Seconds per byte of fresh memory a load writes.
    pub(super) fresh_write_s_per_byte: f64,
}

impl CostModel for Flat {
    fn prefill_s(&self, _: ModelTypeId, _: DeviceKind, _: u64) -> f64 {
        self.prefill_s
    }
    fn decode_s(&self, _: ModelTypeId, _: DeviceKind, _: u64, batch: u64) -> f64 {
        self.decode_s + self.decode_per_request_s * batch as f64
    }
    fn load_s(&self, _: ModelTypeId, _: DeviceKind, fresh_bytes: u64) -> f64 {
        self.load_s + self.fresh_write_s_per_byte * fresh_bytes as f64
    }
    fn kv_resize_s(&self, _: ModelTypeId, _: DeviceKind, _: u64) -> f64 {
        0.0
    }
    fn unload_s(&self, _: ModelTypeId, _: DeviceKind) -> f64 {
        0.0
    }
    fn kv_swap_s(&self, _: ModelTypeId, _: DeviceKind, _: u64) -> f64 {
        0.0
    }
}

pub(super) const WEIGHTS: u64 = 1000;
pub(super) const FAST: Flat = Flat {
    prefill_s: 0.01,
    decode_s: 0.01,
    decode_per_request_s: 0.0,
    load_s: 0.0,
    fresh_write_s_per_byte: 0.0,
};

pub(super) fn spec() -> ModelSpec {
    ModelSpec {
        name: "m".into(),
        weights_bytes: PerKind::splat(WEIGHTS),
        kv_bytes_per_token: PerKind::splat(1),
        block_tokens: PerKind::new(32, 16),
        cpu_kv_bytes: 4096,
        slots_per_node: PerKind::new(2, 4),
        sllm_exclusive_cap: PerKind::splat(Some(8)),
        sllm_half_share_cap: PerKind::splat(Some(4)),
        gpu_decode_quota: 2,
    }
}

pub(super) fn sched(policy: Policy, nodes: &[(DeviceKind, u64)], cost: Flat) -> Scheduler<Flat> {
    let mut cfg = SchedulerConfig::paper(policy);
    cfg.instance_overhead_bytes = 0;
    cfg.min_instance_tokens = 64;
    cfg.lookahead_tokens = 16;
    let nodes = nodes
        .iter()
        .map(|&(kind, capacity_bytes)| NodeSpec {
            kind,
            capacity_bytes,
        })
        .collect();
    Scheduler::new(cfg, vec![spec()], nodes, cost)
}

pub(super) fn req(id: RequestId, model: ModelId, input_tokens: u64, ttft_slo_s: f64) -> Request {
    Request {
        id,
        model,
        model_type: ModelTypeId(0),
        function: model,
        input_tokens,
        max_output_tokens: None,
        ttft_slo_s,
        tpot_slo_s: 0.25,
        arrival_s: 0.0,
    }
}

/// Completes every action the scheduler starts, returning all commands.
pub(super) fn settle<C: CostModel>(s: &mut Scheduler<C>, now: f64) -> Vec<Command> {
    let mut seen = Vec::new();
    loop {
        let cmds = s.drain_commands();
        if cmds.is_empty() {
            return seen;
        }
        for c in &cmds {
            if let Command::Action { node, action, .. } = c {
                s.action_done(*node, *action, now);
            }
        }
        seen.extend(cmds);
    }
}

pub(super) fn load_nodes(cmds: &[Command]) -> Vec<NodeId> {
    loads(cmds).into_iter().map(|l| l.0).collect()
}

pub(super) fn loads(cmds: &[Command]) -> Vec<(NodeId, InstanceId)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Action {
                node,
                instance,
                op: ActionOp::Load { .. },
                ..
            } => Some((*node, *instance)),
            _ => None,
        })
        .collect()
}

pub(super) fn runs(cmds: &[Command]) -> Vec<InstanceId> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Run { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect()
}

#[test]
fn arbiter_grants_the_least_headroom_first() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 2.0), 0.0);
    s.submit(req(2, 2, 100, 0.6), 0.0);
    let cmds = settle(&mut s, 0.0);
    let l = loads(&cmds);
    assert_eq!(l.len(), 2);
    // Instance 0 was granted as soon as it loaded (alone on the device);
    // once it yields, model 2's tighter TTFT deadline wins the device
    // even though model 1's request arrived first.
    s.iteration_done(0, l[0].1, &[], 0.01);
    let next = runs(&s.drain_commands());
    assert_eq!(next, vec![l[1].1]);
}

#[test]
fn memory_check_keeps_a_request_waiting_then_drops_it_at_its_deadline() {
    // Room for one instance with its 4-block floor, not two.
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, WEIGHTS + 10 * 16 + 500)],
        FAST,
    );
    s.submit(req(1, 1, 100, 1.0), 0.0);
    s.submit(req(2, 2, 100, 1.0), 0.0);
    let cmds = settle(&mut s, 0.0);
    assert_eq!(loads(&cmds).len(), 1);
    assert_eq!(s.next_wakeup_s(), Some(0.25));
    s.tick(2.0);
    let dropped: Vec<_> = s
        .drain_commands()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Command::Dropped {
                    request: 2,
                    reason: DropReason::DeadlinePassedWaiting,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(dropped.len(), 1);
}

#[test]
fn decode_check_spreads_instances_whose_slices_exceed_the_device() {
    // Each instance alone takes 0.15 / (0.25 × 0.95) ≈ 63% of the device.
    let slow = Flat {
        decode_s: 0.15,
        ..FAST
    };
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, 1 << 20), (DeviceKind::Gpu, 1 << 20)],
        slow,
    );
    s.submit(req(1, 1, 100, 1.0), 0.0);
    s.submit(req(2, 2, 100, 1.0), 0.0);
    let nodes: Vec<NodeId> = load_nodes(&settle(&mut s, 0.0));
    assert_eq!(nodes, vec![0, 1]);
}

#[test]
fn prefill_check_spreads_prefills_that_would_miss_their_deadlines() {
    // One prefill (0.5 × 1.05) fits the 0.95 s plan; two in a row do not.
    let slow = Flat {
        prefill_s: 0.5,
        ..FAST
    };
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, 1 << 20), (DeviceKind::Gpu, 1 << 20)],
        slow,
    );
    s.submit(req(1, 1, 100, 1.0), 0.0);
    let mut cmds = settle(&mut s, 0.0);
    // Loaded: its prefill now counts (while loading, the load delay
    // extends its deadline and the check skips it).
    s.submit(req(2, 2, 100, 1.0), 0.0);
    cmds.extend(settle(&mut s, 0.0));
    let nodes: Vec<NodeId> = load_nodes(&cmds);
    assert_eq!(nodes, vec![0, 1]);
}

/// Two GPUs then a CPU; requests 1..=`models` each for its own model,
/// all at once. The nodes their instances are placed on, in placement
/// order (a CPU loads them one at a time, so load order differs).
pub(super) fn load_nodes_for_distinct_models(policy: Policy, models: ModelId) -> Vec<NodeId> {
    let mut s = sched(
        policy,
        &[
            (DeviceKind::Gpu, 1 << 20),
            (DeviceKind::Gpu, 1 << 20),
            (DeviceKind::Cpu, 1 << 20),
        ],
        FAST,
    );
    for m in 1..=models {
        s.submit(req(m as RequestId, m, 100, 1.0), 0.0);
    }
    settle(&mut s, 0.0);
    s.snapshot().instances.iter().map(|i| i.node).collect()
}

#[test]
fn placement_prefers_cpu_then_the_busiest_node_and_empty_nodes_last() {
    // Two CPU slots first, then packing onto one GPU.
    assert_eq!(
        load_nodes_for_distinct_models(Policy::Slinfer, 4),
        vec![2, 2, 0, 0]
    );
    // sllm: GPUs only, one exclusive instance each.
    assert_eq!(load_nodes_for_distinct_models(Policy::Sllm, 3), vec![0, 1]);
}

#[test]
fn sllm_without_a_gpu_gives_the_cpu_to_one_instance_at_a_time() {
    // With a GPU, sllm leaves the CPU alone (above); without one, the CPU
    // is its device: one exclusive instance, the other model waits.
    let mut s = sched(Policy::Sllm, &[(DeviceKind::Cpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 10.0), 0.0);
    s.submit(req(2, 2, 100, 10.0), 0.0);
    let cmds = settle(&mut s, 0.0);
    assert_eq!(load_nodes(&cmds), vec![0]);
    assert_eq!(s.snapshot().instances.len(), 1);
    // sllm+c+s: two instances share it.
    let mut s = sched(Policy::SllmCS, &[(DeviceKind::Cpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 10.0), 0.0);
    s.submit(req(2, 2, 100, 10.0), 0.0);
    assert_eq!(load_nodes(&settle(&mut s, 0.0)), vec![0, 0]);
}

fn load_actions(cmds: &[Command]) -> Vec<(NodeId, ActionId)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Action {
                node,
                action,
                op: ActionOp::Load { .. },
                ..
            } => Some((*node, *action)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_cpu_loads_between_iterations_and_grants_none_while_it_loads() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 10.0), 0.0);
    let first = runs(&settle(&mut s, 0.0))[0];
    // Another model arrives: its load waits for the iteration in flight,
    // which takes the same cores.
    s.submit(req(2, 2, 100, 10.0), 0.0);
    assert!(load_actions(&s.drain_commands()).is_empty());
    let one = [RequestOutcome {
        request: 1,
        tokens: 1,
        finished: false,
    }];
    s.iteration_done(0, first, &one, 0.01);
    // The iteration ends: the load starts, and no iteration follows while
    // it takes the cores.
    let cmds = s.drain_commands();
    let load = load_actions(&cmds);
    assert_eq!(load.len(), 1);
    assert!(runs(&cmds).is_empty());
    s.action_done(load[0].0, load[0].1, 0.5);
    assert!(!runs(&s.drain_commands()).is_empty());
}

#[test]
fn a_cpu_loads_one_instance_at_a_time_and_plans_the_second_behind_the_first() {
    let slow = Flat {
        load_s: 1.0,
        ..FAST
    };
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], slow);
    s.cfg.ttft_counts_load = true;
    // Model 1 has an instance (so its cold starts count), loading.
    s.submit(req(1, 1, 100, 10.0), 0.0);
    let first = load_actions(&s.drain_commands());
    assert_eq!(first.len(), 1);
    // Model 2 arrives: its instance is placed, but its load waits.
    s.submit(req(2, 2, 100, 10.0), 0.0);
    assert!(load_actions(&s.drain_commands()).is_empty());
    // Another request of model 2 with 1.5 s to its first token: that
    // instance is ready only after both loads (2 s), so it is not placed
    // there (nor on a new instance, later still).
    s.submit(req(3, 2, 100, 1.5), 0.0);
    assert_eq!(s.requests[&3].instance, None);
    s.action_done(first[0].0, first[0].1, 1.0);
    let cmds = s.drain_commands();
    assert_eq!(
        load_actions(&cmds).len(),
        1,
        "the second load starts once the first is done"
    );
}

#[test]
fn existing_instances_are_tried_largest_batch_first() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 1.0), 0.0);
    settle(&mut s, 0.0);
    let first = s.by_model[&1][0];
    // A second instance of the same model, as if made when the first was full.
    let second = s.create_instance(0, 1, ModelTypeId(0), 0.0);
    settle(&mut s, 0.0);
    s.submit(req(2, 1, 100, 1.0), 0.0);
    assert_eq!(s.requests[&2].instance, Some(first));
    assert!(s.instances[&second].requests.is_empty());
}

/// Capacity for two instances and 40 blocks of KV between them.
pub(super) fn two_model_node() -> Scheduler<Flat> {
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, 2 * WEIGHTS + 40 * 16)],
        FAST,
    );
    s.submit(req(1, 1, 100, 1.0), 0.0);
    settle(&mut s, 0.0);
    // Model 2 is the laxer one, so model 1 holds the device.
    s.submit(req(2, 2, 100, 3.0), 0.0);
    settle(&mut s, 0.0);
    s.submit(req(3, 1, 100, 1.0), 0.0);
    s.submit(req(4, 1, 100, 1.0), 0.0);
    settle(&mut s, 0.0);
    s
}

/// Request 5 (model 1) goes to instance `a` by preempting request 2
/// (model 2) from its neighbour `b`.
pub(super) fn submit_5_preempts_2(s: &mut Scheduler<Flat>, a: InstanceId, b: InstanceId) {
    s.submit(req(5, 1, 100, 1.0), 0.0);
    let cmds = s.drain_commands();
    assert!(cmds.contains(&Command::Preempt {
        instance: b,
        requests: vec![2]
    }));
    assert_eq!(s.requests[&5].instance, Some(a));
}

#[test]
fn gpu_preemption_evicts_a_smaller_neighbour_when_only_memory_fails() {
    let mut s = two_model_node();
    let a = s.by_model[&1][0];
    let b = s.by_model[&2][0];
    assert_eq!(s.instances[&a].planned_blocks, 30);
    submit_5_preempts_2(&mut s, a, b);
    assert!(s.pending.contains(&2));
    assert!(!s.by_model[&2].contains(&b));
}

#[test]
fn preemption_can_keep_kv_so_the_request_is_restored_not_recomputed() {
    let mut s = two_model_node();
    s.cfg.preempt_keeps_kv = true;
    // As if model 2's request had run its prefill.
    s.requests.get_mut(&2).unwrap().prefilled = true;
    s.submit(req(5, 1, 100, 1.0), 0.0);
    let r = &s.requests[&2];
    assert!(r.kv_saved && !r.prefilled && r.instance.is_none());
    // Re-placed (capacity freed by finishing model 1's work), it restores.
    let a = s.by_model[&1][0];
    let done: Vec<RequestOutcome> = [1, 3, 4, 5]
        .map(|request| RequestOutcome {
            request,
            tokens: 1,
            finished: true,
        })
        .to_vec();
    s.iteration_done(0, a, &done, 0.1);
    let mut cmds = settle(&mut s, 0.3);
    s.tick(0.3);
    cmds.extend(settle(&mut s, 0.3));
    let restored = cmds.iter().any(|c| {
        matches!(c, Command::Run { restore, prefill, .. } if restore == &vec![(2, 100)] && prefill.is_empty())
    });
    assert!(restored, "{cmds:?}");
}

#[test]
fn cpu_preemption_evicts_a_smaller_neighbour_when_only_decode_fails() {
    // Slice of one instance: (0.02 + 0.04 × batch) × 1.1 / 0.2375.
    let cost = Flat {
        decode_s: 0.02,
        decode_per_request_s: 0.04,
        ..FAST
    };
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], cost);
    s.submit(req(1, 1, 100, 1.0), 0.0);
    settle(&mut s, 0.0);
    s.submit(req(2, 2, 100, 3.0), 0.0);
    s.submit(req(3, 1, 100, 1.0), 0.0);
    s.submit(req(4, 1, 100, 1.0), 0.0);
    settle(&mut s, 0.0);
    let a = s.by_model[&1][0];
    let b = s.by_model[&2][0];
    assert_eq!(s.instances[&a].requests.len(), 3);
    // Batch 4 alone is 0.83 of the CPU; with the neighbour's 0.28, 1.11.
    submit_5_preempts_2(&mut s, a, b);
}

#[test]
fn shared_sllm_instances_are_throttled_to_their_share_of_device_time() {
    let mut s = sched(Policy::SllmCS, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 1.0), 0.0);
    let cmds = settle(&mut s, 0.0);
    let i = runs(&cmds)[0];
    let one = [RequestOutcome {
        request: 1,
        tokens: 1,
        finished: false,
    }];
    s.iteration_done(0, i, &one, 0.1);
    // 0.1 s busy since billing started at 0: idle until 0.2.
    assert!(runs(&s.drain_commands()).is_empty());
    assert_eq!(s.next_wakeup_s(), Some(0.2));
    s.tick(0.2);
    assert_eq!(runs(&s.drain_commands()), vec![i]);
}

#[test]
fn snapshot_shows_instances_kv_and_queues() {
    // Room for one request of 300 tokens, not two.
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, WEIGHTS + 30 * 16)],
        FAST,
    );
    s.submit(req(1, 1, 300, 1.0), 0.0);
    let snap = s.snapshot();
    assert_eq!(snap.instances.len(), 1);
    let i = &snap.instances[0];
    assert_eq!(
        (i.model, i.kind, i.state, i.batch),
        (1, DeviceKind::Gpu, "loading", 1)
    );
    // The load started at once, with the pool its request needs.
    assert_eq!((i.kv_blocks_committed, i.kv_blocks_planned), (25, 25));
    assert_eq!(snap.nodes[0].planned_bytes, WEIGHTS + 25 * 16);
    assert!(snap.queued.is_empty());
    settle(&mut s, 0.0);
    let snap = s.snapshot();
    assert_eq!(snap.instances[0].state, "loaded");
    assert_eq!(snap.instances[0].kv_blocks_committed, 25);
    assert_eq!(snap.nodes[0].committed_bytes, WEIGHTS + 25 * 16);
    // A request the device has no room for now waits in the queue.
    s.submit(req(2, 1, 300, 10.0), 0.0);
    assert_eq!(s.snapshot().queued.get(&1), Some(&1));
}

#[test]
fn retired_models_unload_when_idle_and_new_types_can_be_added() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], FAST);
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    let t = s.add_model_type(spec());
    assert_eq!(t, ModelTypeId(1));
    let mut r = req(1, 7, 100, 1.0);
    r.model_type = t;
    s.submit(r, 0.0);
    let i = s.by_model[&7][0];
    settle(&mut s, 0.0);
    // Busy: retiring waits for the request to end.
    s.retire_model(7, 0.1);
    assert!(!s.instances[&i].retiring);
    let done = RequestOutcome {
        request: 1,
        tokens: 1,
        finished: true,
    };
    s.iteration_done(0, i, &[done], 0.2);
    s.tick(0.2);
    let cmds = settle(&mut s, 0.2);
    assert!(
        cmds.iter().any(|c| matches!(c, Command::Action { instance, op: ActionOp::Unload, .. } if *instance == i)),
        "{cmds:?}"
    );
}

#[test]
fn cpu_kv_is_fixed_unless_cpu_kv_scales() {
    let fixed_blocks = spec().cpu_kv_bytes / 32;
    for scales in [false, true] {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], FAST);
        s.cfg.cpu_kv_scales = scales;
        s.submit(req(1, 1, 300, 1.0), 0.0);
        let i = s.by_model[&1][0];
        // ceil(316 / 32) = 10 blocks, target 13.
        let first = if scales { 13 } else { fixed_blocks };
        assert_eq!(s.instances[&i].planned_blocks, first, "scales: {scales}");
        s.submit(req(2, 1, 400, 1.0), 0.0);
        // 10 + ceil(416 / 32) = 23 blocks: grow to ceil(23 × 1.25) = 29.
        let grown = if scales { 29 } else { fixed_blocks };
        assert_eq!(s.instances[&i].planned_blocks, grown, "scales: {scales}");
        settle(&mut s, 0.0);
        let done = RequestOutcome {
            request: 2,
            tokens: 1,
            finished: true,
        };
        s.iteration_done(0, i, &[done], 0.1);
        let shrunk = if scales { 13 } else { fixed_blocks };
        assert_eq!(s.instances[&i].planned_blocks, shrunk, "scales: {scales}");
    }
}

#[test]
fn kv_scaling_grows_to_target_and_shrinks_only_past_the_watermark() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 300, 1.0), 0.0);
    let i = s.by_model[&1][0];
    // ceil(316 / 16) = 20 blocks, target 25.
    assert_eq!(s.instances[&i].planned_blocks, 25);
    s.submit(req(2, 1, 20, 1.0), 0.0);
    // 23 blocks still fit in 25: no action.
    assert_eq!(s.instances[&i].planned_blocks, 25);
    s.submit(req(3, 1, 100, 1.0), 0.0);
    // 31 > 25: grow to ceil(31 × 1.25) = 39.
    assert_eq!(s.instances[&i].planned_blocks, 39);
    settle(&mut s, 0.0);
    let done = |r| RequestOutcome {
        request: r,
        tokens: 1,
        finished: true,
    };
    // Back to 20 blocks, target 25 < 39 / 1.25: shrink.
    s.iteration_done(0, i, &[done(2), done(3)], 0.1);
    assert_eq!(s.instances[&i].planned_blocks, 25);
    settle(&mut s, 0.1);
    // 1 more token: need still 20 (317 tokens), target 25 = allocation: stays.
    s.iteration_done(
        0,
        i,
        &[RequestOutcome {
            request: 1,
            tokens: 1,
            finished: false,
        }],
        0.2,
    );
    assert_eq!(s.instances[&i].planned_blocks, 25);
}

#[test]
fn grows_wait_for_committed_memory_and_shrinks_always_start() {
    let cap = 2 * WEIGHTS + 10 * 16;
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, cap)], FAST);
    let a = s.create_instance(0, 1, ModelTypeId(0), 0.0);
    let b = s.create_instance(0, 2, ModelTypeId(0), 0.0);
    s.enqueue(a, Op::Resize { blocks: 0 });
    s.enqueue(b, Op::Resize { blocks: 0 });
    s.instances.get_mut(&a).unwrap().planned_blocks = 0;
    s.tick(0.0);
    settle(&mut s, 0.0);
    // b holds 8 blocks; a wants 6: committed would be 2×1000 + 14×16 > cap.
    s.enqueue(b, Op::Resize { blocks: 8 });
    s.tick(0.0);
    settle(&mut s, 0.0);
    s.enqueue(a, Op::Resize { blocks: 6 });
    s.start_actions(0, 0.0);
    let early = s.drain_commands();
    assert!(early.is_empty(), "the grow must wait: {early:?}");
    s.enqueue(b, Op::Resize { blocks: 2 });
    s.start_actions(0, 0.0);
    let shrink = s.drain_commands();
    assert!(
        matches!(shrink.as_slice(), [Command::Action { instance, op: ActionOp::ResizeKv { kv_bytes: 32 }, .. }] if *instance == b),
        "{shrink:?}"
    );
    // Until the shrink finishes, its memory still counts as held.
    s.start_actions(0, 0.0);
    assert!(s.drain_commands().is_empty());
    let Command::Action { action, .. } = &shrink[0] else {
        unreachable!()
    };
    s.action_done(0, *action, 0.0);
    let grow = s.drain_commands();
    assert!(
        matches!(grow.as_slice(), [Command::Action { instance, op: ActionOp::ResizeKv { kv_bytes: 96 }, .. }] if *instance == a)
    );
    assert!(s.committed_bytes(0) <= cap);
}

#[test]
fn a_request_outgrowing_the_node_is_evicted_and_its_empty_instance_retires() {
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, WEIGHTS + 10 * 16)],
        FAST,
    );
    s.submit(req(1, 1, 100, 30.0), 0.0);
    settle(&mut s, 0.0);
    let i = s.by_model[&1][0];
    assert_eq!(s.instances[&i].planned_blocks, 10);
    let grown = [RequestOutcome {
        request: 1,
        tokens: 60,
        finished: false,
    }];
    // 160 tokens + the next grant's 2 need 11 blocks; only 10 ever fit.
    s.iteration_done(0, i, &grown, 1.0);
    let cmds = s.drain_commands();
    assert!(cmds.contains(&Command::Preempt {
        instance: i,
        requests: vec![1]
    }));
    assert!(s.instances[&i].requests.is_empty());
    assert_eq!(s.instances[&i].idle_since_s, Some(1.0));
    s.tick(2.0);
    let unloads = settle(&mut s, 2.0)
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Command::Action {
                    op: ActionOp::Unload,
                    ..
                }
            )
        })
        .count();
    assert_eq!(unloads, 1);
}

#[test]
fn cancel_ends_a_request_once_and_frees_its_instance() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 1.0), 0.0);
    settle(&mut s, 0.0);
    s.cancel(1, 0.05);
    s.cancel(1, 0.06);
    let drops = s
        .drain_commands()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Command::Dropped {
                    reason: DropReason::Cancelled,
                    ..
                }
            )
        })
        .count();
    assert_eq!(drops, 1);
    assert_eq!(s.live_requests(), 0);
    // Keep-alive (1 s on GPU) then unload.
    assert_eq!(s.next_wakeup_s(), Some(1.05));
}

fn unloads(cmds: &[Command]) -> Vec<InstanceId> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Action {
                instance,
                op: ActionOp::Unload,
                ..
            } => Some(*instance),
            _ => None,
        })
        .collect()
}

/// Serves one request of `model` at `now` on `s` and leaves its instance
/// idle (the keep-alive is long).
fn serve_and_idle(s: &mut Scheduler<Flat>, id: RequestId, model: ModelId, now: f64) -> InstanceId {
    let mut r = req(id, model, 100, 1.0);
    r.arrival_s = now;
    s.submit(r, now);
    let i = *s.by_model[&model].last().expect("placed");
    settle(s, now);
    let done = RequestOutcome {
        request: id,
        tokens: 1,
        finished: true,
    };
    s.iteration_done(s.instances[&i].node, i, &[done], now + 0.1);
    s.tick(now + 0.1);
    settle(s, now + 0.1);
    assert!(s.instances[&i].requests.is_empty());
    i
}

#[test]
fn an_idle_instance_unloads_to_make_room_for_another_model() {
    // Room for one instance, not two; instances idle for 300 s.
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1800)], FAST);
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    let idle = serve_and_idle(&mut s, 1, 1, 0.0);
    assert_eq!(s.probe(&req(2, 2, 100, 5.0), 1.0), Probe::NewAfterUnload);
    assert!(s.drain_commands().is_empty(), "a probe changes nothing");
    s.submit(req(2, 2, 100, 5.0), 1.0);
    let cmds = settle(&mut s, 1.0);
    assert_eq!(unloads(&cmds), vec![idle], "{cmds:?}");
    let new = s.by_model[&2][0];
    assert_eq!(loads(&cmds), vec![(0, new)]);
    // The unload is started before the load it makes room for.
    let pos = |want: &dyn Fn(&ActionOp) -> bool| {
        cmds.iter()
            .position(|c| matches!(c, Command::Action { op, .. } if want(op)))
            .expect("issued")
    };
    assert!(pos(&|o| matches!(o, ActionOp::Unload)) < pos(&|o| matches!(o, ActionOp::Load { .. })));
    assert!(s.snapshot().queued.is_empty());
}

#[test]
fn the_sllm_baselines_wait_for_an_idle_instance_s_keep_alive() {
    let mut s = sched(Policy::Sllm, &[(DeviceKind::Gpu, 1800)], FAST);
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    let idle = serve_and_idle(&mut s, 1, 1, 0.0);
    assert_eq!(s.probe(&req(2, 2, 100, 5.0), 1.0), Probe::No);
    s.submit(req(2, 2, 100, 5.0), 1.0);
    let cmds = settle(&mut s, 1.0);
    assert!(
        unloads(&cmds).is_empty() && loads(&cmds).is_empty(),
        "{cmds:?}"
    );
    assert!(!s.instances[&idle].retiring);
}

#[test]
fn free_room_elsewhere_is_taken_before_an_idle_instance_is_unloaded() {
    // Node 0 holds an idle instance and has no room for a second; node 1
    // is empty. Bin-packing tries node 0 first, but nothing is unloaded.
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, 1800), (DeviceKind::Gpu, 1800)],
        FAST,
    );
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    let idle = serve_and_idle(&mut s, 1, 1, 0.0);
    assert_eq!(s.instances[&idle].node, 0);
    assert_eq!(s.probe(&req(2, 2, 100, 5.0), 1.0), Probe::New);
    s.submit(req(2, 2, 100, 5.0), 1.0);
    let cmds = settle(&mut s, 1.0);
    assert!(unloads(&cmds).is_empty(), "{cmds:?}");
    assert_eq!(load_nodes(&cmds), vec![1]);
}

#[test]
fn only_the_longest_idle_instances_that_make_room_unload_and_busy_ones_never() {
    // Room for two instances.
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 2600)], FAST);
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    let older = serve_and_idle(&mut s, 1, 1, 0.0);
    let newer = serve_and_idle(&mut s, 2, 2, 1.0);
    s.submit(req(3, 3, 100, 5.0), 2.0);
    let cmds = settle(&mut s, 2.0);
    assert_eq!(unloads(&cmds), vec![older], "{cmds:?}");
    assert!(s.instances.contains_key(&newer) && !s.instances[&newer].retiring);
    // Now models 2 (idle) and 3 (busy) fill the device: model 4 takes the
    // idle one's room, and model 5 waits, since model 3 and 4 are busy.
    let busy = s.by_model[&3][0];
    s.submit(req(4, 4, 100, 5.0), 3.0);
    let cmds = settle(&mut s, 3.0);
    assert_eq!(unloads(&cmds), vec![newer], "{cmds:?}");
    assert_eq!(s.probe(&req(5, 5, 100, 5.0), 3.0), Probe::No);
    s.submit(req(5, 5, 100, 5.0), 3.0);
    let cmds = settle(&mut s, 3.0);
    assert!(
        unloads(&cmds).is_empty() && loads(&cmds).is_empty(),
        "{cmds:?}"
    );
    assert!(!s.instances[&busy].retiring);
    assert_eq!(s.snapshot().queued.get(&5), Some(&1));
}

#[test]
fn a_pool_is_not_shrunk_while_a_request_of_its_model_waits() {
    // Room for 40 blocks of KV beside the weights.
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Gpu, WEIGHTS + 40 * 16)],
        FAST,
    );
    s.submit(req(1, 1, 300, 5.0), 0.0);
    let i = s.by_model[&1][0];
    settle(&mut s, 0.0);
    let grown = s.instances[&i].planned_blocks;
    // Request 2 does not fit beside request 1: it waits.
    s.submit(req(2, 1, 400, 5.0), 0.1);
    settle(&mut s, 0.1);
    assert!(s.waiting(2));
    // Request 1 ends: the pool keeps its size for request 2, which then
    // only grows it.
    let done = RequestOutcome {
        request: 1,
        tokens: 1,
        finished: true,
    };
    s.iteration_done(0, i, &[done], 0.2);
    let mut cmds = settle(&mut s, 0.2);
    s.tick(0.4);
    cmds.extend(settle(&mut s, 0.4));
    assert!(!s.waiting(2));
    let sizes: Vec<u64> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Action {
                op: ActionOp::ResizeKv { kv_bytes },
                ..
            } => Some(kv_bytes / 16),
            _ => None,
        })
        .collect();
    assert!(sizes.iter().all(|&b| b >= grown), "{sizes:?} from {grown}");
    // With nothing waiting, an idle pool shrinks.
    let done = RequestOutcome {
        request: 2,
        tokens: 1,
        finished: true,
    };
    s.iteration_done(0, i, &[done], 0.5);
    settle(&mut s, 0.5);
    assert!(s.instances[&i].planned_blocks < grown);
}

#[test]
fn a_cpu_pool_a_burst_left_waits_out_the_shrink_delay() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], FAST);
    s.cfg.cpu_kv_scales = true;
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    s.cfg.kv_shrink_delay_s = PerKind::new(2.0, 0.0);
    let resizes = |cmds: &[Command]| {
        cmds.iter()
            .filter(|c| {
                matches!(
                    c,
                    Command::Action {
                        op: ActionOp::ResizeKv { .. },
                        ..
                    }
                )
            })
            .count()
    };
    let end = |s: &mut Scheduler<Flat>, id, t| {
        let i = s.requests[&id].instance.expect("placed");
        let done = RequestOutcome {
            request: id,
            tokens: 1,
            finished: true,
        };
        s.iteration_done(0, i, &[done], t);
        settle(s, t)
    };
    s.submit(req(1, 1, 300, 5.0), 0.0);
    let i = s.by_model[&1][0];
    settle(&mut s, 0.0);
    let grown = s.instances[&i].planned_blocks;
    // The burst ends: the pool stays for 2 s.
    assert_eq!(resizes(&end(&mut s, 1, 0.5)), 0);
    assert_eq!(s.next_wakeup_s(), Some(2.5));
    // The next burst within the delay finds it as it was: no resize.
    let mut r = req(2, 1, 300, 5.0);
    r.arrival_s = 1.0;
    s.submit(r, 1.0);
    let mut cmds = settle(&mut s, 1.0);
    cmds.extend(end(&mut s, 2, 1.5));
    assert_eq!(resizes(&cmds), 0, "{cmds:?}");
    assert_eq!(s.instances[&i].planned_blocks, grown);
    // Left alone for the delay, it shrinks.
    s.tick(3.0);
    assert_eq!(resizes(&settle(&mut s, 3.0)), 0, "not before 3.5 s");
    s.tick(3.5);
    assert_eq!(resizes(&settle(&mut s, 3.5)), 1);
    assert!(s.instances[&i].planned_blocks < grown);
}

/// A scheduler on one CPU node of `capacity` bytes, an idle floor of
/// `floor` tokens, where model 1 served one 300-token request and is idle
/// now; with the instance and its pool while the request ran.
fn idle_after_one_request(capacity: u64, floor: u64) -> (Scheduler<Flat>, InstanceId, u64) {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, capacity)], FAST);
    s.cfg.cpu_kv_scales = true;
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    s.cfg.idle_kv_tokens = PerKind::new(floor, 0);
    s.submit(req(1, 1, 300, 5.0), 0.0);
    let i = runs(&settle(&mut s, 0.0))[0];
    let busy = s.instances[&i].planned_blocks;
    let done = RequestOutcome {
        request: 1,
        tokens: 1,
        finished: true,
    };
    s.iteration_done(0, i, &[done], 0.5);
    settle(&mut s, 0.5);
    (s, i, busy)
}

#[test]
fn an_idle_cpu_pool_shrinks_to_its_floor_and_never_grows_for_it() {
    // The pool while the request ran, after it, and the floor's blocks.
    let pools = |floor: u64| {
        let (s, i, busy) = idle_after_one_request(1 << 20, floor);
        let blocks = s.models[0].blocks_for_tokens(DeviceKind::Cpu, floor);
        (busy, s.instances[&i].planned_blocks, blocks)
    };
    let (busy, idle, _) = pools(0);
    assert!(busy > 0);
    assert_eq!(idle, 0, "no floor: an idle pool goes back whole");
    let (busy_with_floor, idle, floor) = pools(128);
    assert_eq!(busy_with_floor, busy, "a floor changes no grant");
    assert!(0 < floor && floor < busy);
    assert_eq!(idle, floor, "an idle pool keeps its floor");
    // A floor above what the instance ever needed: the pool stays as it
    // was granted, never grown for it.
    let (_, idle, floor) = pools(1 << 16);
    assert!(floor > busy);
    assert_eq!(idle, busy);
}

/// A request that needs the memory an idle instance keeps for its idle
/// floor takes it: the idle pool shrinks to nothing and the instance stays
/// loaded, as with no floor (not unloaded for the room, nor waiting).
#[test]
fn an_idle_floor_gives_its_kv_back_to_a_request_that_needs_the_memory() {
    let (_, _, busy) = idle_after_one_request(1 << 20, 0);
    // Room for both models' weights and one such pool, not two.
    let capacity = 2 * WEIGHTS + busy * 32 + 16;
    let (mut s, first, _) = idle_after_one_request(capacity, 1 << 16);
    assert_eq!(
        s.instances[&first].planned_blocks, busy,
        "kept as its floor"
    );
    s.submit(req(2, 2, 300, 5.0), 1.0);
    let cmds = settle(&mut s, 1.0);
    let second = runs(&cmds);
    assert_eq!(second.len(), 1, "model 2 runs: {cmds:?}");
    assert_ne!(second[0], first);
    let shrunk = cmds.iter().any(|c| {
        matches!(c, Command::Action { instance, op: ActionOp::ResizeKv { kv_bytes: 0 }, .. }
            if *instance == first)
    });
    assert!(shrunk, "{cmds:?}");
    let inst = &s.instances[&first];
    assert!(!inst.retiring, "model 1 stays loaded");
    assert_eq!(inst.planned_blocks, 0);
    // A running request whose pool must grow into the floor's memory
    // takes it too, rather than being evicted.
    let (mut s, first, _) = idle_after_one_request(2 * WEIGHTS + busy * 32 + 4 * 32, 1 << 16);
    s.submit(req(2, 2, 30, 5.0), 1.0);
    let second = runs(&settle(&mut s, 1.0))[0];
    let small = s.instances[&second].planned_blocks;
    assert_eq!(s.instances[&first].planned_blocks, busy);
    for k in 0..20 {
        let out = RequestOutcome {
            request: 2,
            tokens: 16,
            finished: false,
        };
        let t = 1.1 + k as f64 * 0.1;
        s.iteration_done(0, second, &[out], t);
        let cmds = settle(&mut s, t);
        let preempted = cmds.iter().any(|c| matches!(c, Command::Preempt { .. }));
        assert!(!preempted, "{cmds:?}");
    }
    assert_eq!(s.requests[&2].instance, Some(second));
    assert!(s.instances[&second].planned_blocks > small + 4);
    assert_eq!(s.instances[&first].planned_blocks, 0);
    assert!(!s.instances[&first].retiring);
    // As with no floor: model 1's idle pool was empty, model 2 ran.
    let (mut s, first, _) = idle_after_one_request(capacity, 0);
    assert_eq!(s.instances[&first].planned_blocks, 0);
    s.submit(req(2, 2, 300, 5.0), 1.0);
    let cmds = settle(&mut s, 1.0);
    assert_eq!(runs(&cmds).len(), 1, "{cmds:?}");
    assert!(!s.instances[&first].retiring);
}

#[test]
fn requests_submitted_together_are_prefilled_in_one_iteration() {
    let prefills = |cmds: &[Command]| -> Vec<Vec<RequestId>> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Run { prefill, .. } if !prefill.is_empty() => {
                    Some(prefill.iter().map(|p| p.0).collect())
                }
                _ => None,
            })
            .collect()
    };
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], FAST);
    // The instance and its pool outlive each request, as live on a CPU.
    s.cfg.keep_alive_s = PerKind::splat(300.0);
    s.cfg.kv_shrink_delay_s = PerKind::new(5.0, 0.0);
    s.submit(req(1, 1, 100, 10.0), 0.0);
    let i = runs(&settle(&mut s, 0.0))[0];
    let done = |request| RequestOutcome {
        request,
        tokens: 1,
        finished: true,
    };
    s.iteration_done(0, i, &[done(1)], 0.1);
    settle(&mut s, 0.1);
    // Submitted one by one to an idle instance, the first is granted alone.
    s.submit(req(2, 1, 100, 10.0), 0.2);
    s.submit(req(3, 1, 100, 10.0), 0.2);
    assert_eq!(prefills(&settle(&mut s, 0.2)), vec![vec![2]]);
    s.iteration_done(0, i, &[done(2)], 0.3);
    assert_eq!(prefills(&settle(&mut s, 0.3)), vec![vec![3]]);
    s.iteration_done(0, i, &[done(3)], 0.4);
    settle(&mut s, 0.4);
    // Submitted together, one iteration prefills them all.
    s.submit_together((4..8).map(|id| req(id, 1, 100, 10.0)), 0.5);
    assert_eq!(prefills(&settle(&mut s, 0.5)), vec![vec![4, 5, 6, 7]]);
}

#[test]
fn a_grow_factor_grows_a_pool_ahead_of_a_burst_within_half_the_spare_room() {
    // Requests of 300 tokens (10 CPU blocks of 32 with the quota) arrive
    // one at a time; returns the pool's sizes (the load's, then each grow).
    let sizes = |factor: f64, room_blocks: u64, n: u64| {
        let mut s = sched(
            Policy::Slinfer,
            &[(DeviceKind::Cpu, WEIGHTS + room_blocks * 32)],
            FAST,
        );
        s.cfg.kv_grow_factor = PerKind::new(factor, 1.0);
        s.cfg.cpu_kv_scales = true;
        let mut sizes = Vec::new();
        for id in 1..=n {
            s.submit(req(id, 1, 300, 60.0), 0.0);
            let i = s.by_model[&1][0];
            let blocks = s.instances[&i].planned_blocks;
            if sizes.last() != Some(&blocks) {
                sizes.push(blocks);
            }
        }
        sizes
    };
    let one = sizes(1.0, 1 << 15, 40);
    let two = sizes(2.0, 1 << 15, 40);
    // Half as many grows (each size after the first is one).
    let grows = |s: &[u64]| s.len() - 1;
    assert!(grows(&two) * 2 <= grows(&one), "{one:?} {two:?}");
    assert!(two.windows(2).all(|w| w[1] >= 2 * w[0]), "{two:?}");
    // With room for 120 blocks, six requests need 60 (target 75): doubling
    // 52 would take 104, but the pool grows past its target by at most
    // half the 45 blocks left beside it.
    assert_eq!(sizes(1.0, 120, 6).last(), Some(&75));
    assert_eq!(sizes(2.0, 120, 6), vec![13, 26, 52, 97]);
}

#[test]
fn a_request_s_max_output_bounds_its_planned_kv() {
    let planned = |max_output_tokens| {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
        s.cfg.lookahead_tokens = 512;
        s.submit(
            Request {
                max_output_tokens,
                ..req(1, 1, 300, 1.0)
            },
            0.0,
        );
        s.instances[&s.by_model[&1][0]].planned_blocks
    };
    // ceil(812 / 16) = 51 blocks, target 64.
    assert_eq!(planned(None), 64);
    // At most 20 more tokens: ceil(320 / 16) = 20 blocks, target 25.
    assert_eq!(planned(Some(20)), 25);
    // A bound past the look-ahead changes nothing.
    assert_eq!(planned(Some(4096)), 64);
}

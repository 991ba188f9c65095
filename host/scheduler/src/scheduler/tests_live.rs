use super::tests::*;
use super::*;

#[test]
fn a_failed_node_drops_its_requests_and_leaves_placement() {
    let mut s = sched(
        Policy::Slinfer,
        &[(DeviceKind::Cpu, 1 << 20), (DeviceKind::Gpu, 1 << 20)],
        FAST,
    );
    s.submit(req(1, 1, 100, 1.0), 0.0);
    assert_eq!(load_nodes(&settle(&mut s, 0.0)), [0], "CPU first");
    s.fail_node(0, 0.1);
    s.fail_node(0, 0.1);
    let cmds = s.drain_commands();
    let dropped: Vec<_> = cmds
        .iter()
        .filter(|c| {
            matches!(
                c,
                Command::Dropped {
                    request: 1,
                    reason: DropReason::DeviceFailed,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(dropped.len(), 1, "{cmds:?}");
    assert_eq!(s.live_requests(), 0);
    let snap = s.snapshot();
    assert!(snap.nodes[0].failed && !snap.nodes[1].failed);
    assert!(snap.instances.iter().all(|i| i.node != 0));
    // A late report from the failed node's instance changes nothing.
    s.iteration_done(0, 0, &[], 0.2);
    // New requests go to the node that is left.
    s.submit(req(2, 1, 100, 1.0), 0.3);
    assert_eq!(load_nodes(&settle(&mut s, 0.3)), [1]);
    // With every node failed, a request is unservable at once.
    s.fail_node(1, 0.4);
    s.drain_commands();
    s.submit(req(3, 1, 100, 1.0), 0.5);
    assert!(s.drain_commands().iter().any(|c| matches!(
        c,
        Command::Dropped {
            request: 3,
            reason: DropReason::Unservable,
            ..
        }
    )));
}

/// Three requests of model 1 complete a second apart, then one holds the
/// node; returns the scheduler at t = 3.
fn busy_node_with_a_known_rate(refuse_early: bool) -> Scheduler<Flat> {
    // KV room for one 400-token request, not two.
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, WEIGHTS + 660)], FAST);
    s.cfg.refuse_early = refuse_early;
    for (id, t) in [(1, 0.0), (2, 1.0), (3, 2.0)] {
        s.submit(arriving(id, 100, 5.0, t), t);
        let inst = runs(&settle(&mut s, t))[0];
        let done = RequestOutcome {
            request: id,
            tokens: 1,
            finished: true,
        };
        s.iteration_done(0, inst, &[done], t + 0.5);
        settle(&mut s, t + 0.5);
    }
    s.submit(arriving(10, 400, 1.0, 3.0), 3.0);
    let c = settle(&mut s, 3.0);
    assert_eq!(runs(&c).len(), 1, "{c:?}");
    s
}

/// A request arriving at `t`.
fn arriving(id: RequestId, input_tokens: u64, ttft_slo_s: f64, t: f64) -> Request {
    Request {
        arrival_s: t,
        ..req(id, 1, input_tokens, ttft_slo_s)
    }
}

fn drops(cmds: &[Command]) -> Vec<(RequestId, DropReason, Option<f64>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Dropped {
                request,
                reason,
                retry_after_s,
            } => Some((*request, *reason, *retry_after_s)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_request_that_would_wait_past_its_deadline_is_refused_at_once() {
    let mut s = busy_node_with_a_known_rate(true);
    // 3 completions over the 2.5 s since the first: 1.2/s. The first four
    // to wait drain in 0.83 to 3.33 s: within their 0.95 s of planned TTFT
    // at four times the rate. The fifth needs 4.17 s (1.04 s at four
    // times): refused now, told when the queue will have been served.
    for id in 11..=15 {
        s.submit(arriving(id, 400, 1.0, 3.0), 3.0);
    }
    let d = drops(&s.drain_commands());
    assert_eq!(d.len(), 1, "{d:?}");
    let (id, reason, retry) = d[0];
    assert_eq!((id, reason), (15, DropReason::WouldMissDeadline));
    assert!((retry.unwrap() - 5.0 / 1.2).abs() < 1e-9, "{retry:?}");
    // The paper's policy holds it until its deadline instead.
    let mut s = busy_node_with_a_known_rate(false);
    for id in 11..=15 {
        s.submit(arriving(id, 400, 1.0, 3.0), 3.0);
    }
    assert!(drops(&s.drain_commands()).is_empty());
    s.tick(4.0);
    let d = drops(&s.drain_commands());
    assert_eq!(
        d.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        (11..=15)
            .map(|id| (id, DropReason::DeadlinePassedWaiting))
            .collect::<Vec<_>>()
    );
    assert!(
        d.iter().all(|x| x.2.is_some()),
        "a hint from the rate: {d:?}"
    );
}

#[test]
fn a_measured_instance_counts_what_it_holds_and_new_ones_plan_with_it() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 8 * WEIGHTS)], FAST);
    s.submit(req(1, 1, 100, 1.0), 0.0);
    let c = settle(&mut s, 0.0);
    let (_, inst) = loads(&c)[0];
    let estimate = s.snapshot().instances[0].static_bytes;
    assert_eq!(estimate, WEIGHTS);
    let kv = s.committed_bytes(0) - estimate;
    // The engine holds three times the estimate once loaded.
    s.instance_measured(inst, 3 * WEIGHTS, 0.1);
    assert_eq!(s.snapshot().instances[0].static_bytes, 3 * WEIGHTS);
    assert_eq!(s.committed_bytes(0), 3 * WEIGHTS + kv);
    // A second instance plans with the measurement: two fit, a third does not.
    let b = s.create_instance(0, 2, ModelTypeId(0), 0.2);
    s.start_actions(0, 0.2);
    assert_eq!(loads(&settle(&mut s, 0.2)), [(0, b)]);
    assert_eq!(s.instances[&b].static_bytes, 3 * WEIGHTS);
    let c = s.create_instance(0, 3, ModelTypeId(0), 0.3);
    s.start_actions(0, 0.3);
    let cmds = s.drain_commands();
    assert!(cmds.is_empty(), "the third load must wait: {cmds:?}");
    assert!(s.committed_bytes(0) <= 8 * WEIGHTS);
    // Measuring an unknown (already unloaded) instance changes nothing.
    s.instance_measured(c + 100, 1, 0.4);
    assert_eq!(s.instances[&b].static_bytes, 3 * WEIGHTS);
}

#[test]
fn less_room_holds_back_loads_and_more_lets_them_through() {
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 4 * WEIGHTS)], FAST);
    s.set_memory(0, 4 * WEIGHTS, WEIGHTS / 2, 0.0);
    let n = &s.snapshot().nodes[0];
    assert_eq!((n.capacity_bytes, n.room_bytes), (4 * WEIGHTS, WEIGHTS / 2));
    // A request that fits the capacity waits for room rather than being
    // refused as too large.
    s.submit(req(1, 1, 100, 5.0), 0.0);
    let c = settle(&mut s, 0.0);
    assert!(loads(&c).is_empty() && drops(&c).is_empty(), "{c:?}");
    s.set_memory(0, 4 * WEIGHTS, 4 * WEIGHTS, 1.0);
    s.tick(1.0);
    let c = settle(&mut s, 1.0);
    assert_eq!(load_nodes(&c), [0], "{c:?}");
    assert_eq!(runs(&c).len(), 1, "{c:?}");
    // Less room than is committed evicts nothing.
    let committed = s.committed_bytes(0);
    s.set_memory(0, 4 * WEIGHTS, 1, 2.0);
    assert!(s.drain_commands().is_empty());
    assert_eq!(s.committed_bytes(0), committed);
    // A request larger than the capacity is refused at once.
    s.set_memory(0, WEIGHTS / 2, WEIGHTS / 2, 3.0);
    s.submit(req(2, 2, 100, 5.0), 3.0);
    let c = s.drain_commands();
    assert_eq!(drops(&c), [(2, DropReason::Unservable, None)], "{c:?}");
}

#[test]
fn with_cold_starts_counted_a_request_joins_no_load_it_cannot_wait_for() {
    // Loads take 2 s; prefills 0.01 s.
    let slow_load = || Flat {
        load_s: 2.0,
        ..FAST
    };
    for counts_load in [false, true] {
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], slow_load());
        s.cfg.ttft_counts_load = counts_load;
        // The model's first instance loads (t = 0 to 2) even for a 1 s SLO:
        // nothing better can be done for a cold model.
        s.submit(req(1, 1, 100, 1.0), 0.0);
        assert_eq!(load_nodes(&s.drain_commands()), [0]);
        // At t = 0.5 the load has 1.5 s left: a 1.5 s SLO (1.425 s
        // planned) can neither join it nor wait for a second load; a 4 s
        // SLO joins it. The paper's rule does not count the load: both join.
        s.submit(arriving(2, 100, 1.5, 0.5), 0.5);
        s.submit(arriving(3, 100, 4.0, 0.5), 0.5);
        let c = s.drain_commands();
        assert!(load_nodes(&c).is_empty(), "{counts_load}: {c:?}");
        assert!(drops(&c).is_empty(), "{counts_load}: {c:?}");
        let snap = s.snapshot();
        assert_eq!(snap.instances.len(), 1);
        assert_eq!(snap.instances[0].batch, if counts_load { 2 } else { 3 });
        if counts_load {
            s.tick(2.0);
            let d = drops(&s.drain_commands());
            assert_eq!(
                d.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
                [(2, DropReason::DeadlinePassedWaiting)]
            );
        }
    }
}

#[test]
fn a_load_is_planned_with_the_memory_it_writes_fresh() {
    // Weights load in 1 s. An instance on the CPU gets a fixed pool (4,096
    // bytes: the paper's CPU instances do not scale); pool memory the node
    // never held costs 0 or 1 s per 4,096 bytes.
    let joins_second_request = |s: &mut Scheduler<Flat>, model: ModelId, t: f64| {
        let id = 10 * RequestId::from(model);
        s.submit(req(id, model, 100, 60.0), t);
        let load = s.drain_commands();
        assert_eq!(load_nodes(&load), [0], "{load:?}");
        // Half a second in, a request with a 1.2 s SLO (1.14 s planned)
        // can join a load that ends at 1 s, not one that ends at 2 s.
        let second = Request {
            model,
            function: model,
            ..arriving(id + 1, 100, 1.2, t + 0.5)
        };
        s.submit(second, t + 0.5);
        let c = s.drain_commands();
        let inst = s.by_model[&model][0];
        let batch = s
            .snapshot()
            .instances
            .iter()
            .find(|i| i.instance == inst)
            .map(|i| i.batch);
        assert!(drops(&c).is_empty(), "{c:?}");
        // The load ends (at once: only the plan matters here).
        for c in load.iter().chain(&c) {
            if let Command::Action { node, action, .. } = c {
                s.action_done(*node, *action, t + 0.5);
            }
        }
        batch == Some(2)
    };
    for (write_s_per_byte, joins) in [(0.0, true), (1.0 / 4096.0, false)] {
        let cost = Flat {
            load_s: 1.0,
            fresh_write_s_per_byte: write_s_per_byte,
            ..FAST
        };
        let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], cost);
        assert!(!s.cfg.cpu_kv_scales);
        s.cfg.ttft_counts_load = true;
        assert_eq!(
            joins_second_request(&mut s, 1, 0.0),
            joins,
            "{write_s_per_byte}"
        );
        // Once model 1 has left, model 2's instance reuses its memory: no
        // fresh memory to write, whatever it costs.
        let done = |request| RequestOutcome {
            request,
            tokens: 1,
            finished: true,
        };
        let mut t = 1.0;
        while s.live_requests() > 0 {
            for inst in runs(&settle(&mut s, t)) {
                s.iteration_done(0, inst, &[done(10), done(11)], t + 0.1);
            }
            t += 0.2;
            s.tick(t);
        }
        s.retire_model(1, t);
        s.tick(t);
        settle(&mut s, t);
        assert!(s.by_model.get(&1).is_none_or(|v| v.is_empty()));
        assert!(
            joins_second_request(&mut s, 2, t + 1.0),
            "{write_s_per_byte}"
        );
    }
}

#[test]
fn a_request_whose_next_try_comes_after_its_deadline_is_refused_at_once() {
    // KV room for one 400-token request, not two; no completions yet, so
    // no rate to go by.
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, WEIGHTS + 660)], FAST);
    s.cfg.refuse_early = true;
    s.cfg.ttft_counts_load = true;
    s.submit(arriving(1, 400, 5.0, 0.0), 0.0);
    assert_eq!(runs(&settle(&mut s, 0.0)).len(), 1);
    // Retries come every 0.25 s: a 0.2 s SLO (0.19 s planned) would be
    // dropped unplaced at its next try, so it is refused now; a 1 s SLO
    // waits for its tries.
    s.submit(arriving(2, 400, 0.2, 0.1), 0.1);
    s.submit(arriving(3, 400, 1.0, 0.1), 0.1);
    let d = drops(&s.drain_commands());
    assert_eq!(d, [(2, DropReason::WouldMissDeadline, None)]);
    // Request 3 gets its tries, the last at 0.85 s: 0.85 + 0.25 is past its
    // 1.05 s deadline, so that try refuses it, before the deadline.
    for t in [0.35, 0.6, 0.85] {
        s.tick(t);
    }
    let d = drops(&s.drain_commands());
    assert_eq!(d, [(3, DropReason::WouldMissDeadline, None)]);
}

#[test]
fn a_new_instance_whose_load_would_stall_a_cpu_past_waiting_prefills_waits() {
    // Loads take 2 s and a CPU grants no iteration while one runs; an
    // instance's fixed CPU pool holds 4,096 tokens.
    let cost = Flat {
        load_s: 2.0,
        ..FAST
    };
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Cpu, 1 << 20)], cost);
    s.cfg.ttft_counts_load = true;
    // Request 1 loads model 1 and fills most of its pool; its prefill then
    // holds the CPU.
    s.submit(arriving(1, 3000, 10.0, 0.0), 0.0);
    assert_eq!(runs(&settle(&mut s, 0.0)).len(), 1);
    let first = s.by_model[&1][0];
    // Request 2 (1 s SLO) joins that instance and waits for the CPU.
    s.submit(arriving(2, 100, 1.0, 0.1), 0.1);
    settle(&mut s, 0.1);
    assert_eq!(s.requests[&2].instance, Some(first));
    // Request 3 needs a second instance, whose load would run before
    // request 2's prefill and make it late: it waits (its 10 s SLO leaves
    // room to).
    s.submit(arriving(3, 3000, 10.0, 0.1), 0.1);
    settle(&mut s, 0.1);
    assert!(s.waiting(3));
    assert_eq!(s.by_model[&1], [first]);
    // Once request 2 has its first token, the second instance is placed
    // and loads when the CPU is next free.
    let token = |request| RequestOutcome {
        request,
        tokens: 1,
        finished: false,
    };
    s.iteration_done(0, first, &[token(1)], 0.2);
    assert_eq!(runs(&settle(&mut s, 0.2)), [first], "request 2's prefill");
    s.iteration_done(0, first, &[token(2)], 0.3);
    s.tick(0.35);
    settle(&mut s, 0.35);
    assert!(!s.waiting(3));
    assert_eq!(s.by_model[&1].len(), 2);
    s.iteration_done(0, first, &[token(1), token(2)], 0.4);
    let cmds = settle(&mut s, 0.4);
    assert_eq!(loads(&cmds).len(), 1, "{cmds:?}");
}

/// The requests each run in `cmds` prefills.
fn prefilled(cmds: &[Command]) -> Vec<Vec<RequestId>> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Run { prefill, .. } => Some(prefill.iter().map(|&(r, _)| r).collect()),
            _ => None,
        })
        .collect()
}

/// With a gathering gap, an idle instance's first prefill waits until no
/// request has joined it for the gap, at most four gaps after the first,
/// and then takes all that joined; an instance that decodes is not held.
#[test]
fn an_idle_instance_gathers_a_burst_into_one_prefill() {
    let gap = 0.003;
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.cfg.prefill_gather_s = crate::PerKind::splat(gap);
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
    // A burst a millisecond apart: one prefill, a gap after the last.
    s.submit(req(1, 1, 100, 5.0), 0.0);
    assert!(runs(&settle(&mut s, 0.0)).is_empty());
    assert!(close(s.next_wakeup_s(), gap), "{:?}", s.next_wakeup_s());
    s.submit(req(2, 1, 100, 5.0), 0.001);
    s.submit(req(3, 1, 100, 5.0), 0.002);
    assert!(runs(&settle(&mut s, 0.002)).is_empty());
    assert!(close(s.next_wakeup_s(), 0.002 + gap));
    s.tick(0.004);
    assert!(runs(&settle(&mut s, 0.004)).is_empty());
    s.tick(0.002 + gap);
    let c = settle(&mut s, 0.002 + gap);
    assert_eq!(prefilled(&c), [vec![1, 2, 3]], "{c:?}");
    let inst = runs(&c)[0];
    let first = |id| RequestOutcome {
        request: id,
        tokens: 1,
        finished: false,
    };
    s.iteration_done(0, inst, &[first(1), first(2), first(3)], 0.1);
    assert_eq!(
        prefilled(&settle(&mut s, 0.1)),
        [Vec::<RequestId>::new()],
        "a decode run"
    );
    // Joining an instance that decodes: the next run takes it at once.
    s.submit(req(4, 1, 100, 5.0), 0.11);
    s.iteration_done(0, inst, &[first(1), first(2), first(3)], 0.12);
    assert_eq!(prefilled(&settle(&mut s, 0.12)), [vec![4]]);

    // Arrivals that keep coming: at most four gaps after the first.
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.cfg.prefill_gather_s = crate::PerKind::splat(gap);
    for (i, t) in [0.0, 0.002, 0.004, 0.006, 0.008, 0.010, 0.0115]
        .into_iter()
        .enumerate()
    {
        s.submit(req(10 + i as u64, 1, 10, 5.0), t);
        s.tick(t);
        assert!(runs(&settle(&mut s, t)).is_empty(), "at {t}");
    }
    assert!(close(s.next_wakeup_s(), 4.0 * gap));
    s.tick(4.0 * gap);
    let c = settle(&mut s, 4.0 * gap);
    assert_eq!(prefilled(&c), [(10..17).collect::<Vec<_>>()], "{c:?}");

    // Without the gap (the paper's setting) the first request runs alone.
    let mut s = sched(Policy::Slinfer, &[(DeviceKind::Gpu, 1 << 20)], FAST);
    s.submit(req(1, 1, 100, 5.0), 0.0);
    assert_eq!(prefilled(&settle(&mut s, 0.0)), [vec![1]]);
}

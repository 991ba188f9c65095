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
        }
    )));
}

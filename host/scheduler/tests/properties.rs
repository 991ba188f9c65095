//! Properties over random traces and clusters, for every policy: committed
//! memory never exceeds a node's capacity (checked by the simulator's own
//! account of what it executed), every request ends exactly once, every
//! instance is eventually unloaded, and the same inputs give the same results;
//! on one machine and on a cluster routed on stale state.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use slinfer_scheduler::{ClusterSim, Policy, Profile, SimSetup, TraceRequest, simulate};

fn profile() -> &'static Profile {
    static P: OnceLock<Profile> = OnceLock::new();
    P.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/profiles/slinfer-artifact-latency-ms.json");
        Profile::load(&path).expect("the shared profile")
    })
}

fn trace() -> impl Strategy<Value = Vec<TraceRequest>> {
    prop::collection::vec((0u32..6, 0.0f64..60.0, 1u64..4096, 1u64..700), 1..120).prop_map(
        |mut v| {
            v.sort_by(|a, b| a.1.total_cmp(&b.1));
            v.into_iter()
                .map(
                    |(function, arrival_s, input_tokens, output_tokens)| TraceRequest {
                        function,
                        arrival_s,
                        input_tokens,
                        output_tokens,
                    },
                )
                .collect()
        },
    )
}

/// The properties every run keeps, and that a rerun repeats it.
fn check(setup: &SimSetup, reqs: &[TraceRequest]) -> Result<(), TestCaseError> {
    let p = profile();
    let a = simulate(p, setup, reqs, 6);
    let s = &a.summary;
    prop_assert_eq!(s.memory_violations, 0);
    prop_assert_eq!(s.end_violations, 0);
    prop_assert_eq!(s.held_bytes_at_end, 0);
    prop_assert_eq!(s.completed + s.dropped, s.requests);
    for n in &s.nodes {
        prop_assert!(n.peak_committed_bytes <= n.capacity_bytes);
    }
    let b = simulate(p, setup, reqs, 6);
    prop_assert_eq!(a, b);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn no_oom_every_request_ends_once_and_runs_repeat(
        reqs in trace(),
        policy in prop::sample::select(Policy::ALL.to_vec()),
        model in prop::sample::select(vec!["llama-3.2-3b", "llama-2-7b", "llama-2-13b"]),
        gpus in 0usize..3,
        cpus in 0usize..3,
        gpu_gib in prop::sample::select(vec![20u64, 40, 78]),
        keep_kv in any::<bool>(),
    ) {
        prop_assume!(gpus + cpus > 0);
        let p = profile();
        let mut setup = SimSetup::paper(p, policy, p.model_type(model).unwrap(), gpus, cpus);
        setup.gpu_capacity_bytes = gpu_gib << 30;
        setup.scheduler.preempt_keeps_kv = keep_kv;
        check(&setup, &reqs)?;
    }

    /// A cluster routes on state up to `publish_ms` old and admits
    /// optimistically (a member that cannot place a request sends it on):
    /// each member's own scheduler still keeps its device within capacity.
    #[test]
    fn a_cluster_on_stale_state_never_overcommits_a_member(
        reqs in trace(),
        policy in prop::sample::select(Policy::ALL.to_vec()),
        model in prop::sample::select(vec!["llama-3.2-3b", "llama-2-7b", "llama-2-13b"]),
        gpus in 0usize..4,
        cpus in 0usize..3,
        gpu_gib in prop::sample::select(vec![20u64, 40, 78]),
        publish_ms in prop::sample::select(vec![10.0, 250.0, 2000.0]),
        hop_ms in prop::sample::select(vec![0.0, 1.0, 20.0]),
    ) {
        prop_assume!(gpus + cpus > 0);
        let p = profile();
        let mut setup = SimSetup::paper(p, policy, p.model_type(model).unwrap(), gpus, cpus);
        setup.gpu_capacity_bytes = gpu_gib << 30;
        setup.cluster = Some(ClusterSim {
            publish_every_s: publish_ms / 1e3,
            hop_s: hop_ms / 1e3,
        });
        check(&setup, &reqs)?;
    }
}

//! The instance runner: one thread per instance the scheduler places on a
//! device. It loads the instance on its device's engine (and calibrates the
//! cost model there), resizes its KV pool (a shrink at once, a grow just
//! before the next run, so that a burst's grows cost one reallocation),
//! runs the iterations the scheduler
//! grants (each generation samples and streams its own token), keeps the
//! sequences of ended requests as sources of copies while their blocks are
//! not needed (`held.rs`), and unloads. An engine error that means the
//! device itself failed (out of memory, a driver or kernel error) is
//! reported to the driver, which takes the device out of placement.
//!
//! Loads run one at a time in the process, each measured against what its
//! engine reports in use ([`slinfer_engine::Backend::used_bytes`]): the
//! growth, less the KV pool, is what the instance really holds, and the
//! scheduler plans with it from then on.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use slinfer_engine::{DeviceKind, EngineError, LlmInstance, LoadOptions, ModelSource, StepEntry};
use slinfer_scheduler::{
    ActionId, CostModel, InstanceId, ModelTypeId, NodeId, RequestId, RequestOutcome,
};

use crate::api::{InferenceError, RETRY_AFTER_S};
use crate::catalog::ModelEntry;
use crate::cost::{Costs, LiveCost};
use crate::devices::Device;
use crate::driver::Msg;
use crate::generation::{End, Shared, lock};
use crate::held::{HeldSequences, Source};
use crate::stats::SharedStats;

/// Sequence ids the calibration uses (request ids count up from 1).
const CALIBRATION_SEQ: u64 = u64::MAX - 8;
/// Seconds between tries to load an instance whose load failed.
const LOAD_RETRY_S: f64 = 10.0;
/// Tokens per block the first load sizes its pool with, before it learns
/// the engine's own block size and fits the grant exactly.
const LOAD_BLOCK_TOKENS: u64 = 32;

/// Most prompt tokens one engine step takes, per kind of device: a longer
/// prefill runs as several steps (chunked prefill). An engine keeps its
/// activation buffers sized for the largest step it has run, so this bounds
/// them; calibration runs one full chunk, so the load's measurement
/// includes them. `slinfer profile` times prefills in the same steps.
pub fn prefill_chunk_tokens(kind: DeviceKind) -> usize {
    match kind {
        DeviceKind::Cpu => 512,
        DeviceKind::Gpu => 2048,
    }
}

/// The next step of a chunked prefill of several prompts: at most `chunk`
/// tokens, taken from the prompts in order, so that one step finishes some
/// prompts and starts the next. `done[i]` of `lens[i]` tokens of prompt `i`
/// are computed already; they advance by what the step takes. Each entry is
/// a prompt's index and the range of its tokens the step computes; none
/// when every prompt is done. The runner prefills this way, and `slinfer`
/// times engines in the same steps.
pub fn next_prefill_step(
    lens: &[usize],
    done: &mut [usize],
    chunk: usize,
) -> Vec<(usize, Range<usize>)> {
    let mut room = chunk.max(1);
    let mut step = Vec::new();
    for (i, (&len, d)) in lens.iter().zip(done.iter_mut()).enumerate() {
        let take = len.saturating_sub(*d).min(room);
        if take == 0 {
            continue;
        }
        step.push((i, *d..*d + take));
        *d += take;
        room -= take;
        if room == 0 {
            break;
        }
    }
    step
}

/// Which prompts of one prefill begin with the same tokens as an earlier
/// one of their group (`groups[i]`: the function that asked for prompt
/// `i`, when it is computed here from its first token and may share: not
/// a choice's fork, nor an embedding's). For each prompt that shares, the
/// earlier prompt it shares with
/// (its root, which shares with none) and how many of its first tokens it
/// takes from there: one count for all the prompts of a root, the one that
/// spares the most tokens, and always short of either prompt's end, so that
/// each computes at least its own last token (and its own logits).
fn shared_prefixes(prompts: &[&[u32]], groups: &[Option<u32>]) -> Vec<Option<(usize, usize)>> {
    let mut roots: Vec<usize> = Vec::new();
    let mut best: Vec<Option<(usize, usize)>> = vec![None; prompts.len()];
    for (i, p) in prompts.iter().enumerate() {
        if groups[i].is_none() {
            continue;
        }
        let root = roots
            .iter()
            .filter(|&&r| groups[r] == groups[i])
            .map(|&r| (r, common_start(prompts[r], p)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(r, n)| (n, std::cmp::Reverse(r)));
        match root {
            Some(shared) => best[i] = Some(shared),
            None => roots.push(i),
        }
    }
    let mut out = vec![None; prompts.len()];
    for r in roots {
        let counts: Vec<usize> = best
            .iter()
            .filter_map(|b| b.filter(|&(root, _)| root == r).map(|(_, n)| n))
            .collect();
        let spared = |n: usize| n * counts.iter().filter(|&&c| c >= n).count();
        let Some(n) = counts.iter().copied().max_by_key(|&n| (spared(n), n)) else {
            continue;
        };
        for (o, b) in out.iter_mut().zip(&best) {
            if let Some((root, c)) = *b
                && root == r
                && c >= n
            {
                *o = Some((r, n));
            }
        }
    }
    out
}

/// How many first tokens `prompt` has in common with `other`, short of
/// its own end (it computes at least its own last token, and its logits).
fn same_start(prompt: &[u32], other: &[u32]) -> usize {
    let same = prompt.iter().zip(other).take_while(|(x, y)| x == y).count();
    same.min(prompt.len().saturating_sub(1))
}

/// How many first tokens two prompts have in common, short of either's end.
fn common_start(a: &[u32], b: &[u32]) -> usize {
    same_start(a, b).min(same_start(b, a))
}

/// Which prompts of one prefill start as copies of a sequence the instance
/// holds already (`held`: each one's id, group, the tokens in its KV and
/// the fewest a copy must take): for each prompt that may share
/// (`groups`, as for [`shared_prefixes`]), the held sequence of its group
/// it begins like the longest and how many tokens it takes from there,
/// short of its own end. Only
/// when no other prompt of the prefill begins as much like it: then it
/// shares within the prefill instead, which a pair of engines keeps when
/// the prefill's sequences move to its other engine (a copy of a held
/// sequence lives where that one does, and is computed again there).
fn held_starts(
    prompts: &[&[u32]],
    groups: &[Option<u32>],
    held: &[Source],
) -> Vec<Option<(RequestId, usize)>> {
    (0..prompts.len())
        .map(|i| {
            let group = groups[i]?;
            let within = (0..prompts.len())
                .filter(|&j| j != i && groups[j] == Some(group))
                .map(|j| common_start(prompts[i], prompts[j]))
                .max()
                .unwrap_or(0);
            held.iter()
                .filter(|&&(_, g, _, _)| g == group)
                .filter_map(|&(id, _, tokens, least)| {
                    let n = same_start(prompts[i], tokens);
                    (n > within && n >= least).then_some((id, n))
                })
                .max_by_key(|&(id, n)| (n, std::cmp::Reverse(id)))
        })
        .collect()
}

/// Makes `seq`, a prompt's sequence added for its prefill, a copy of the
/// first `tokens` of sequence `src` instead, and tells its generation so;
/// an engine error ends the generation with it. Whether it did.
fn start_as_copy(
    inst: &mut dyn LlmInstance,
    (src, seq, tokens): (RequestId, RequestId, usize),
    member: &Shared,
) -> bool {
    match inst
        .free_sequence(seq)
        .and_then(|()| inst.fork_sequence(src, seq, tokens))
    {
        Ok(()) => {
            lock(member).copied_start(tokens);
            true
        }
        Err(e) => {
            lock(member).end(End::Failed(InferenceError::Engine(e.to_string())));
            false
        }
    }
}

/// Hands a prompt whose prefill has ended its first token, sampled from
/// `logits`, or an embedding request its embedding.
fn first_output(
    shared: &Shared,
    logits: &[f32],
    hidden: Option<Result<Vec<f32>, InferenceError>>,
    produced: &mut HashMap<RequestId, u64>,
) {
    let mut g = lock(shared);
    if g.gone() {
        return;
    }
    match hidden {
        Some(h) => g.embedded(h),
        None => {
            g.accept(logits);
        }
    }
    produced.insert(g.id, 1);
}

/// Held through a load and its calibration, so that what the device has in
/// use grows by one instance at a time.
static LOADING: Mutex<()> = Mutex::new(());

pub(crate) enum Job {
    Load {
        action: ActionId,
        kv_bytes: u64,
    },
    Resize {
        action: ActionId,
        kv_bytes: u64,
    },
    Unload {
        action: ActionId,
    },
    Run {
        iterations: u32,
        prefill: Vec<Shared>,
        decode: Vec<Shared>,
    },
    /// Free these generations' sequences on this instance.
    Free(Vec<Shared>),
}

/// What every runner shares with the driver.
#[derive(Clone)]
pub(crate) struct Links {
    pub cost: LiveCost,
    pub to_driver: Sender<Msg>,
    pub stats: Arc<SharedStats>,
}

pub(crate) struct InstanceRunner {
    id: InstanceId,
    node: NodeId,
    device: Device,
    model: Arc<ModelEntry>,
    mtype: ModelTypeId,
    inst: Option<Box<dyn LlmInstance>>,
    load_error: Option<String>,
    /// The KV grant of the last load, and when it was tried (a failed load
    /// is retried by a later run, at most every [`LOAD_RETRY_S`]).
    kv_bytes: u64,
    last_load: Option<Instant>,
    /// A grow granted since the last run, made just before the next one:
    /// the grows of a burst arriving request by request then cost one
    /// reallocation of the pool, not one each.
    grow_to: Option<usize>,
    /// The tokens in each sequence the instance holds, and the function
    /// that asked: a later prompt of that function that begins alike starts
    /// as a copy of them; ended requests' sequences kept for that.
    held: HeldSequences,
    cost: LiveCost,
    to_driver: Sender<Msg>,
    stats: Arc<SharedStats>,
}

/// Whether an engine error means the device itself failed.
fn device_fault(e: &EngineError) -> bool {
    matches!(e, EngineError::Device(_) | EngineError::OutOfMemory { .. })
}

impl InstanceRunner {
    /// A runner for instance `id` of `model` (whose catalog index is its
    /// scheduler model type) on `device`, scheduler node `node`.
    pub fn new(
        id: InstanceId,
        node: NodeId,
        device: Device,
        (mtype, model): (ModelTypeId, Arc<ModelEntry>),
        links: Links,
    ) -> Self {
        InstanceRunner {
            id,
            node,
            mtype,
            device,
            model,
            inst: None,
            load_error: None,
            kv_bytes: 0,
            last_load: None,
            grow_to: None,
            held: HeldSequences::default(),
            cost: links.cost,
            to_driver: links.to_driver,
            stats: links.stats,
        }
    }

    pub fn serve(mut self, inbox: Receiver<Job>) {
        while let Ok(job) = inbox.recv() {
            let stop = matches!(job, Job::Unload { .. });
            self.job(job);
            self.publish();
            if stop {
                return;
            }
        }
        // The driver let go (shutdown, or the device failed): drop the instance.
        self.inst = None;
        self.held.clear();
        self.publish();
    }

    fn publish(&self) {
        self.stats.set_instance(
            self.id,
            &self.model.name,
            &self.device.name,
            self.inst.as_deref(),
            &self.held.retired(),
        );
    }

    /// Tells the driver the device failed, if `e` says so; returns whether.
    fn report(&self, e: &EngineError) -> bool {
        let fault = device_fault(e);
        if fault {
            let _ = self.to_driver.send(Msg::DeviceFailed {
                node: self.node,
                error: format!("{}: {e}", self.device.name),
            });
        }
        fault
    }

    /// Ends the generations of a failed step with the error `e` means for
    /// them, then tells the driver if the device failed (after, so that they
    /// end with this step's error rather than the driver's notice).
    fn step_failed(&self, members: &[&Shared], e: &EngineError) {
        let err = if device_fault(e) {
            InferenceError::Unavailable {
                message: format!("device {} failed: {e}", self.device.name),
                retry_after_s: RETRY_AFTER_S,
            }
        } else {
            InferenceError::Engine(e.to_string())
        };
        for g in members {
            lock(g).end(End::Failed(err.clone()));
        }
        self.report(e);
    }

    fn job(&mut self, job: Job) {
        match job {
            Job::Load { action, kv_bytes } => {
                self.load(kv_bytes);
                self.action_done(action);
            }
            Job::Resize { action, kv_bytes } => {
                if let Some(i) = self.inst.as_ref() {
                    let blocks = (kv_bytes / i.kv_bytes_per_block().max(1)) as usize;
                    if blocks > i.kv_capacity_blocks() {
                        self.grow_to = Some(blocks);
                    } else {
                        self.grow_to = None;
                        if let Err(e) = self.resize(blocks) {
                            tracing::warn!(device = %self.device.name, "resizing the KV pool: {e}");
                            self.report(&e);
                        }
                    }
                }
                self.action_done(action);
            }
            Job::Unload { action } => {
                self.inst = None;
                self.held.clear();
                self.grow_to = None;
                return_freed_memory();
                self.action_done(action);
            }
            Job::Free(gens) => {
                for g in gens {
                    let mut g = lock(&g);
                    self.free_sequence(g.id);
                    if g.kv_on == Some(self.id) {
                        g.kv_on = None;
                    }
                }
            }
            Job::Run {
                iterations,
                prefill,
                decode,
            } => {
                let started = Instant::now();
                let (outcomes, shared_tokens) = self.run(iterations, &prefill, &decode);
                let busy_s = started.elapsed().as_secs_f64();
                if tracing::enabled!(tracing::Level::DEBUG) {
                    self.log_run(started, &prefill, &decode);
                }
                let _ = self.to_driver.send(Msg::RunDone {
                    node: self.node,
                    instance: self.id,
                    outcomes,
                    busy_s,
                    shared_tokens,
                });
            }
        }
    }

    /// What a run did and how long it took (`RUST_LOG=slinfer_inference=debug`),
    /// to set beside the cost model's figures: the tokens it prefilled, the
    /// sequences it decoded and their context after it.
    fn log_run(&self, started: Instant, prefill: &[Shared], decode: &[Shared]) {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let len = |g: &Shared| {
            let id = lock(g).id;
            self.inst
                .as_deref()
                .and_then(|i| i.sequence_len(id))
                .unwrap_or(0)
        };
        tracing::debug!(
            instance = self.id,
            model = %self.model.name,
            ms,
            prefill_tokens = prefill.iter().map(len).sum::<usize>(),
            decode_batch = decode.len(),
            decode_context = decode.iter().map(len).sum::<usize>(),
            "run"
        );
    }

    /// Resizes the instance's KV pool to `blocks` (never below the blocks
    /// in use), returning freed memory to the system after a shrink.
    fn resize(&mut self, blocks: usize) -> Result<(), EngineError> {
        let Some(i) = self.inst.as_mut() else {
            return Ok(());
        };
        let started = Instant::now();
        let from = i.kv_capacity_blocks();
        self.held.shrink_to(i.as_mut(), blocks);
        let resized = i.resize_kv(blocks.max(i.kv_blocks_in_use()));
        tracing::debug!(
            instance = self.id,
            from,
            to = blocks,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "resize"
        );
        if blocks < from {
            return_freed_memory();
        }
        resized
    }

    fn action_done(&self, action: ActionId) {
        let _ = self.to_driver.send(Msg::ActionDone {
            node: self.node,
            action,
        });
    }

    fn free_sequence(&mut self, seq: RequestId) {
        self.held.free(self.inst.as_deref_mut(), seq);
    }

    /// Loads the instance with the granted KV bytes and calibrates, one load
    /// at a time; tells the driver what it measured the instance holds.
    fn load(&mut self, kv_bytes: u64) {
        let _one_at_a_time = LOADING.lock().unwrap_or_else(|e| e.into_inner());
        let backend = self.device.backend.clone();
        let before = backend.used_bytes(self.device.index);
        self.load_and_calibrate(kv_bytes);
        let after = backend.used_bytes(self.device.index);
        if let (Some(inst), Some(before), Some(after)) = (self.inst.as_deref(), before, after) {
            // The KV the engine holds now, which a pair of engines that
            // grows each one before its first step may hold less of than
            // its pool counts.
            let kv = inst.memory().kv_bytes;
            let static_bytes = after.saturating_sub(before).saturating_sub(kv);
            tracing::info!(
                model = %self.model.name,
                device = %self.device.name,
                static_bytes,
                kv_bytes = kv,
                "measured a loaded instance"
            );
            let _ = self.to_driver.send(Msg::InstanceMeasured {
                instance: self.id,
                static_bytes,
            });
        }
    }

    fn load_and_calibrate(&mut self, kv_bytes: u64) {
        self.kv_bytes = kv_bytes;
        self.grow_to = None;
        self.last_load = Some(Instant::now());
        let t = Instant::now();
        let per_token =
            self.model.footprints[self.device.kind].map_or(1, |f| f.kv_bytes_per_token.max(1));
        let opts = LoadOptions {
            initial_kv_blocks: (kv_bytes / (per_token * LOAD_BLOCK_TOKENS)) as usize,
            ..Default::default()
        };
        let source = ModelSource::Package(self.model.dir.clone());
        match self.device.backend.load(&source, self.device.index, &opts) {
            Ok(mut inst) => {
                // The engine's own block size and bytes: fit the grant.
                let blocks = (kv_bytes / inst.kv_bytes_per_block().max(1)) as usize;
                if blocks != inst.kv_capacity_blocks()
                    && let Err(e) = inst.resize_kv(blocks)
                {
                    tracing::warn!(device = %self.device.name, "resizing the KV pool after load: {e}");
                    self.report(&e);
                }
                let load_s = t.elapsed().as_secs_f64();
                self.calibrate(inst.as_mut(), load_s);
                self.inst = Some(inst);
                self.held.clear();
                self.load_error = None;
            }
            Err(e) => {
                tracing::error!(device = %self.device.name, "loading {}: {e}", self.model.name);
                self.report(&e);
                self.load_error = Some(e.to_string());
            }
        }
    }

    /// Measures prefill and decode on the fresh instance (see `cost`).
    fn calibrate(&self, inst: &mut dyn LlmInstance, load_s: f64) {
        let (mtype, kind) = (self.mtype, self.device.kind);
        if self.cost.profiled(mtype, kind) {
            // The measured profile plans this model.
            self.cost.update(mtype, kind, |c| c.load_s = load_s);
            return;
        }
        let a = CALIBRATION_SEQ;
        let b = CALIBRATION_SEQ + 1;
        let tok = self.model.package.manifest.config.bos_token_id.unwrap_or(1);
        let need = |n: usize| n.div_ceil(inst.block_size_tokens());
        let fits = |long: usize| inst.kv_capacity_blocks() >= need(long + 8) + need(16) + 2;
        let chunk = prefill_chunk_tokens(kind);
        let long = if fits(chunk) { chunk } else { 64 };
        if !fits(long) {
            self.cost.update(mtype, kind, |c| c.load_s = load_s);
            return;
        }
        let result = measure(inst, (a, b), tok, long, load_s);
        for s in [a, b] {
            if inst.sequence_len(s).is_some() {
                let _ = inst.free_sequence(s);
            }
        }
        match result {
            Some(c) => {
                tracing::info!(model = %self.model.name, device = %self.device.name, ?c, "calibrated the cost model");
                self.cost.update(mtype, kind, |x| *x = c);
            }
            None => self.cost.update(mtype, kind, |c| c.load_s = load_s),
        }
    }

    /// Runs one granted run: a prefill step over `prefill`, or up to
    /// `iterations` decode steps over `decode`. Returns each request's
    /// outcome, and the prompt tokens the prefill copied from another
    /// prompt; ended and cancelled requests' sequences are freed.
    fn run(
        &mut self,
        iterations: u32,
        prefill: &[Shared],
        decode: &[Shared],
    ) -> (Vec<RequestOutcome>, u64) {
        let mut produced: HashMap<RequestId, u64> = HashMap::new();
        if self.inst.is_none()
            && self
                .last_load
                .is_some_and(|t| t.elapsed().as_secs_f64() >= LOAD_RETRY_S)
        {
            self.load(self.kv_bytes);
        }
        if self.inst.is_none() {
            let e = InferenceError::Engine(format!(
                "model {} could not be loaded on {}: {}",
                self.model.name,
                self.device.name,
                self.load_error.as_deref().unwrap_or("unknown error")
            ));
            for g in prefill.iter().chain(decode) {
                lock(g).end(End::Failed(e.clone()));
            }
            return (self.finish_run(prefill, decode, &produced), 0);
        }
        if let Some(blocks) = self.grow_to.take()
            && let Err(e) = self.resize(blocks)
        {
            tracing::warn!(device = %self.device.name, "growing the KV pool: {e}");
            let members: Vec<&Shared> = prefill.iter().chain(decode).collect();
            self.step_failed(&members, &e);
            return (self.finish_run(prefill, decode, &produced), 0);
        }
        let shared_tokens = match prefill.is_empty() {
            true => 0,
            false => self.prefill(prefill, &mut produced),
        };
        for _ in 0..iterations.max(1) {
            if decode.is_empty() || !self.decode(decode, &mut produced) {
                break;
            }
        }
        (self.finish_run(prefill, decode, &produced), shared_tokens)
    }

    /// One step over new (or recomputed) sequences: the prompt and whatever
    /// a preempted request had generated. Returns the prompt tokens copied
    /// from another prompt rather than computed.
    fn prefill(&mut self, gens: &[Shared], produced: &mut HashMap<RequestId, u64>) -> u64 {
        let inst = self.inst.as_mut().expect("loaded");
        let mut contexts: Vec<(RequestId, Vec<u32>)> = Vec::new();
        let mut members = Vec::new();
        // Choices of one prompt prefilled together: the first computes it,
        // the others fork its KV (`forks[i]`: the member they fork).
        let mut forks: Vec<Option<usize>> = Vec::new();
        let mut firsts: HashMap<RequestId, usize> = HashMap::new();
        // Shortest first: a prompt's first token goes out when its last step
        // ends, so this order makes the prompts wait least in all, and the
        // run ends when it would in any order. The sort is stable: a fork
        // stays after the choice it forks.
        let mut gens: Vec<&Shared> = gens.iter().collect();
        gens.sort_by_key(|g| lock(g).context_len());
        for shared in gens {
            let mut g = lock(shared);
            if g.gone() {
                continue;
            }
            let id = g.id;
            self.held.free(Some(inst.as_mut()), id);
            let context = g.context();
            let leader = g
                .forks()
                .and_then(|l| firsts.get(&l).copied())
                .filter(|&j| contexts[j].1 == context);
            if leader.is_none() {
                if let Err(e) = inst.add_sequence(id) {
                    g.end(End::Failed(InferenceError::Engine(e.to_string())));
                    continue;
                }
                firsts.insert(id, contexts.len());
            }
            g.kv_on = Some(self.id);
            g.copied_start(0);
            forks.push(leader);
            contexts.push((id, context));
            members.push(shared);
        }
        if members.is_empty() {
            return 0;
        }
        let lens: Vec<usize> = contexts.iter().map(|(_, c)| c.len()).collect();
        let (cost, mtype, kind) = (&self.cost, self.mtype, self.device.kind);
        let embeds: Vec<bool> = members.iter().map(|g| lock(g).embeds()).collect();
        // A choice's fork computes nothing; an embedding neither shares nor
        // is shared with (see `shared_prefixes_that_pay`); the others share
        // with their own function's prompts.
        let mut groups: Vec<Option<u32>> = members
            .iter()
            .zip(forks.iter().zip(&embeds))
            .map(|(g, (f, &e))| (f.is_none() && !e).then(|| lock(g).owner()))
            .collect();
        let prompts: Vec<&[u32]> = contexts.iter().map(|(_, c)| c.as_slice()).collect();
        let starts = held_starts(&prompts, &groups, &self.held.sources(inst.as_ref()));
        // A fork computes nothing itself; a prompt that begins like a held
        // sequence starts as a copy of it.
        let mut done: Vec<usize> = lens
            .iter()
            .zip(&forks)
            .map(|(&l, f)| if f.is_some() { l } else { 0 })
            .collect();
        // The engine's seconds, for the cost model (not the sampling between steps).
        let mut engine_s = 0.0;
        let t = Instant::now();
        let mut copied = 0;
        for (i, s) in starts.iter().enumerate() {
            let Some((src, n)) = *s else { continue };
            groups[i] = None;
            self.held.make_room(inst.as_mut(), |_| 1);
            if start_as_copy(inst.as_mut(), (src, contexts[i].0, n), members[i]) {
                done[i] = n;
                copied += n;
            } else {
                done[i] = lens[i];
            }
        }
        // What retired sequences had to give is taken: those that would
        // slow the steps go now.
        self.held.free_costly(inst.as_mut());
        engine_s += t.elapsed().as_secs_f64();
        let computed: usize = lens.iter().zip(&done).map(|(l, d)| l - d).sum();
        let shared = shared_prefixes_that_pay(&prompts, &groups, computed, |tokens| {
            cost.prefill_s(mtype, kind, tokens as u64)
        });
        let spared: usize = shared.iter().flatten().map(|&(_, n)| n).sum();
        if spared + copied > 0 {
            tracing::debug!(
                instance = self.id,
                prompts = shared.iter().flatten().count(),
                spared_tokens = spared,
                from_running = starts.iter().flatten().count(),
                copied_tokens = copied,
                "prompts start as copies of another prompt's first tokens"
            );
        }
        let tokens = computed - spared;
        let chunk = prefill_chunk_tokens(self.device.kind);
        // First the roots' shared tokens (and the prompts that share
        // nothing), then, once the prompts that share have forked their
        // roots, the rest.
        let mut upto = lens.clone();
        for (i, s) in shared.iter().enumerate() {
            if let Some((r, n)) = *s {
                upto[i] = 0;
                upto[r] = n;
            }
        }
        let mut forked = spared == 0;
        // Steps of at most `chunk` tokens, the prompts in order. A prompt's
        // last step gives the logits it samples from, and its first token
        // goes out then: in a burst longer than one step the first prompts
        // need not wait for the last.
        loop {
            let parts = next_prefill_step(&upto, &mut done, chunk);
            if parts.is_empty() {
                if forked {
                    break;
                }
                forked = true;
                let t = Instant::now();
                for (i, s) in shared.iter().enumerate() {
                    let Some((r, n)) = *s else { continue };
                    // The root holds its first `n` tokens now: the prompt
                    // starts as a copy of them. It was added with the others
                    // all the same, so that an engine that picks where a
                    // step runs by the sequences it holds (a pair) counted
                    // it for the root's step.
                    let copy = (contexts[r].0, contexts[i].0, n);
                    self.held.make_room(inst.as_mut(), |_| 1);
                    done[i] = match start_as_copy(inst.as_mut(), copy, members[i]) {
                        true => n,
                        false => lens[i],
                    };
                }
                engine_s += t.elapsed().as_secs_f64();
                upto.clone_from(&lens);
                continue;
            }
            let batch: Vec<StepEntry> = parts
                .iter()
                .map(|(i, r)| StepEntry {
                    seq: contexts[*i].0,
                    tokens: contexts[*i].1[r.clone()].to_vec(),
                })
                .collect();
            let t = Instant::now();
            self.held
                .make_room(inst.as_mut(), |i| i.blocks_needed(&batch).unwrap_or(0));
            let logits = match inst.step(&batch) {
                Ok(logits) => logits,
                Err(e) => {
                    self.step_failed(&members, &e);
                    return (spared + copied) as u64;
                }
            };
            // (row in the step, prompt) of the prompts this step ended.
            let ended: Vec<(usize, usize)> = parts
                .iter()
                .enumerate()
                .filter(|(_, (i, _))| done[*i] == lens[*i])
                .map(|(k, (i, _))| (k, *i))
                .collect();
            // The final hidden states, when an embedding's prompt ended here.
            let rows = match ended.iter().any(|&(_, i)| embeds[i]) {
                true => Some(
                    inst.last_hidden()
                        .map_err(|e| InferenceError::Engine(e.to_string())),
                ),
                false => None,
            };
            engine_s += t.elapsed().as_secs_f64();
            for (k, i) in ended {
                let hidden = rows.as_ref().filter(|_| embeds[i]).map(|rows| match rows {
                    Ok(r) => r
                        .get(k)
                        .cloned()
                        .ok_or_else(|| InferenceError::Engine("a hidden state is missing".into())),
                    Err(e) => Err(e.clone()),
                });
                first_output(members[i], &logits[k], hidden, produced);
                for f in (0..forks.len()).filter(|&f| forks[f] == Some(i)) {
                    self.held.make_room(inst.as_mut(), |_| 1);
                    match inst.fork_sequence(contexts[i].0, contexts[f].0, lens[i]) {
                        Ok(()) => first_output(members[f], &logits[k], None, produced),
                        Err(e) => {
                            lock(members[f]).end(End::Failed(InferenceError::Engine(e.to_string())))
                        }
                    }
                }
            }
        }
        // What each sequence now holds, for later prompts that begin alike.
        for ((id, context), g) in contexts.into_iter().zip(&members) {
            if inst.sequence_len(id).is_some_and(|n| n >= context.len()) {
                self.held.insert(id, lock(g).owner(), context);
            }
        }
        self.cost
            .observe_prefill(self.mtype, self.device.kind, tokens as u64, engine_s);
        (spared + copied) as u64
    }

    /// One decode step over the live sequences; false when none is left or
    /// the step failed.
    fn decode(&mut self, gens: &[Shared], produced: &mut HashMap<RequestId, u64>) -> bool {
        let inst = self.inst.as_mut().expect("loaded");
        let mut batch = Vec::new();
        let mut members = Vec::new();
        for shared in gens {
            let g = lock(shared);
            if g.gone() {
                continue;
            }
            let Some(last) = g.last_token() else {
                continue;
            };
            batch.push(StepEntry {
                seq: g.id,
                tokens: vec![last],
            });
            members.push(shared);
        }
        if batch.is_empty() {
            return false;
        }
        self.held.free_costly(inst.as_mut());
        self.held
            .make_room(inst.as_mut(), |i| i.blocks_needed(&batch).unwrap_or(0));
        let t = Instant::now();
        match inst.step(&batch) {
            Ok(logits) => {
                self.cost.observe_decode(
                    self.mtype,
                    self.device.kind,
                    batch.len() as u64,
                    t.elapsed().as_secs_f64(),
                );
                for e in &batch {
                    self.held.fed(e.seq, e.tokens[0]);
                }
                for (g, l) in members.into_iter().zip(logits) {
                    let mut g = lock(g);
                    g.accept(&l);
                    *produced.entry(g.id).or_insert(0) += 1;
                }
                true
            }
            Err(e) => {
                self.step_failed(&members, &e);
                false
            }
        }
    }

    /// Frees the sequences of ended and cancelled requests and builds the
    /// outcomes.
    fn finish_run(
        &mut self,
        prefill: &[Shared],
        decode: &[Shared],
        produced: &HashMap<RequestId, u64>,
    ) -> Vec<RequestOutcome> {
        let mut outcomes = Vec::new();
        for g in prefill.iter().chain(decode) {
            let mut g = lock(g);
            let gone = g.gone();
            if gone {
                self.held.retire(self.inst.as_deref_mut(), g.id);
                if g.kv_on == Some(self.id) {
                    g.kv_on = None;
                }
            }
            outcomes.push(RequestOutcome {
                request: g.id,
                tokens: produced.get(&g.id).copied().unwrap_or(0),
                finished: gone,
            });
        }
        outcomes
    }
}

/// The prompts of a prefill that start as copies of an earlier one's first
/// tokens ([`shared_prefixes`]), when `cost` (seconds to prefill so many
/// tokens in one step) says the step this adds costs less than the tokens
/// it spares; none otherwise. `groups[i]`: the function that asked for
/// prompt `i`, when it is computed here from its first token (not a
/// choice's fork, nor a copy of a held sequence's start) and is not an
/// embedding's, which neither shares nor is shared with (a prompt computed
/// in two steps attends to its first tokens' KV as the cache stores it,
/// and an embedding must not depend on its batch). `computed`: the tokens
/// the prefill computes without this.
fn shared_prefixes_that_pay(
    prompts: &[&[u32]],
    groups: &[Option<u32>],
    computed: usize,
    cost: impl Fn(usize) -> f64,
) -> Vec<Option<(usize, usize)>> {
    let shared = shared_prefixes(prompts, groups);
    let spared: usize = shared.iter().flatten().map(|&(_, n)| n).sum();
    // The first step: the roots' shared tokens and the prompts that share
    // nothing; the second, what is left.
    let mut first = computed;
    for (i, s) in shared.iter().enumerate() {
        if let Some((r, n)) = *s {
            first -= prompts[i].len();
            if !shared[..i].iter().flatten().any(|&(root, _)| root == r) {
                first -= prompts[r].len() - n;
            }
        }
    }
    if spared > 0 && cost(first) + cost(computed - spared - first) < cost(computed) {
        shared
    } else {
        vec![None; prompts.len()]
    }
}

fn timed(inst: &mut dyn LlmInstance, batch: &[StepEntry]) -> Option<f64> {
    let t = Instant::now();
    inst.step(batch).ok()?;
    Some(t.elapsed().as_secs_f64())
}

/// The calibration steps on sequences `a` and `b` (see `cost`).
fn measure(
    inst: &mut dyn LlmInstance,
    (a, b): (u64, u64),
    tok: u32,
    long: usize,
    load_s: f64,
) -> Option<Costs> {
    let entry = |seq, n| StepEntry {
        seq,
        tokens: vec![tok; n],
    };
    inst.add_sequence(a).ok()?;
    inst.add_sequence(b).ok()?;
    // Warm-up (the first inference is slow), then measure.
    timed(inst, &[entry(a, 8)])?;
    inst.free_sequence(a).ok()?;
    inst.add_sequence(a).ok()?;
    let p8 = timed(inst, &[entry(a, 8)])?;
    let p_long = timed(inst, &[entry(b, long)])?;
    let mut d1 = f64::INFINITY;
    let mut d2 = f64::INFINITY;
    for _ in 0..3 {
        d1 = d1.min(timed(inst, &[entry(a, 1)])?);
        d2 = d2.min(timed(inst, &[entry(a, 1), entry(b, 1)])?);
    }
    let per_token = ((p_long - p8) / (long - 8) as f64).max(1e-5);
    let per_seq = (d2 - d1).max(1e-4);
    Some(Costs {
        prefill_base_s: (p8 - 8.0 * per_token).max(1e-3),
        prefill_per_token_s: per_token,
        decode_base_s: (d1 - per_seq).max(1e-3),
        decode_per_seq_s: per_seq,
        load_s,
        prefill_factor: 1.0,
        decode_factor: 1.0,
    })
}

/// Hands the heap's free pages back to the system after an instance or
/// part of its KV pool is freed: glibc keeps large freed blocks in its
/// arenas, and the process would go on holding memory that the scheduler
/// no longer counts (measured: 400 MB after one burst of 60 streams).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::{held_starts, next_prefill_step, shared_prefixes, shared_prefixes_that_pay};

    #[test]
    fn prompts_that_begin_alike_share_with_the_first_of_them() {
        let a: &[u32] = &[1, 2, 3, 4, 5, 6];
        let b: &[u32] = &[1, 2, 3, 4, 5, 7, 8];
        let c: &[u32] = &[9, 9, 9];
        let d: &[u32] = &[1, 2, 3, 4, 5, 9];
        assert_eq!(
            shared_prefixes(&[a, b, c, d], &[Some(0); 4]),
            vec![None, Some((0, 5)), None, Some((0, 5))]
        );
        // A prompt that is not computed here (a choice's fork) neither
        // shares nor is shared with.
        assert_eq!(
            shared_prefixes(&[a, b, d], &[None, Some(0), Some(0)]),
            vec![None, None, Some((1, 5))]
        );
        // Only with prompts of the same function.
        assert_eq!(
            shared_prefixes(&[a, b, d], &[Some(0), Some(1), Some(0)]),
            vec![None, None, Some((0, 5))]
        );
        // The same prompt twice, or one the start of another: each still
        // computes its own last token.
        assert_eq!(
            shared_prefixes(&[a, a], &[Some(0); 2]),
            vec![None, Some((0, 5))]
        );
        let ab: &[u32] = &[1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            shared_prefixes(&[a, ab], &[Some(0); 2]),
            vec![None, Some((0, 5))]
        );
        // Nothing in common, or nothing to share.
        let empty: &[u32] = &[];
        assert_eq!(shared_prefixes(&[a, c], &[Some(0); 2]), vec![None, None]);
        assert_eq!(
            shared_prefixes(&[empty, a], &[Some(0); 2]),
            vec![None, None]
        );
    }

    #[test]
    fn a_root_shares_the_count_that_spares_the_most_tokens() {
        let root: Vec<u32> = (1..=10).collect();
        let long: Vec<u32> = (1..=8).chain([99, 99]).collect();
        let short: Vec<Vec<u32>> = (0..3).map(|k| vec![1, 2, 3, 50 + k, 7]).collect();
        let prompts: Vec<&[u32]> = [&root, &long, &short[0], &short[1], &short[2]]
            .into_iter()
            .map(Vec::as_slice)
            .collect();
        // 8 tokens for one prompt spare 8; 3 for all four spare 12.
        assert_eq!(
            shared_prefixes(&prompts, &[Some(0); 5]),
            vec![None, Some((0, 3)), Some((0, 3)), Some((0, 3)), Some((0, 3))]
        );
        // The long one and two short: 8 for one spares 8, 3 for three 9.
        assert_eq!(
            shared_prefixes(&prompts[..4], &[Some(0); 4]),
            vec![None, Some((0, 3)), Some((0, 3)), Some((0, 3))]
        );
        // The long one and one short: 8 for one spares 8, 3 for two 6.
        assert_eq!(
            shared_prefixes(&prompts[..3], &[Some(0); 3]),
            vec![None, Some((0, 8)), None]
        );
    }

    #[test]
    fn prompts_share_only_when_the_step_it_adds_costs_less_than_it_spares() {
        let prompt = |last: u32| (0..40).chain([last]).collect::<Vec<u32>>();
        let contexts = [prompt(1), prompt(2), prompt(3)];
        let prompts: Vec<&[u32]> = contexts.iter().map(Vec::as_slice).collect();
        // 80 tokens spared at 1 ms each against a 20 ms step: shared.
        let cheap_tokens = |n: usize| 0.020 + 0.001 * n as f64;
        assert_eq!(
            shared_prefixes_that_pay(&prompts, &[Some(0); 3], 123, cheap_tokens),
            vec![None, Some((0, 40)), Some((0, 40))]
        );
        // A step that costs more than 80 tokens: not shared.
        let dear_steps = |n: usize| 0.100 + 0.001 * n as f64;
        assert_eq!(
            shared_prefixes_that_pay(&prompts, &[Some(0); 3], 123, dear_steps),
            vec![None; 3]
        );
        // Prompts not computed here from their first token (choices'
        // forks, copies of a held sequence) and embeddings neither share
        // nor are shared with.
        assert_eq!(
            shared_prefixes_that_pay(&prompts, &[Some(0), None, None], 41, cheap_tokens),
            vec![None; 3]
        );
        assert_eq!(
            shared_prefixes_that_pay(&prompts, &[None, Some(0), Some(0)], 82, cheap_tokens),
            vec![None, None, Some((1, 40))]
        );
    }

    #[test]
    fn prompts_start_as_copies_of_the_held_sequence_they_begin_like_the_most() {
        let held_a: Vec<u32> = (1..=10).collect();
        let held_b: Vec<u32> = (1..=4).chain([70, 71]).collect();
        let held = [(7, 0, held_a.as_slice(), 1), (3, 0, held_b.as_slice(), 1)];
        let like_a: Vec<u32> = (1..=8).chain([99]).collect();
        let like_b: Vec<u32> = (1..=4).chain([70, 71, 72]).collect();
        let unlike: Vec<u32> = vec![50, 51];
        let prompts: Vec<&[u32]> = [&like_a, &like_b, &unlike]
            .into_iter()
            .map(Vec::as_slice)
            .collect();
        // Each from the one it begins like the most.
        assert_eq!(
            held_starts(&prompts, &[Some(0); 3], &held),
            vec![Some((7, 8)), Some((3, 6)), None]
        );
        // A prompt equal to a held one still computes its last token.
        assert_eq!(
            held_starts(&[&held_a], &[Some(0)], &held),
            vec![Some((7, 9))]
        );
        // Ties go to the earlier request.
        let twice = [(7, 0, held_a.as_slice(), 1), (5, 0, held_a.as_slice(), 1)];
        assert_eq!(
            held_starts(&prompts[..1], &[Some(0)], &twice),
            vec![Some((5, 8))]
        );
        // Not a prompt that may not share (a choice's fork, an embedding's).
        assert_eq!(
            held_starts(&prompts, &[None, Some(0), Some(0)], &held),
            vec![None, Some((3, 6)), None]
        );
        // Not when another prompt of the prefill begins as much like it:
        // those share within the prefill.
        let long_a: Vec<u32> = (1..=8).chain([99, 100, 101]).collect();
        let short_b: Vec<u32> = (1..=4).chain([70, 80]).collect();
        assert_eq!(
            held_starts(&[&long_a, &like_a, &short_b], &[Some(0); 3], &held),
            vec![None, None, Some((3, 5))]
        );
        assert!(
            held_starts(&prompts, &[Some(0); 3], &[])
                .iter()
                .all(Option::is_none)
        );
        // Only within a function: neither a held sequence nor a prompt of
        // another counts.
        assert_eq!(held_starts(&prompts[..1], &[Some(1)], &held), vec![None]);
        assert_eq!(
            held_starts(&[&long_a, &like_a], &[Some(0), Some(1)], &held),
            vec![Some((7, 8)), None]
        );
        // A retired sequence (prefilled with its first 6 tokens, then 4
        // decoded): only for a prompt that begins with all of its prompt
        // and goes on, not the same prompt again.
        let retired = [(9, 0, held_a.as_slice(), 6)];
        let again: Vec<u32> = (1..=6).collect();
        let next: Vec<u32> = (1..=12).collect();
        assert_eq!(
            held_starts(&[&again, &next], &[Some(0); 2], &retired),
            vec![None, Some((9, 10))]
        );
    }

    #[test]
    fn a_chunked_prefill_fills_each_step_with_the_prompts_in_order() {
        // The third prompt is a fork (computed already), the fourth empty.
        let lens = [300, 400, 50, 0, 100];
        let mut done = [0, 0, 50, 0, 0];
        assert_eq!(
            next_prefill_step(&lens, &mut done, 512),
            vec![(0, 0..300), (1, 0..212)]
        );
        assert_eq!(
            next_prefill_step(&lens, &mut done, 512),
            vec![(1, 212..400), (4, 0..100)]
        );
        assert!(next_prefill_step(&lens, &mut done, 512).is_empty());
        assert_eq!(done, [300, 400, 50, 0, 100]);
    }

    #[test]
    fn a_prompt_longer_than_a_chunk_takes_several_steps() {
        let mut done = [0];
        let steps: Vec<_> = std::iter::from_fn(|| {
            Some(next_prefill_step(&[1100], &mut done, 512)).filter(|s| !s.is_empty())
        })
        .collect();
        assert_eq!(
            steps,
            vec![
                vec![(0, 0..512)],
                vec![(0, 512..1024)],
                vec![(0, 1024..1100)]
            ]
        );
        // A chunk of nothing still advances, one token a step.
        assert_eq!(next_prefill_step(&[3], &mut [0], 0), vec![(0, 0..1)]);
    }
}

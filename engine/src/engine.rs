//! The engine: a step loop on its own thread that admits requests, asks the scheduler for a
//! plan, runs it on the model runner, samples, detokenizes, applies stops and streams each
//! request's output over its own channel. Callers submit and abort through [`Engine`];
//! they never touch the scheduler or the model directly.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use moe_models::RoutingTrace;

use crate::constraint::{ConstraintStep, TokenConstraint, TokenMask};
use crate::detokenizer::IncrementalDetokenizer;
use crate::error::{EngineError, Result};
use crate::expert_load::ExpertLoad;
use crate::runner::{ModelRunner, StepRow};
use crate::sampling::{Sampler, SamplingParams};
pub use crate::scheduler::FinishReason;
use crate::scheduler::{NewRequest, RequestId, SampledToken, Scheduler, SchedulerConfig};
use crate::stop::StopStrings;
use crate::tokenizer::TextTokenizer;

/// Limits of the batching loop (vLLM's flag names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Tokens computed per step at most (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Sequences per step at most (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Prompt + output tokens per request at most (`--max-model-len`).
    pub max_model_len: usize,
    /// Reuse cached KV blocks of equal prompt prefixes (on unless `--no-prefix-caching`).
    pub enable_prefix_caching: bool,
}

/// One generation request as the engine takes it.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt_token_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Extra token ids that end generation (EOS ids are added unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; matched on the detokenized text and not returned.
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// A grammar the output must match (see [`crate::constraint`]); `None`: free.
    pub constraint: Option<TokenConstraint>,
}

/// Log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The most likely alternatives, descending.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// One streamed piece of a request's output. The last one has `finish_reason` set.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub id: RequestId,
    /// Tokens generated since the previous piece.
    pub token_ids: Vec<u32>,
    /// Text generated since the previous piece (empty without a tokenizer).
    pub text: String,
    /// One entry per token in `token_ids` when logprobs were requested.
    pub logprobs: Vec<TokenLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// On the final piece of a request a stop string ended: that stop string.
    pub stop_string: Option<String>,
    pub usage: Usage,
}

/// A submitted request's output stream, readable from plain threads ([`next`](Self::next))
/// and from async tasks ([`recv`](Self::recv)) alike; dropping it aborts the request.
pub struct RequestStream {
    pub id: RequestId,
    receiver: UnboundedReceiver<RequestOutput>,
}

impl RequestStream {
    /// The next piece, blocking the thread; `None` once the request finished or was
    /// aborted. Not for async tasks (it would block the runtime; it panics inside one):
    /// use [`recv`](Self::recv) there.
    #[allow(clippy::should_implement_trait)] // an Iterator would hide that it blocks
    pub fn next(&mut self) -> Option<RequestOutput> {
        self.receiver.blocking_recv()
    }

    /// The next piece, awaited; `None` once the request finished or was aborted.
    pub async fn recv(&mut self) -> Option<RequestOutput> {
        self.receiver.recv().await
    }

    /// Collects the whole output: all tokens, all text, the finish reason and usage.
    pub fn collect(mut self) -> Option<RequestOutput> {
        let mut all: Option<RequestOutput> = None;
        while let Some(piece) = self.next() {
            match &mut all {
                None => all = Some(piece),
                Some(a) => {
                    a.token_ids.extend(piece.token_ids);
                    a.text.push_str(&piece.text);
                    a.logprobs.extend(piece.logprobs);
                    a.finish_reason = piece.finish_reason;
                    a.usage = piece.usage;
                }
            }
        }
        all.filter(|a| a.finish_reason.is_some())
    }
}

/// Counters and gauges of the engine, refreshed every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub preemptions: u64,
    pub steps: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Blocks no request holds that still keep a cached prefix (evicted when space is
    /// needed). Plain free blocks are `blocks_total - blocks_used - blocks_cached`.
    pub blocks_cached: usize,
    /// Prompt tokens looked up in the prefix cache at admission.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached (not computed again).
    pub prefix_cache_hits: u64,
}

enum Command {
    Submit(NewRequest, Box<Live>),
    Abort(RequestId),
    Shutdown,
}

/// Per-request state the loop keeps beside the scheduler's.
struct Live {
    sender: UnboundedSender<RequestOutput>,
    sampler: Sampler,
    detokenizer: Option<IncrementalDetokenizer>,
    stops: StopStrings,
    constraint: Option<TokenConstraint>,
    generated: Vec<u32>,
    prompt_tokens: usize,
    /// A stop string ended the output: nothing after it may be emitted.
    stopped_by_string: bool,
}

/// Handle to the engine thread. Dropping it shuts the engine down.
pub struct Engine {
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    next_id: AtomicU64,
    stats: Arc<Mutex<EngineStats>>,
    /// Submitted requests the loop has not taken in yet (counted as waiting).
    pending: Arc<AtomicUsize>,
    config: EngineConfig,
    vocab_size: usize,
    eos_ids: Vec<u32>,
    /// Streams carry text (the engine was given a tokenizer).
    has_tokenizer: bool,
    /// Expert-load counters, `Some` once [`Engine::enable_expert_load_stats`] was called.
    expert_load: Arc<Mutex<Option<ExpertLoad>>>,
    num_routed_experts: usize,
    /// Set when the device failed its check after a failed step; the loop has then stopped.
    device_failure: Arc<Mutex<Option<String>>>,
}

impl Engine {
    /// Starts the step loop on its own thread.
    pub fn start(runner: ModelRunner, tokenizer: Option<Arc<TextTokenizer>>, config: EngineConfig) -> Result<Self> {
        let model_config = runner.model().config();
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_batched_tokens: config.max_num_batched_tokens,
            max_num_seqs: config.max_num_seqs,
            max_model_len: config.max_model_len,
            block_size: runner.block_size(),
            num_blocks: runner.num_blocks(),
            enable_prefix_caching: config.enable_prefix_caching,
        })
        .map_err(|e| EngineError::InvalidRequest(format!("engine limits: {e}")))?;
        let vocab_size = model_config.vocab_size;
        let mut eos_ids = model_config.eos_token_ids.clone();
        if let Some(t) = &tokenizer {
            eos_ids.extend(
                t.eos_ids()
                    .iter()
                    .copied()
                    .filter(|id| !model_config.eos_token_ids.contains(id)),
            );
        }
        let has_tokenizer = tokenizer.is_some();
        let num_routed_experts = model_config.moe.as_ref().map_or(0, |m| m.n_routed_experts);
        let expert_load = Arc::new(Mutex::new(None));
        let loop_expert_load = expert_load.clone();
        let device_failure = Arc::new(Mutex::new(None));
        let loop_device_failure = device_failure.clone();
        let stats = Arc::new(Mutex::new(EngineStats {
            blocks_total: runner.num_blocks(),
            ..Default::default()
        }));
        let (commands, inbox) = mpsc::channel();
        let loop_stats = stats.clone();
        let pending = Arc::new(AtomicUsize::new(0));
        let loop_pending = pending.clone();
        let thread = std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || {
                let mut l = StepLoop {
                    runner,
                    scheduler,
                    tokenizer,
                    live: HashMap::new(),
                    stats: loop_stats,
                    pending: loop_pending,
                    totals: EngineStats::default(),
                    expert_load: loop_expert_load,
                    in_step: Vec::new(),
                    device_failure: loop_device_failure,
                };
                l.run(inbox)
            })
            .map_err(|e| EngineError::InvalidRequest(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            commands,
            thread: Some(thread),
            next_id: AtomicU64::new(1),
            stats,
            pending,
            config,
            vocab_size,
            eos_ids,
            has_tokenizer,
            expert_load,
            num_routed_experts,
            device_failure,
        })
    }

    /// Why the device failed, once it has (the engine has then stopped: every request in
    /// flight was failed and new ones are refused with [`EngineError::DeviceFailed`]).
    pub fn device_failure(&self) -> Option<String> {
        self.device_failure.lock().ok().and_then(|f| f.clone())
    }

    /// Starts (or restarts from zero) counting the tokens each MoE layer routes to each
    /// expert. Off by default: tracing costs a copy of every step's expert ids.
    pub fn enable_expert_load_stats(&self) {
        if let Ok(mut l) = self.expert_load.lock() {
            *l = Some(ExpertLoad::new(self.num_routed_experts));
        }
    }

    /// The expert-load counts since [`Engine::enable_expert_load_stats`]; `None` when off.
    pub fn expert_load(&self) -> Option<ExpertLoad> {
        self.expert_load.lock().ok().and_then(|l| l.clone())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The token ids that end a sequence (the model's, then the tokenizer's).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Validates and enqueues a request; its output arrives on the returned stream.
    pub fn submit(&self, request: GenerationRequest) -> Result<RequestStream> {
        if let Some(failure) = self.device_failure() {
            return Err(EngineError::DeviceFailed(failure));
        }
        let prompt_len = request.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = request
            .prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        if request.max_tokens == 0 {
            return Err(EngineError::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if prompt_len + request.max_tokens > self.config.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "prompt ({prompt_len} tokens) + max_tokens ({}) exceeds the maximum model length ({})",
                request.max_tokens, self.config.max_model_len
            )));
        }
        let sampler = Sampler::new(request.sampling.clone())?;
        let stops = StopStrings::new(request.stop.clone())?;
        let mut stop_token_ids = request.stop_token_ids.clone();
        if !request.ignore_eos {
            stop_token_ids.extend(self.eos_ids.iter().copied());
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        // Unbounded: the engine thread must never wait on a slow client. A client that stops
        // reading is still bounded by its max_tokens.
        let (sender, receiver) = unbounded_channel();
        let live = Live {
            sender,
            sampler,
            detokenizer: self.has_tokenizer.then(IncrementalDetokenizer::new),
            stops,
            constraint: request.constraint,
            generated: Vec::new(),
            prompt_tokens: prompt_len,
            stopped_by_string: false,
        };
        let new = NewRequest {
            id,
            prompt_token_ids: request.prompt_token_ids,
            max_tokens: request.max_tokens,
            stop_token_ids,
        };
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.commands.send(Command::Submit(new, Box::new(live))).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(RequestStream { id, receiver })
    }

    /// Aborts a request: its blocks are freed at the next loop iteration and its stream ends.
    pub fn abort(&self, id: RequestId) {
        let _ = self.commands.send(Command::Abort(id));
    }

    /// Current gauges and totals; `waiting` includes requests submitted but not yet taken in.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.lock().map(|s| *s).unwrap_or_default();
        s.waiting += self.pending.load(Ordering::SeqCst);
        s
    }

    /// Stops the loop (requests in flight are dropped) and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Samples under a grammar: forbidden tokens are masked first, and the output
/// ends (`finish`) once the grammar is complete. A grammar that fails mid-way
/// (it exhausted llguidance's limits) ends only its own request.
fn constrained_sample(
    constraint: &mut TokenConstraint,
    mask: Result<TokenMask>,
    sampler: &Sampler,
    logits: &mut [f32],
    generated: &[u32],
    step: usize,
    finish: &mut Option<FinishReason>,
) -> crate::sampling::SampledToken {
    let end = |finish: &mut Option<FinishReason>, token: u32| {
        *finish = Some(FinishReason::Stop);
        crate::sampling::SampledToken {
            token,
            logprob: None,
            top_logprobs: Vec::new(),
        }
    };
    match mask.map(|m| m.apply(logits)) {
        Ok(ConstraintStep::Sample) => {}
        Ok(ConstraintStep::Finished) => return end(finish, constraint.eos_token()),
        Err(e) => {
            tracing::warn!("{e}; ending the request");
            return end(finish, constraint.eos_token());
        }
    }
    let token = sampler.sample(logits, generated, step);
    match constraint.accept(token.token) {
        Ok(false) => {}
        Ok(true) => *finish = Some(FinishReason::Stop),
        Err(e) => {
            tracing::warn!("{e}; ending the request");
            *finish = Some(FinishReason::Stop);
        }
    }
    token
}

struct StepLoop {
    runner: ModelRunner,
    scheduler: Scheduler,
    tokenizer: Option<Arc<TextTokenizer>>,
    live: HashMap<RequestId, Box<Live>>,
    stats: Arc<Mutex<EngineStats>>,
    pending: Arc<AtomicUsize>,
    totals: EngineStats,
    expert_load: Arc<Mutex<Option<ExpertLoad>>>,
    /// The requests of the step being computed (empty between steps).
    in_step: Vec<RequestId>,
    device_failure: Arc<Mutex<Option<String>>>,
}

impl StepLoop {
    fn run(&mut self, inbox: Receiver<Command>) {
        loop {
            // Block while idle; otherwise take what has arrived and step.
            let first = if self.scheduler.has_unfinished_requests() {
                inbox.try_recv().ok()
            } else {
                match inbox.recv_timeout(Duration::from_millis(100)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut pending: Vec<Command> = first.into_iter().collect();
            pending.extend(inbox.try_iter());
            for c in pending {
                match c {
                    Command::Submit(new, live) => {
                        let id = new.id;
                        self.pending.fetch_sub(1, Ordering::SeqCst);
                        match self.scheduler.add_request(new) {
                            Ok(()) => {
                                self.live.insert(id, live);
                            }
                            Err(e) => tracing::warn!("request {id:?} rejected: {e}"),
                        }
                    }
                    Command::Abort(id) => self.abort(id),
                    Command::Shutdown => return,
                }
            }
            if self.scheduler.has_unfinished_requests() {
                if let Err(e) = self.step() {
                    if self.fail_step(&e) {
                        return;
                    }
                }
            }
            self.publish_stats();
        }
    }

    fn abort(&mut self, id: RequestId) {
        let _ = self.scheduler.abort(id);
        self.live.remove(&id);
    }

    /// After a failed step: its requests cannot be retried safely (their caches may hold part
    /// of it), so they end without a finish reason (the server answers 500); requests that were
    /// not in the step go on (all fail when the scheduler itself failed, before a step formed). Then the device is checked: if it failed too (a sticky CUDA
    /// error), every request is failed, the failure is recorded and `true` says the loop must
    /// stop. Nothing the failed step computed reaches the prefix cache (blocks are registered
    /// only by a completed step).
    fn fail_step(&mut self, e: &EngineError) -> bool {
        let failed = std::mem::take(&mut self.in_step);
        if failed.is_empty() {
            // The step never formed (the scheduler itself failed): its state cannot be
            // trusted, and retrying would fail the same way, so every request is failed.
            tracing::error!("engine step failed before it formed: {e}; failing every request");
            let ids: Vec<RequestId> = self.live.keys().copied().collect();
            for id in ids {
                self.abort(id);
            }
        } else {
            tracing::error!("engine step failed: {e}; failing its {} requests", failed.len());
        }
        for id in failed {
            self.abort(id);
        }
        let Err(device) = self.runner.model().check_device() else {
            return false;
        };
        tracing::error!("the device failed its check after the failed step ({device}); stopping the engine");
        if let Ok(mut f) = self.device_failure.lock() {
            *f = Some(device.to_string());
        }
        let ids: Vec<RequestId> = self.live.keys().copied().collect();
        for id in ids {
            self.abort(id);
        }
        self.publish_stats();
        true
    }

    fn step(&mut self) -> Result<()> {
        let plan = self
            .scheduler
            .schedule()
            .map_err(|e| EngineError::InvalidRequest(format!("scheduler: {e}")))?;
        self.in_step = plan.scheduled.iter().map(|r| r.id).collect();
        if plan.scheduled.is_empty() {
            return Ok(());
        }
        self.totals.steps += 1;
        let counting = self.expert_load.lock().is_ok_and(|l| l.is_some());
        let trace = counting.then(RoutingTrace::default);
        // Grammar masks depend only on tokens already accepted: they are computed on a
        // second thread while the forward pass runs, and only when a constrained request
        // samples this step.
        let constrained: Vec<RequestId> = plan
            .scheduled
            .iter()
            .filter(|r| r.needs_sample && self.live.get(&r.id).is_some_and(|l| l.constraint.is_some()))
            .map(|r| r.id)
            .collect();
        // Greedy requests without logprobs, penalties or grammar get their token picked where
        // the logits are (only ids leave a GPU).
        let greedy: HashSet<RequestId> = plan
            .scheduled
            .iter()
            .filter(|r| r.needs_sample)
            .filter(|r| {
                self.live
                    .get(&r.id)
                    .is_some_and(|l| l.constraint.is_none() && l.sampler.is_plain_greedy(&l.generated))
            })
            .map(|r| r.id)
            .collect();
        let (logits, mut masks) = if constrained.is_empty() {
            (self.runner.execute(&plan, &greedy, trace.as_ref())?, HashMap::new())
        } else {
            let (runner, live) = (&self.runner, &mut self.live);
            let (logits, masks) = std::thread::scope(|s| {
                let masking = s.spawn(move || {
                    let mut masks = HashMap::new();
                    for id in constrained {
                        if let Some(c) = live.get_mut(&id).and_then(|l| l.constraint.as_mut()) {
                            masks.insert(id, c.compute_mask());
                        }
                    }
                    masks
                });
                let logits = runner.execute(&plan, &greedy, trace.as_ref());
                (logits, masking.join())
            });
            let masks = masks.map_err(|_| EngineError::InvalidRequest("the grammar thread panicked".into()))?;
            (logits?, masks)
        };
        if let (Some(trace), Ok(mut load)) = (trace, self.expert_load.lock()) {
            if let Some(load) = load.as_mut() {
                for (layer, ids) in trace.take() {
                    load.record(layer, &ids);
                }
            }
        }
        let mut sampled = Vec::with_capacity(logits.len());
        let mut disconnected = Vec::new();
        for (id, row) in logits {
            let Some(live) = self.live.get_mut(&id) else { continue };
            let step = live.generated.len();
            let mut finish = None;
            let token = match row {
                // The argmax the sampler would have taken of the same row.
                StepRow::Greedy(token) => crate::sampling::SampledToken {
                    token,
                    logprob: None,
                    top_logprobs: Vec::new(),
                },
                StepRow::Logits(mut row) => match live.constraint.as_mut() {
                    None => live.sampler.sample(&row, &live.generated, step),
                    Some(c) => {
                        let mask = masks.remove(&id).unwrap_or_else(|| c.compute_mask());
                        constrained_sample(c, mask, &live.sampler, &mut row, &live.generated, step, &mut finish)
                    }
                },
            };
            live.generated.push(token.token);
            let mut text = String::new();
            if let (Some(d), Some(t)) = (live.detokenizer.as_mut(), self.tokenizer.as_deref()) {
                let delta = d.push(t, token.token)?;
                let check = live.stops.push(&delta);
                text = check.emit;
                if check.stopped {
                    live.stopped_by_string = true;
                    finish = Some(FinishReason::Stop);
                }
            }
            let logprobs = token
                .logprob
                .map(|lp| TokenLogprobs {
                    token: token.token,
                    logprob: lp,
                    top: token.top_logprobs.clone(),
                })
                .into_iter()
                .collect();
            let piece = RequestOutput {
                id,
                token_ids: vec![token.token],
                text,
                logprobs,
                finish_reason: None,
                stop_string: None,
                usage: Usage {
                    prompt_tokens: live.prompt_tokens,
                    completion_tokens: live.generated.len(),
                },
            };
            if live.sender.send(piece).is_err() {
                disconnected.push(id);
            }
            sampled.push(SampledToken {
                id,
                token_id: token.token,
                finish,
            });
        }
        self.totals.generation_tokens += sampled.len() as u64;
        self.totals.prompt_tokens += plan
            .first_scheduled
            .iter()
            .filter_map(|id| self.scheduler.request(*id))
            .map(|r| r.num_prompt_tokens() as u64)
            .sum::<u64>();
        let finished = self
            .scheduler
            .update(&sampled)
            .map_err(|e| EngineError::InvalidRequest(format!("scheduler: {e}")))?;
        // The step is complete: an error past here (the detokenizer's) is not the step's.
        self.in_step.clear();
        // Blocks of finished requests are free now: publish before telling their clients.
        self.publish_stats();
        for f in finished {
            let Some(mut live) = self.live.remove(&f.id) else {
                continue;
            };
            let mut text = String::new();
            if !live.stopped_by_string {
                if let (Some(d), Some(t)) = (live.detokenizer.as_mut(), self.tokenizer.as_deref()) {
                    let tail = d.finish(t)?;
                    text = live.stops.push(&tail).emit;
                }
                text.push_str(&live.stops.flush());
            }
            let _ = live.sender.send(RequestOutput {
                id: f.id,
                token_ids: vec![],
                text,
                logprobs: vec![],
                finish_reason: Some(f.reason),
                stop_string: live.stops.matched().map(str::to_string),
                usage: Usage {
                    prompt_tokens: live.prompt_tokens,
                    completion_tokens: live.generated.len(),
                },
            });
        }
        for id in disconnected {
            self.abort(id);
        }
        self.in_step.clear();
        Ok(())
    }

    fn publish_stats(&mut self) {
        if let Ok(mut s) = self.stats.lock() {
            *s = EngineStats {
                running: self.scheduler.num_running(),
                waiting: self.scheduler.num_waiting(),
                blocks_total: self.scheduler.num_blocks(),
                blocks_used: self.scheduler.num_used_blocks(),
                blocks_cached: self.scheduler.num_cached_blocks(),
                preemptions: self.scheduler.num_preemptions(),
                prefix_cache_queries: self.scheduler.prefix_cache_stats().queried_tokens,
                prefix_cache_hits: self.scheduler.prefix_cache_stats().hit_tokens,
                ..self.totals
            };
        }
    }
}

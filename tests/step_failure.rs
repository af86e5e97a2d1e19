//! A failed step on the V3 fixture, with a model wrapper that fails the forwards it is told
//! to (as a CUDA launch error would): the requests of that step end without a finish reason
//! (the server answers them 500), the requests that were not in it finish with exactly the
//! tokens they get on a healthy engine, nothing the failed step wrote reaches the prefix
//! cache, and the engine keeps serving. When the device then fails its check as well (a
//! sticky error), every request is failed, new ones are refused and the failure is reported.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moe_engine::engine::{Engine, EngineConfig, GenerationRequest};
use moe_engine::runner::ModelRunner;
use moe_engine::EngineError;
use moe_models::{CausalLm, ForwardCtx, KvCache, LoadOptions, Model, ModelConfig, ModelError};
use moe_tests::{fixture, load_model};

/// What the test arms: fail the next forward; fail the device check after it.
#[derive(Default)]
struct Faults {
    fail_next_forward: AtomicBool,
    device_lost: AtomicBool,
    forwards: AtomicUsize,
}

struct FaultyModel {
    inner: Model,
    faults: Arc<Faults>,
}

impl CausalLm for FaultyModel {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn routers(&self) -> Vec<(usize, String)> {
        self.inner.routers()
    }
    fn forward(&self, ctx: &ForwardCtx<'_>, cache: &KvCache) -> moe_models::Result<Tensor> {
        self.faults.forwards.fetch_add(1, Ordering::SeqCst);
        // Compute first, so the failed step has written its tokens' cache rows.
        let logits = self.inner.forward(ctx, cache)?;
        if self.faults.fail_next_forward.swap(false, Ordering::SeqCst) {
            return Err(ModelError::Input("injected: CUDA_ERROR_LAUNCH_FAILED".into()));
        }
        Ok(logits)
    }
    fn check_device(&self) -> moe_models::Result<()> {
        match self.faults.device_lost.load(Ordering::SeqCst) {
            true => Err(ModelError::Input("injected: CUDA_ERROR_ILLEGAL_ADDRESS".into())),
            false => self.inner.check_device(),
        }
    }
}

/// An engine over the V3 fixture taking one request at a time (the others wait).
fn engine(faults: Arc<Faults>) -> Engine {
    let inner = load_model(&fixture("deepseek-v3"), DType::F32, &LoadOptions::default());
    let model: Model = Box::new(FaultyModel { inner, faults });
    let runner = ModelRunner::new(model, 64, 16).unwrap();
    let config = EngineConfig {
        max_num_batched_tokens: 512,
        max_num_seqs: 1,
        max_model_len: 256,
        enable_prefix_caching: true,
    };
    Engine::start(runner, None, config).unwrap()
}

/// Two prompts sharing a 40-token prefix (so a cached prefix would be reused between them).
fn request(tail: u32) -> GenerationRequest {
    GenerationRequest {
        prompt_token_ids: (0..40).map(|i| 2 + (i * 7) % 300).chain([tail, tail + 1]).collect(),
        max_tokens: 6,
        ignore_eos: true,
        ..Default::default()
    }
}

fn tokens(engine: &Engine, r: GenerationRequest) -> Option<Vec<u32>> {
    engine.submit(r).unwrap().collect().map(|o| o.token_ids)
}

#[test]
fn a_failed_step_fails_only_its_requests_and_the_engine_keeps_serving() {
    let healthy = engine(Arc::default());
    let want_a = tokens(&healthy, request(100)).unwrap();
    let want_b = tokens(&healthy, request(200)).unwrap();

    let faults = Arc::new(Faults::default());
    let e = engine(faults.clone());
    // A runs alone (max_num_seqs 1) and its prefill step fails; B waits behind it.
    faults.fail_next_forward.store(true, Ordering::SeqCst);
    let a = e.submit(request(100)).unwrap();
    let b = e.submit(request(200)).unwrap();
    assert!(
        a.collect().is_none(),
        "the failed step's request ends without a finish reason"
    );
    let b = b.collect().expect("a request outside the failed step finishes");
    assert_eq!(b.token_ids, want_b, "and gets the tokens it gets on a healthy engine");
    // The failed step's cache rows were never registered: A again (sharing B's prefix and its
    // own) gets exactly its healthy tokens.
    assert_eq!(tokens(&e, request(100)).unwrap(), want_a);
    assert!(e.device_failure().is_none());
    assert_eq!(e.stats().running + e.stats().waiting, 0);
    assert_eq!(e.stats().blocks_used, 0, "the failed request's blocks were freed");
    assert!(faults.forwards.load(Ordering::SeqCst) > 2);
}

#[test]
fn a_lost_device_fails_every_request_and_refuses_new_ones() {
    let faults = Arc::new(Faults::default());
    let e = engine(faults.clone());
    faults.fail_next_forward.store(true, Ordering::SeqCst);
    faults.device_lost.store(true, Ordering::SeqCst);
    let a = e.submit(request(100)).unwrap();
    let b = e.submit(request(200)).unwrap();
    assert!(a.collect().is_none());
    assert!(
        b.collect().is_none(),
        "the waiting request is failed too: the device is gone"
    );
    let failure = e.device_failure().expect("the failure is reported");
    assert!(failure.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{failure}");
    match e.submit(request(300)) {
        Err(EngineError::DeviceFailed(m)) => assert!(m.contains("ILLEGAL_ADDRESS"), "{m}"),
        Err(other) => panic!("refused with the wrong error: {other}"),
        Ok(_) => panic!("a request was taken after the device failed"),
    }
}

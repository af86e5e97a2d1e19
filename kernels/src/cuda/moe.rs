//! Mixture-of-experts on the device: routing, the permutation of slots by expert, the grouped
//! gate/up (+ SiLU-and-multiply) and down GEMMs on tensor cores, and the combine. Kernels:
//! `kernels/cuda/moe_route.cu`, `moe_permute.cu`, `moe_grouped_gemm.cu`.
//!
//! Nothing here copies to the host or synchronises: every grid is sized from shapes (the
//! bounds of [`crate::moe::max_tiles`]) and tiles beyond the routed ones exit on the device,
//! so a whole MoE layer can be captured in a CUDA graph.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{bail, DType, Result, Tensor};

use super::args::{Args, Held, OutBuf};
use super::{cfg, check, cuda_device, launch_err, load, ptx, suffix};
use crate::moe::{max_tiles, RoutingMethod, RoutingParams, Scoring};

/// Permuted rows per GEMM tile (`BM` in `moe_grouped_gemm.cu`).
pub const TILE_ROWS: usize = 32;
/// Weight rows per CTA (`BN`): 128 output columns of the down GEMM, or 64 gate + 64 up columns.
const TILE_COLS: usize = 128;
const ROUTE_WARPS: usize = 4;
/// Limits of the routing kernel: 32 experts per lane, one chosen expert / group per lane.
pub const MAX_ROUTED_EXPERTS: usize = 1024;
pub const MAX_TOP_K: usize = 32;
pub const MAX_GROUPS: usize = 32;

/// Whether the routing kernel handles `p` over `num_experts` experts.
pub fn routing_supported(p: &RoutingParams, num_experts: usize) -> bool {
    let grouped = p.method != RoutingMethod::Greedy && p.n_group > 1;
    (1..=MAX_ROUTED_EXPERTS).contains(&num_experts)
        && (1..=MAX_TOP_K.min(num_experts)).contains(&p.top_k)
        && (!grouped
            || (p.n_group <= MAX_GROUPS
                && num_experts.is_multiple_of(p.n_group)
                && (1..=p.n_group).contains(&p.topk_group)
                && (p.method != RoutingMethod::NoauxTc || num_experts / p.n_group >= 2)))
}

/// Routes `logits` (`[T, E]` f32, contiguous) with `p`, as [`crate::moe::route`] does.
/// `bias`: `[E]` f32 correction bias (used by `NoauxTc` when `p.use_bias`).
/// Returns `(ids [T, top_k] u32, weights [T, top_k] f32)`.
pub fn moe_route(logits: &Tensor, bias: Option<&Tensor>, p: &RoutingParams) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(logits)?;
    let (t, e) = logits.dims2()?;
    check(logits, "logits", DType::F32, &dev)?;
    if !routing_supported(p, e) {
        bail!("moe_route: routing {p:?} over {e} experts is beyond the kernel's limits");
    }
    let bias = bias.filter(|_| p.method == RoutingMethod::NoauxTc && p.use_bias);
    if let Some(b) = bias {
        check(b, "bias", DType::F32, &dev)?;
        if b.dims1()? != e {
            bail!("moe_route: bias {:?} for {e} experts", b.shape());
        }
    }
    if t == 0 {
        let ids = Tensor::zeros((t, p.top_k), DType::U32, logits.device())?;
        return Ok((ids, Tensor::zeros((t, p.top_k), DType::F32, logits.device())?));
    }
    let mut ids = OutBuf::zeroed(&dev, (t, p.top_k), DType::U32)?;
    let mut weights = OutBuf::zeroed(&dev, (t, p.top_k), DType::F32)?;
    let func = load(&dev, "moe_route", ptx::MOE_ROUTE, "moe_route")?;
    let stream = dev.cuda_stream();
    let mut inputs = vec![logits];
    inputs.extend(bias);
    let held = Held::new(&inputs);
    let mut args = Args::new(&stream);
    let p_logits = args.input(&held, 0)?;
    let p_bias = match bias {
        Some(_) => args.input(&held, 1)?,
        None => 0u64,
    };
    let (p_ids, p_w) = (args.output(&mut ids), args.output(&mut weights));
    let scoring = match p.scoring {
        Scoring::Softmax => 0i32,
        Scoring::Sigmoid => 1,
    };
    let method = match p.method {
        RoutingMethod::Greedy => 0i32,
        RoutingMethod::GroupLimitedGreedy => 1,
        RoutingMethod::NoauxTc => 2,
    };
    let (t_i, e_i, k_i, groups, keep) = (
        t as i32,
        e as i32,
        p.top_k as i32,
        p.n_group.max(1) as i32,
        p.topk_group.max(1) as i32,
    );
    let (normalize, scale) = (p.normalize as i32, p.scale);
    let mut b = stream.launch_builder(&func);
    b.arg(&p_logits).arg(&p_bias).arg(&p_ids).arg(&p_w).arg(&t_i).arg(&e_i);
    b.arg(&k_i).arg(&scoring).arg(&method).arg(&groups).arg(&keep);
    b.arg(&normalize).arg(&scale);
    let grid = t.div_ceil(ROUTE_WARPS) as u32;
    let smem = (ROUTE_WARPS * 2 * e * 4) as u32;
    unsafe { b.launch(cfg((grid, 1, 1), (ROUTE_WARPS * 32) as u32, smem)) }.map_err(launch_err)?;
    drop(args);
    Ok((ids.into_tensor(), weights.into_tensor()))
}

/// Slots grouped by expert on the device (the layout of [`crate::moe::ExpertPermutation`],
/// with tiles of [`TILE_ROWS`]), in buffers sized by the shape-only bounds.
#[derive(Debug, Clone)]
pub struct DeviceExpertBatches {
    /// `[E]` u32.
    pub counts: Tensor,
    /// `[E + 1]` u32.
    pub offsets: Tensor,
    /// `[max_tiles * TILE_ROWS]` u32; entries past `offsets[E]` are unused.
    pub sorted_slots: Tensor,
    /// `[max_tiles]` u32; entries past `num_tiles` are unused.
    pub tile_experts: Tensor,
    /// `[1]` u32.
    pub num_tiles: Tensor,
    pub num_experts: usize,
    pub top_k: usize,
    pub num_tokens: usize,
}

impl DeviceExpertBatches {
    /// Tiles the grouped GEMMs launch (most exit at once when routing is concentrated).
    pub fn max_tiles(&self) -> usize {
        max_tiles(self.num_tokens * self.top_k, self.num_experts, TILE_ROWS)
    }
}

/// Groups the slots of `expert_ids` (`[T, top_k]` u32, contiguous) by expert, as
/// [`crate::moe::permute_by_expert`] with `tile_rows = TILE_ROWS`, in one launch.
pub fn moe_permute(expert_ids: &Tensor, num_experts: usize) -> Result<DeviceExpertBatches> {
    let dev = cuda_device(expert_ids)?;
    let (t, k) = expert_ids.dims2()?;
    check(expert_ids, "expert_ids", DType::U32, &dev)?;
    if num_experts == 0 || num_experts > 8192 {
        bail!("moe_permute: {num_experts} experts (1..=8192 supported)");
    }
    let slots = t * k;
    if slots > i32::MAX as usize / 2 {
        bail!("moe_permute: {slots} slots in one launch");
    }
    let tiles = max_tiles(slots, num_experts, TILE_ROWS);
    // Zero-filled: the kernel counts into them and leaves the unused tail alone.
    let mut counts = OutBuf::zeroed(&dev, num_experts, DType::U32)?;
    let mut offsets = OutBuf::zeroed(&dev, num_experts + 1, DType::U32)?;
    let mut sorted_slots = OutBuf::zeroed(&dev, tiles.max(1) * TILE_ROWS, DType::U32)?;
    let mut tile_experts = OutBuf::zeroed(&dev, tiles.max(1), DType::U32)?;
    let mut num_tiles = OutBuf::zeroed(&dev, 1, DType::U32)?;
    let batches = |counts: OutBuf, offsets: OutBuf, sorted: OutBuf, tile_experts: OutBuf, num_tiles: OutBuf| {
        DeviceExpertBatches {
            counts: counts.into_tensor(),
            offsets: offsets.into_tensor(),
            sorted_slots: sorted.into_tensor(),
            tile_experts: tile_experts.into_tensor(),
            num_tiles: num_tiles.into_tensor(),
            num_experts,
            top_k: k,
            num_tokens: t,
        }
    };
    if slots == 0 {
        return Ok(batches(counts, offsets, sorted_slots, tile_experts, num_tiles));
    }
    let func = load(&dev, "moe_permute", ptx::MOE_PERMUTE, "moe_permute")?;
    let stream = dev.cuda_stream();
    let held = Held::new(&[expert_ids]);
    let mut args = Args::new(&stream);
    let p_ids = args.input(&held, 0)?;
    let (p_counts, p_offsets) = (args.output(&mut counts), args.output(&mut offsets));
    let (p_sorted, p_tiles, p_num) = (
        args.output(&mut sorted_slots),
        args.output(&mut tile_experts),
        args.output(&mut num_tiles),
    );
    let (slots_i, e_i, tile_i) = (slots as i32, num_experts as i32, TILE_ROWS as i32);
    let mut b = stream.launch_builder(&func);
    b.arg(&p_ids).arg(&slots_i).arg(&e_i).arg(&tile_i);
    b.arg(&p_counts)
        .arg(&p_offsets)
        .arg(&p_sorted)
        .arg(&p_tiles)
        .arg(&p_num);
    let smem = ((num_experts + 1) * 4) as u32;
    unsafe { b.launch(cfg((num_experts as u32, 1, 1), 256, smem)) }.map_err(launch_err)?;
    drop(args);
    Ok(batches(counts, offsets, sorted_slots, tile_experts, num_tiles))
}

/// Checks a bf16 GEMM operand: rows 16-byte aligned (row stride and width multiples of 8).
fn check_gemm_operand(t: &Tensor, name: &str, ptr: u64) -> Result<()> {
    let width = *t.dims().last().unwrap_or(&0);
    let row_stride = t.stride().first().copied().unwrap_or(width);
    if t.dtype() != DType::BF16 || t.stride().last() != Some(&1) {
        bail!("moe grouped GEMM: {name} must be bf16 with a contiguous last dim");
    }
    if !width.is_multiple_of(8) || !row_stride.is_multiple_of(8) || !ptr.is_multiple_of(16) {
        bail!(
            "moe grouped GEMM: {name} {:?} needs 16-byte aligned rows (width % 8 == 0)",
            t.shape()
        );
    }
    Ok(())
}

/// `h = silu(x W_gate^T) * (x W_up^T)` for every permuted row, on tensor cores.
///
/// * `x`: `[T, H]` bf16, rows 16-byte aligned (row stride free, last dim contiguous).
/// * `gate_up`: `[E, 2I, H]` bf16, contiguous (gate rows, then up rows).
/// * Returns `h`: `[max_tiles * TILE_ROWS, I]` bf16 in permuted row order (padding rows zero).
pub fn moe_gate_up_silu(x: &Tensor, gate_up: &Tensor, b: &DeviceExpertBatches) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (t, hidden) = x.dims2()?;
    let (e, two_i, k) = gate_up.dims3()?;
    let inter = two_i / 2;
    if t != b.num_tokens || e != b.num_experts || k != hidden || two_i % 2 != 0 {
        bail!(
            "moe_gate_up_silu: x {:?}, gate_up {:?} for {} tokens over {} experts",
            x.shape(),
            gate_up.shape(),
            b.num_tokens,
            b.num_experts
        );
    }
    check(gate_up, "gate_up", DType::BF16, &dev)?;
    let rows = b.max_tiles() * TILE_ROWS;
    if rows == 0 || inter == 0 {
        return Tensor::zeros((rows.max(TILE_ROWS), inter), DType::BF16, x.device());
    }
    if !inter.is_multiple_of(8) {
        bail!("moe grouped GEMM: h rows of {inter} are not 16-byte aligned (width % 8 == 0)");
    }
    // Zero-filled: padding rows stay zero.
    let mut h = OutBuf::zeroed(&dev, (rows, inter), DType::BF16)?;
    let func = load(&dev, "moe_grouped_gemm", ptx::MOE_GROUPED_GEMM, "moe_gate_up_silu")?;
    let stream = dev.cuda_stream();
    let held = Held::new(&[x, gate_up, &b.sorted_slots, &b.tile_experts, &b.num_tiles]);
    let mut args = Args::new(&stream);
    let (p_x, p_w) = (args.input(&held, 0)?, args.input(&held, 1)?);
    check_gemm_operand(x, "x", p_x)?;
    check_gemm_operand(gate_up, "gate_up", p_w)?;
    let (p_sorted, p_tiles, p_num) = (args.input(&held, 2)?, args.input(&held, 3)?, args.input(&held, 4)?);
    let p_h = args.output(&mut h);
    let (ldx, k_i, n_i, top_k, ldh) = (
        x.stride()[0] as i64,
        k as i32,
        inter as i32,
        b.top_k as i32,
        inter as i64,
    );
    let mut lb = stream.launch_builder(&func);
    lb.arg(&p_x).arg(&ldx).arg(&p_w).arg(&k_i).arg(&n_i);
    lb.arg(&p_sorted)
        .arg(&p_tiles)
        .arg(&p_num)
        .arg(&top_k)
        .arg(&p_h)
        .arg(&ldh);
    let grid = (b.max_tiles() as u32, inter.div_ceil(TILE_COLS / 2) as u32, 1);
    unsafe { lb.launch(cfg(grid, 128, 0)) }.map_err(launch_err)?;
    drop(args);
    Ok(h.into_tensor())
}

/// `y[slot] = weight[slot] * (h[row(slot)] W_down^T)`, on tensor cores, written in slot order.
///
/// * `h`: from [`moe_gate_up_silu`]; `down`: `[E, H, I]` bf16, contiguous;
///   `slot_weights`: `[T, top_k]` f32, contiguous.
/// * Returns `y`: `[T * top_k, H]` f32 (slots without an expert stay zero).
pub fn moe_down_weighted(h: &Tensor, down: &Tensor, b: &DeviceExpertBatches, slot_weights: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(h)?;
    let (e, hidden, inter) = down.dims3()?;
    if e != b.num_experts || h.dims2()?.1 != inter || slot_weights.dims2()? != (b.num_tokens, b.top_k) {
        bail!(
            "moe_down_weighted: h {:?}, down {:?}, weights {:?}",
            h.shape(),
            down.shape(),
            slot_weights.shape()
        );
    }
    check(down, "down", DType::BF16, &dev)?;
    check(slot_weights, "slot_weights", DType::F32, &dev)?;
    let slots = b.num_tokens * b.top_k;
    if slots == 0 || hidden == 0 {
        return Tensor::zeros((slots, hidden), DType::F32, h.device());
    }
    // Zero-filled: slots without an expert stay zero.
    let mut y = OutBuf::zeroed(&dev, (slots, hidden), DType::F32)?;
    let func = load(&dev, "moe_grouped_gemm", ptx::MOE_GROUPED_GEMM, "moe_down_weighted")?;
    let stream = dev.cuda_stream();
    let held = Held::new(&[h, down, &b.sorted_slots, &b.tile_experts, &b.num_tiles, slot_weights]);
    let mut args = Args::new(&stream);
    let (p_h, p_w) = (args.input(&held, 0)?, args.input(&held, 1)?);
    check_gemm_operand(h, "h", p_h)?;
    check_gemm_operand(down, "down", p_w)?;
    let (p_sorted, p_tiles, p_num, p_wt) = (
        args.input(&held, 2)?,
        args.input(&held, 3)?,
        args.input(&held, 4)?,
        args.input(&held, 5)?,
    );
    let p_y = args.output(&mut y);
    let (ldh, k_i, n_i, ldy) = (h.stride()[0] as i64, inter as i32, hidden as i32, hidden as i64);
    let mut lb = stream.launch_builder(&func);
    lb.arg(&p_h).arg(&ldh).arg(&p_w).arg(&k_i).arg(&n_i);
    lb.arg(&p_sorted)
        .arg(&p_tiles)
        .arg(&p_num)
        .arg(&p_wt)
        .arg(&p_y)
        .arg(&ldy);
    let grid = (b.max_tiles() as u32, hidden.div_ceil(TILE_COLS) as u32, 1);
    unsafe { lb.launch(cfg(grid, 128, 0)) }.map_err(launch_err)?;
    drop(args);
    Ok(y.into_tensor())
}

/// `out[t] = dtype(Σ_j y[t * top_k + j] (+ shared[t]))`, summed in slot order (deterministic).
/// `y`: `[T * top_k, H]` f32; `shared`: `[T, H]` in `dtype`, contiguous. Returns `[T, H]`.
pub fn moe_combine(y: &Tensor, top_k: usize, shared: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
    let dev = cuda_device(y)?;
    let (slots, hidden) = y.dims2()?;
    check(y, "y", DType::F32, &dev)?;
    if top_k == 0 || slots % top_k != 0 {
        bail!("moe_combine: {slots} slot rows for top_k {top_k}");
    }
    let t = slots / top_k;
    if let Some(s) = shared {
        check(s, "shared", dtype, &dev)?;
        if s.dims2()? != (t, hidden) {
            bail!("moe_combine: shared {:?} for [{t}, {hidden}]", s.shape());
        }
    }
    if t == 0 || hidden == 0 {
        return Tensor::zeros((t, hidden), dtype, y.device());
    }
    // Every element is written.
    let mut out = OutBuf::uninit(&dev, (t, hidden), dtype)?;
    let func = load(
        &dev,
        "moe_grouped_gemm",
        ptx::MOE_GROUPED_GEMM,
        &format!("moe_combine_{}", suffix(dtype)?),
    )?;
    let stream = dev.cuda_stream();
    let mut inputs = vec![y];
    inputs.extend(shared);
    let held = Held::new(&inputs);
    let mut args = Args::new(&stream);
    let p_y = args.input(&held, 0)?;
    let p_shared = match shared {
        Some(_) => args.input(&held, 1)?,
        None => 0u64,
    };
    let p_out = args.output(&mut out);
    let (k_i, n_i) = (top_k as i32, hidden as i32);
    let mut lb = stream.launch_builder(&func);
    lb.arg(&p_y).arg(&k_i).arg(&p_shared).arg(&p_out).arg(&n_i);
    unsafe { lb.launch(cfg((t as u32, 1, 1), 256, 0)) }.map_err(launch_err)?;
    drop(args);
    Ok(out.into_tensor())
}

/// The routed experts of one MoE layer on the device: permute, gate/up + SiLU, down with the
/// routing weights, combine (adding `shared`, the shared experts' output, when given).
/// `x`: `[T, H]` bf16; `ids`/`weights`: `[T, top_k]` from [`moe_route`]. Returns `[T, H]` bf16.
pub fn moe_experts(
    x: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    shared: Option<&Tensor>,
) -> Result<Tensor> {
    let batches = moe_permute(ids, gate_up.dims3()?.0)?;
    let h = moe_gate_up_silu(x, gate_up, &batches)?;
    let y = moe_down_weighted(&h, down, &batches, weights)?;
    moe_combine(&y, batches.top_k, shared, x.dtype())
}

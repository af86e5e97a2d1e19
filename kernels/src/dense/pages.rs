//! Huge pages for CPU weights. A decode step streams every active weight once, row by row;
//! on 4 KiB pages a 2048-wide bf16 row is one page, so every row costs a TLB miss and a
//! fresh start of the hardware prefetcher. After load, each large weight buffer is folded
//! into 2 MiB pages (`madvise(MADV_COLLAPSE)`, Linux 6.1+; older kernels get
//! `MADV_HUGEPAGE`, which khugepaged honours over time). Advisory only: the contents never
//! change, and a refusal (huge pages off, another OS) leaves the weights as they were. The
//! collapse copies each buffer once, at load (about 30 ms per GiB here). Quantized weights
//! are left as they are.
//! `MOE_CPU_HUGE_PAGES=0` turns it off, for A/B timings.

use candle_core::{CpuStorage, Storage, Tensor};

use super::Weight;

/// One huge page.
const HUGE_PAGE: usize = 2 << 20;
/// `madvise`'s synchronous collapse (Linux 6.1+), spelled out for C libraries whose headers
/// predate it.
#[cfg(target_os = "linux")]
const MADV_COLLAPSE: libc::c_int = 25;

/// Asks the OS to back `w`'s storage with huge pages, when it is a large CPU tensor. Returns
/// whether the range was collapsed now (false when it was too small, not on the CPU, or the
/// OS declined or deferred it).
pub fn prefer_huge_pages(w: &Weight) -> bool {
    let Weight::Dense(t) = w else { return false };
    enabled() && with_cpu_bytes(t, advise).unwrap_or(false)
}

fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("MOE_CPU_HUGE_PAGES").is_ok_and(|v| v == "0"))
}

/// Runs `body(address, bytes)` over the whole storage of a CPU tensor.
fn with_cpu_bytes<R>(t: &Tensor, body: impl FnOnce(usize, usize) -> R) -> Option<R> {
    let (storage, _) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return None };
    let (ptr, len) = match cpu {
        CpuStorage::F32(v) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
        CpuStorage::BF16(v) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
        CpuStorage::F16(v) => (v.as_ptr() as usize, std::mem::size_of_val(v.as_slice())),
        CpuStorage::U8(v) => (v.as_ptr() as usize, v.len()),
        _ => return None,
    };
    Some(body(ptr, len))
}

/// The whole huge pages inside `[start, start + len)`, advised.
#[cfg(target_os = "linux")]
fn advise(start: usize, len: usize) -> bool {
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + len) / HUGE_PAGE * HUGE_PAGE;
    if end <= first {
        return false;
    }
    let (addr, bytes) = (first as *mut libc::c_void, end - first);
    // SAFETY: the range lies inside one live allocation (the tensor's storage, borrowed by
    // the caller for the call); both advices keep its contents and mapping as they are.
    unsafe {
        if libc::madvise(addr, bytes, MADV_COLLAPSE) == 0 {
            return true;
        }
        libc::madvise(addr, bytes, libc::MADV_HUGEPAGE);
    }
    false
}

#[cfg(not(target_os = "linux"))]
fn advise(_: usize, _: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A large weight keeps its values whatever the OS does with its pages, and is folded
    /// into huge pages where the OS allows it (reported, not required: the setting belongs to
    /// the machine).
    #[test]
    fn huge_page_advice_keeps_the_values() {
        let t = Tensor::randn(0f32, 1.0, (1024, 2048), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let values = |t: &Tensor| crate::dense::host_f32(t).unwrap();
        let before = values(&t);
        let w = Weight::Dense(t.clone());
        let collapsed = prefer_huge_pages(&w);
        eprintln!("collapsed into huge pages: {collapsed}");
        let after = values(&t);
        assert_eq!(before, after);
        let small = Weight::Dense(Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap());
        assert!(!prefer_huge_pages(&small), "a 64-byte tensor has no whole huge page");
    }
}

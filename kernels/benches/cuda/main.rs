//! The GPU kernel benchmarks in one binary (feature `cuda`; needs a CUDA device), one copy of
//! candle's embedded kernels for all of them: `cargo bench -p moe-kernels --features cuda
//! --bench cuda [NAME...]` runs the named ones (all by default): `mla_decode`, `gqa_decode`,
//! `dsa_decode`, `moe_layer`. Each prints its own table.

mod dsa_decode;
mod gqa_decode;
mod mla_decode;
mod moe_layer;
mod timing;

use candle_core::Result;

type Bench = fn() -> Result<()>;

const BENCHES: [(&str, Bench); 4] = [
    ("mla_decode", mla_decode::run),
    ("gqa_decode", gqa_decode::run),
    ("dsa_decode", dsa_decode::run),
    ("moe_layer", moe_layer::run),
];

fn main() -> Result<()> {
    // cargo bench passes `--bench`; everything else names benchmarks.
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if let Some(bad) = wanted.iter().find(|w| !BENCHES.iter().any(|(name, _)| name == w)) {
        candle_core::bail!(
            "unknown benchmark {bad:?}; known: {}",
            BENCHES.map(|(name, _)| name).join(", ")
        );
    }
    for (name, run) in BENCHES {
        if wanted.is_empty() || wanted.iter().any(|w| w == name) {
            println!("== {name}");
            run()?;
        }
    }
    Ok(())
}

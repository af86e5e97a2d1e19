//! What a model keeps per token in the paged cache ([`KvCacheSpec`]) and the cache tensors
//! themselves ([`KvCache`]). One block id covers a token's rows in every layer, so the block
//! pool, prefix cache and preemption never learn what is inside a block; sizing, `inspect`
//! and metrics use the spec's bytes per token.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::{ModelError, Result};

/// What one token of one layer keeps in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KvCacheSpec {
    /// MLA: one latent row (`c_kv` then the rotated `k_pe`).
    Latent { dim: usize },
    /// GQA: K and V of every kv head.
    PerHead {
        kv_heads: usize,
        head_dim: usize,
        v_head_dim: usize,
    },
}

impl KvCacheSpec {
    /// Values one token keeps per layer (saturating: configs may claim absurd sizes).
    pub fn values_per_token(&self) -> usize {
        match *self {
            KvCacheSpec::Latent { dim } => dim,
            KvCacheSpec::PerHead {
                kv_heads,
                head_dim,
                v_head_dim,
            } => kv_heads.saturating_mul(head_dim.saturating_add(v_head_dim)),
        }
    }

    /// Bytes one token occupies across `num_layers` layers in `dtype`.
    pub fn bytes_per_token(&self, num_layers: usize, dtype: DType) -> usize {
        self.values_per_token()
            .saturating_mul(num_layers)
            .saturating_mul(dtype.size_in_bytes())
    }

    /// A short description, e.g. `latent 576` or `per-head K/V, 4 kv heads x (128 + 128)`.
    pub fn describe(&self) -> String {
        match *self {
            KvCacheSpec::Latent { dim } => format!("latent {dim}"),
            KvCacheSpec::PerHead {
                kv_heads,
                head_dim,
                v_head_dim,
            } => format!("per-head K/V, {kv_heads} kv heads x ({head_dim} + {v_head_dim})"),
        }
    }
}

/// One layer's cache tensors.
#[derive(Debug)]
pub enum LayerCache {
    /// `[num_blocks, block_size, dim]`.
    Latent(Tensor),
    /// `k`: `[num_blocks, block_size, kv_heads, head_dim]`, `v`: `[.., kv_heads, v_head_dim]`.
    PerHead { k: Tensor, v: Tensor },
}

/// The paged cache of a model: one [`LayerCache`] per decoder layer, all of one spec.
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub spec: KvCacheSpec,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl KvCache {
    pub fn new(
        spec: KvCacheSpec,
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(ModelError::Input(format!(
                "a KV cache needs at least one block of at least one slot (got {num_blocks} x {block_size})"
            )));
        }
        let layer = || -> candle_core::Result<LayerCache> {
            Ok(match spec {
                KvCacheSpec::Latent { dim } => {
                    LayerCache::Latent(Tensor::zeros((num_blocks, block_size, dim), dtype, device)?)
                }
                KvCacheSpec::PerHead {
                    kv_heads,
                    head_dim,
                    v_head_dim,
                } => LayerCache::PerHead {
                    k: Tensor::zeros((num_blocks, block_size, kv_heads, head_dim), dtype, device)?,
                    v: Tensor::zeros((num_blocks, block_size, kv_heads, v_head_dim), dtype, device)?,
                },
            })
        };
        let layers = (0..num_layers)
            .map(|_| layer())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            spec,
            num_blocks,
            block_size,
        })
    }

    /// Bytes of cache memory `num_blocks` blocks take.
    pub fn bytes(&self, dtype: DType) -> usize {
        self.spec
            .bytes_per_token(self.layers.len(), dtype)
            .saturating_mul(self.num_blocks * self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_size_tokens_and_caches_have_their_shapes() {
        let latent = KvCacheSpec::Latent { dim: 576 };
        assert_eq!(latent.bytes_per_token(27, DType::BF16), 576 * 27 * 2);
        let gqa = KvCacheSpec::PerHead {
            kv_heads: 4,
            head_dim: 128,
            v_head_dim: 128,
        };
        assert_eq!(gqa.values_per_token(), 1024);
        assert_eq!(gqa.bytes_per_token(48, DType::BF16), 1024 * 48 * 2);
        let cache = KvCache::new(gqa, 2, 3, 16, DType::F32, &Device::Cpu).unwrap();
        match &cache.layers[1] {
            LayerCache::PerHead { k, v } => {
                assert_eq!(k.dims(), &[3, 16, 4, 128]);
                assert_eq!(v.dims(), &[3, 16, 4, 128]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cache.bytes(DType::F32), 1024 * 2 * 4 * 3 * 16);
        assert!(KvCache::new(latent, 1, 0, 16, DType::F32, &Device::Cpu).is_err());
    }
}

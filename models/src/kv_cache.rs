//! What a model keeps per token in the paged cache ([`KvCacheSpec`]) and the cache tensors
//! themselves ([`KvCache`]). One block id covers a token's rows in every layer, so the block
//! pool, prefix cache and preemption never learn what is inside a block; sizing, `inspect`
//! and metrics use the spec's bytes per token. DeepSeek Sparse Attention's indexer keys live
//! in the same blocks as the latents, so prefix caching and preemption cover them too.

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::{ModelError, Result};

/// The DSA indexer keys a token keeps: `dim` values in each of `layers` layers (those with an
/// indexer of their own; GLM-5's shared layers reuse another layer's selection and keep none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IndexKeys {
    pub dim: usize,
    pub layers: usize,
}

/// What one token of one layer keeps in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KvCacheSpec {
    /// MLA: one latent row (`c_kv` then the rotated `k_pe`), and with DeepSeek Sparse
    /// Attention one indexer key per layer that runs an indexer.
    Latent { dim: usize, index_keys: Option<IndexKeys> },
    /// GQA: K and V of every kv head.
    PerHead {
        kv_heads: usize,
        head_dim: usize,
        v_head_dim: usize,
    },
}

impl KvCacheSpec {
    /// Values one token keeps per layer (saturating: configs may claim absurd sizes); with
    /// indexer keys, in a layer that has them.
    pub fn values_per_token(&self) -> usize {
        match *self {
            KvCacheSpec::Latent { dim, index_keys } => dim.saturating_add(index_keys.map_or(0, |k| k.dim)),
            KvCacheSpec::PerHead {
                kv_heads,
                head_dim,
                v_head_dim,
            } => kv_heads.saturating_mul(head_dim.saturating_add(v_head_dim)),
        }
    }

    /// Bytes one token occupies across `num_layers` layers in `dtype`.
    pub fn bytes_per_token(&self, num_layers: usize, dtype: DType) -> usize {
        let values = match *self {
            KvCacheSpec::Latent {
                dim,
                index_keys: Some(k),
            } => dim
                .saturating_mul(num_layers)
                .saturating_add(k.dim.saturating_mul(k.layers.min(num_layers))),
            _ => self.values_per_token().saturating_mul(num_layers),
        };
        values.saturating_mul(dtype.size_in_bytes())
    }

    /// A short description, e.g. `latent 576` or `per-head K/V, 4 kv heads x (128 + 128)`.
    pub fn describe(&self) -> String {
        match *self {
            KvCacheSpec::Latent { dim, index_keys: None } => format!("latent {dim}"),
            KvCacheSpec::Latent {
                dim,
                index_keys: Some(k),
            } => format!("latent {dim} + indexer keys {} in {} layers", k.dim, k.layers),
            KvCacheSpec::PerHead {
                kv_heads,
                head_dim,
                v_head_dim,
            } => format!("per-head K/V, {kv_heads} kv heads x ({head_dim} + {v_head_dim})"),
        }
    }
}

/// One layer's cache tensors (a clone shares them).
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// `latent`: `[num_blocks, block_size, dim]`; `index_keys`: `[num_blocks, block_size,
    /// index_head_dim]` in a layer that runs a DSA indexer.
    Latent { latent: Tensor, index_keys: Option<Tensor> },
    /// `k`: `[num_blocks, block_size, kv_heads, head_dim]`, `v`: `[.., kv_heads, v_head_dim]`.
    PerHead { k: Tensor, v: Tensor },
}

/// The paged cache of a model: one [`LayerCache`] per decoder layer, all of one spec. A clone
/// shares the tensors. For a model split over ranks this is rank 0's part, and
/// `peer_ranks` holds the other ranks' (same blocks, each rank's own rows).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub spec: KvCacheSpec,
    pub num_blocks: usize,
    pub block_size: usize,
    /// Ranks 1.. of a split model, in rank order; empty otherwise.
    pub peer_ranks: Vec<KvCache>,
}

impl KvCache {
    /// `index_key_layers[l]`: layer `l` keeps indexer keys (the spec must have them); empty
    /// when none does.
    pub fn new(
        spec: KvCacheSpec,
        num_layers: usize,
        index_key_layers: &[bool],
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
        let indexed = |l: usize| index_key_layers.get(l).copied().unwrap_or(false);
        let wanted = (0..num_layers).filter(|&l| indexed(l)).count();
        let spec_layers = match spec {
            KvCacheSpec::Latent {
                index_keys: Some(k), ..
            } => k.layers,
            _ => 0,
        };
        if wanted != spec_layers || index_key_layers.len() > num_layers {
            return Err(ModelError::Input(format!(
                "the cache spec has indexer keys in {spec_layers} layers, the layer list in {wanted}"
            )));
        }
        let layer = |l: usize| -> candle_core::Result<LayerCache> {
            Ok(match spec {
                KvCacheSpec::Latent { dim, index_keys } => LayerCache::Latent {
                    latent: Tensor::zeros((num_blocks, block_size, dim), dtype, device)?,
                    index_keys: match index_keys {
                        Some(k) if indexed(l) => Some(Tensor::zeros((num_blocks, block_size, k.dim), dtype, device)?),
                        _ => None,
                    },
                },
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
        let layers = (0..num_layers).map(layer).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            spec,
            num_blocks,
            block_size,
            peer_ranks: Vec::new(),
        })
    }

    /// Bytes of cache memory `num_blocks` blocks take (on each rank of a split model).
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
        let latent = KvCacheSpec::Latent {
            dim: 576,
            index_keys: None,
        };
        assert_eq!(latent.bytes_per_token(27, DType::BF16), 576 * 27 * 2);
        let gqa = KvCacheSpec::PerHead {
            kv_heads: 4,
            head_dim: 128,
            v_head_dim: 128,
        };
        assert_eq!(gqa.values_per_token(), 1024);
        assert_eq!(gqa.bytes_per_token(48, DType::BF16), 1024 * 48 * 2);
        let cache = KvCache::new(gqa, 2, &[], 3, 16, DType::F32, &Device::Cpu).unwrap();
        match &cache.layers[1] {
            LayerCache::PerHead { k, v } => {
                assert_eq!(k.dims(), &[3, 16, 4, 128]);
                assert_eq!(v.dims(), &[3, 16, 4, 128]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cache.bytes(DType::F32), 1024 * 2 * 4 * 3 * 16);
        assert!(KvCache::new(latent, 1, &[], 0, 16, DType::F32, &Device::Cpu).is_err());
    }

    #[test]
    fn indexer_keys_are_counted_and_allocated_only_where_an_indexer_runs() {
        // GLM-5-like: 3 layers, the middle one reuses layer 0's selection.
        let spec = KvCacheSpec::Latent {
            dim: 576,
            index_keys: Some(IndexKeys { dim: 128, layers: 2 }),
        };
        assert_eq!(spec.bytes_per_token(3, DType::BF16), (576 * 3 + 128 * 2) * 2);
        assert_eq!(spec.describe(), "latent 576 + indexer keys 128 in 2 layers");
        let cache = KvCache::new(spec, 3, &[true, false, true], 2, 4, DType::F32, &Device::Cpu).unwrap();
        let keys: Vec<Option<Vec<usize>>> = cache
            .layers
            .iter()
            .map(|l| match l {
                LayerCache::Latent { latent, index_keys } => {
                    assert_eq!(latent.dims(), &[2, 4, 576]);
                    index_keys.as_ref().map(|k| k.dims().to_vec())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(keys, vec![Some(vec![2, 4, 128]), None, Some(vec![2, 4, 128])]);
        assert_eq!(cache.bytes(DType::F32), (576 * 3 + 128 * 2) * 4 * 2 * 4);
        // The layer list must agree with the spec.
        assert!(KvCache::new(spec, 3, &[true, true, true], 2, 4, DType::F32, &Device::Cpu).is_err());
        assert!(KvCache::new(spec, 3, &[], 2, 4, DType::F32, &Device::Cpu).is_err());
    }
}

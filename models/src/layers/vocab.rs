//! The token embedding and the output projection (lm_head), split over the ranks by
//! vocabulary rows under tensor parallelism: rank `r` holds rows `r * part..(r + 1) * part`
//! (`part = ceil(vocab / ranks)`; the last rank's may be short). A token's embedding comes
//! from the rank that holds it (the others add zeros: one all-reduce, exact), and each rank's
//! logits for its rows are gathered into the full vocabulary.

use std::ops::Range;

use candle_core::{Module, Tensor};
use moe_kernels::dense::Weight;

use super::linear::Linear;
use crate::error::Result;
use crate::loader::Weights;
use crate::parallel::Shard;

/// This rank's rows of a `vocab`-row table.
fn vocab_rows(shard: &Shard, vocab: usize) -> (Range<usize>, usize) {
    let part = vocab.div_ceil(shard.size());
    let start = (shard.rank() * part).min(vocab);
    (start..(start + part).min(vocab), part)
}

#[derive(Debug, Clone)]
pub struct VocabEmbedding {
    /// `[rows held, hidden]`, plus one zero row on a split vocabulary (for ids held elsewhere).
    table: Tensor,
    rows: Range<usize>,
    shard: Shard,
}

impl VocabEmbedding {
    /// This rank's rows of `name` (`[vocab, hidden]`).
    pub fn load(w: &Weights, name: &str, vocab: usize, hidden: usize, shard: &Shard) -> Result<Self> {
        let (rows, _) = vocab_rows(shard, vocab);
        let mut table = w.get_part(name, &[vocab, hidden], &[rows.clone(), 0..hidden])?;
        if !shard.is_single() {
            let zero = Tensor::zeros((1, hidden), table.dtype(), table.device())?;
            table = Tensor::cat(&[&table, &zero], 0)?;
        }
        Ok(VocabEmbedding {
            table,
            rows,
            shard: shard.clone(),
        })
    }

    /// This rank's rows, as the weight of a tied lm_head: `[rows held, hidden]`.
    pub fn rows_held(&self) -> Result<Tensor> {
        Ok(self.table.narrow(0, 0, self.rows.len())?)
    }

    /// `ids`: `[tokens]` u32 (`host_ids` the same on the host) -> `[tokens, hidden]`.
    pub fn forward(&self, ids: &Tensor, host_ids: &[u32]) -> Result<Tensor> {
        if self.shard.is_single() {
            return Ok(self.table.index_select(ids, 0)?);
        }
        let zero_row = self.rows.len() as u32;
        let local: Vec<u32> = host_ids
            .iter()
            .map(|&t| {
                let t = t as usize;
                if self.rows.contains(&t) {
                    (t - self.rows.start) as u32
                } else {
                    zero_row
                }
            })
            .collect();
        let local = Tensor::from_vec(local, host_ids.len(), self.table.device())?;
        self.shard.all_reduce(&self.table.index_select(&local, 0)?)
    }
}

#[derive(Debug, Clone)]
pub struct VocabHead {
    /// `[rows held, hidden]`.
    proj: Linear,
    vocab: usize,
    /// Rows per rank (the padded part).
    part: usize,
    shard: Shard,
}

impl VocabHead {
    /// This rank's rows of the projection `prefix` (`[vocab, hidden]`).
    pub fn load(w: &Weights, prefix: &str, vocab: usize, hidden: usize, shard: &Shard) -> Result<Self> {
        let (rows, part) = vocab_rows(shard, vocab);
        Ok(VocabHead {
            proj: Linear::load_rows(w, prefix, hidden, vocab, false, rows)?,
            vocab,
            part,
            shard: shard.clone(),
        })
    }

    /// The lm_head tied to `embedding`'s rows.
    pub fn tied(embedding: &VocabEmbedding, vocab: usize, shard: &Shard) -> Result<Self> {
        Ok(VocabHead {
            proj: Linear {
                weight: Weight::Dense(embedding.rows_held()?),
                bias: None,
            },
            vocab,
            part: vocab.div_ceil(shard.size()),
            shard: shard.clone(),
        })
    }

    /// `x`: `[rows, hidden]` -> logits `[rows, vocab]` (every rank gets all of them).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let local = self.proj.forward(x)?; // [rows, held]
        if self.shard.is_single() {
            return Ok(local);
        }
        let (rows, held) = local.dims2()?;
        let local = if held < self.part {
            let pad = Tensor::zeros((rows, self.part - held), local.dtype(), local.device())?;
            Tensor::cat(&[&local, &pad], 1)?
        } else {
            local
        };
        // [ranks * rows, part] -> [rows, ranks * part]: rank r's columns after rank r-1's.
        let ranks = self.shard.size();
        let all = self.shard.comm().all_gather(&local.contiguous()?)?;
        let all = all
            .reshape((ranks, rows, self.part))?
            .transpose(0, 1)?
            .reshape((rows, ranks * self.part))?;
        Ok(all.narrow(1, 0, self.vocab)?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor};
    use moe_kernels::comm::LocalGroup;

    use super::*;
    use crate::loader::ModelFiles;
    use crate::parallel::ParallelLayout;

    /// A vocabulary of 10 rows split over 3 ranks (4, 4 and 2 rows): every rank embeds every
    /// id and computes every logit exactly as the whole tables would.
    #[test]
    fn an_uneven_vocabulary_split_gives_the_whole_tables_results() {
        let (vocab, hidden) = (10usize, 4usize);
        let embed: Vec<f32> = (0..vocab * hidden).map(|i| i as f32 * 0.25 - 3.0).collect();
        let head: Vec<f32> = (0..vocab * hidden).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let dir = std::env::temp_dir().join(format!("moe-vocab-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.safetensors");
        let cpu = Device::Cpu;
        let tensors = [
            ("embed", Tensor::from_vec(embed.clone(), (vocab, hidden), &cpu).unwrap()),
            (
                "lm_head.weight",
                Tensor::from_vec(head.clone(), (vocab, hidden), &cpu).unwrap(),
            ),
        ];
        candle_core::safetensors::save(&tensors.iter().cloned().collect(), &file).unwrap();
        let files = ModelFiles {
            dir: dir.clone(),
            config: dir.join("config.json"),
            weights: vec![file],
            tokenizer: None,
            tokenizer_config: None,
            generation_config: None,
        };
        let ids = [0u32, 5, 9, 3, 8];
        let x: Vec<f32> = (0..2 * hidden).map(|i| i as f32 * 0.5 - 1.0).collect();
        let layout = ParallelLayout::new(3, 1).unwrap();
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|g| {
                    let (files, x) = (&files, &x);
                    s.spawn(move || {
                        let shard = Shard::new(layout, Arc::new(g)).unwrap();
                        let w = Weights::open(files, DType::F32, &Device::Cpu).unwrap();
                        let emb = VocabEmbedding::load(&w, "embed", vocab, hidden, &shard).unwrap();
                        let head = VocabHead::load(&w, "lm_head", vocab, hidden, &shard).unwrap();
                        let id_t = Tensor::new(&ids, &Device::Cpu).unwrap();
                        let e = emb
                            .forward(&id_t, &ids)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        let xt = Tensor::from_vec(x.clone(), (2, hidden), &Device::Cpu).unwrap();
                        let l = head.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        (e, l)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        std::fs::remove_dir_all(&dir).ok();
        let want_e: Vec<f32> = ids
            .iter()
            .flat_map(|&t| embed[t as usize * hidden..(t as usize + 1) * hidden].to_vec())
            .collect();
        let want_l: Vec<f32> = (0..2)
            .flat_map(|r| {
                let (x, head) = (&x, &head);
                (0..vocab).map(move |v| {
                    (0..hidden)
                        .map(|c| x[r * hidden + c] * head[v * hidden + c])
                        .sum::<f32>()
                })
            })
            .collect();
        for (rank, (e, l)) in results.iter().enumerate() {
            assert_eq!(e, &want_e, "rank {rank} embedding");
            for (g, w) in l.iter().zip(&want_l) {
                assert!((g - w).abs() < 1e-5, "rank {rank} logits {l:?} vs {want_l:?}");
            }
        }
    }
}

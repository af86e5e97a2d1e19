//! Seeded benchmark workloads of token-id prompts (no tokenizer needed): `fixed` and `random`
//! lengths, and multi-turn `agent` sessions whose every turn resends the growing history.
//! Plans only; sending them is `load`'s job.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Token ids below this are never drawn (they are often special tokens: BOS, EOS, padding).
pub const LOWEST_TOKEN_ID: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// Every request has --input-len prompt tokens and --output-len output tokens.
    Fixed,
    /// Lengths uniform in [mean*(1-r), mean*(1+r)], r = --range-ratio.
    Random,
    /// --sessions multi-turn sessions sharing a system prefix; each turn resends the history.
    Agent,
}

/// What to generate; every length is in tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    pub input_len: usize,
    pub output_len: usize,
    pub num_prompts: usize,
    pub range_ratio: f64,
    pub sessions: usize,
    pub turns: usize,
    pub agent_prefix_len: usize,
    pub turn_input_len: usize,
    pub seed: u64,
    /// Ids are drawn uniformly from `[LOWEST_TOKEN_ID, vocab_size)`.
    pub vocab_size: usize,
}

/// One session: a single request for `fixed`/`random`, several dependent turns for `agent`.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionPlan {
    /// The first turn's prompt.
    pub first_prompt: Vec<u32>,
    /// The new user tokens of turns 2, 3, ... (one entry fewer than turns).
    pub later_inputs: Vec<Vec<u32>>,
    /// Output tokens asked for at each turn.
    pub output_lens: Vec<usize>,
    /// Seeded reply tokens, one list per turn, for servers that do not return token ids.
    pub stand_in_replies: Vec<Vec<u32>>,
}

impl SessionPlan {
    pub fn turns(&self) -> usize {
        self.output_lens.len()
    }

    /// Turn `turn + 1`'s prompt: turn `turn`'s whole prompt, its reply, then the new user
    /// tokens. `None` after the last turn.
    pub fn next_prompt(&self, turn: usize, prompt: &[u32], reply: &[u32]) -> Option<Vec<u32>> {
        let new_input = self.later_inputs.get(turn)?;
        let mut next = Vec::with_capacity(prompt.len() + reply.len() + new_input.len());
        next.extend_from_slice(prompt);
        next.extend_from_slice(reply);
        next.extend_from_slice(new_input);
        Some(next)
    }
}

/// The sessions of one workload, identical on every run that uses the same spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub spec: WorkloadSpec,
    pub sessions: Vec<SessionPlan>,
}

impl WorkloadSpec {
    /// Checks the flags; the message names the offending one.
    pub fn validate(&self) -> Result<(), String> {
        if self.vocab_size <= LOWEST_TOKEN_ID as usize {
            return Err(format!(
                "--vocab-size must exceed {LOWEST_TOKEN_ID} (ids are drawn from [{LOWEST_TOKEN_ID}, vocab))"
            ));
        }
        if self.output_len == 0 {
            return Err("--output-len must be at least 1".into());
        }
        match self.kind {
            WorkloadKind::Fixed | WorkloadKind::Random => {
                if self.input_len == 0 {
                    return Err("--input-len must be at least 1".into());
                }
                if self.num_prompts == 0 {
                    return Err("--num-prompts must be at least 1".into());
                }
                if !(0.0..1.0).contains(&self.range_ratio) {
                    return Err(format!("--range-ratio must be in [0, 1), got {}", self.range_ratio));
                }
            }
            WorkloadKind::Agent => {
                if self.sessions == 0 || self.turns == 0 {
                    return Err("--sessions and --turns must be at least 1".into());
                }
                if self.agent_prefix_len + self.turn_input_len == 0 {
                    return Err("--agent-prefix-len + --turn-input-len must be at least 1".into());
                }
            }
        }
        Ok(())
    }

    /// Prompt tokens of the longest request, assuming every reply has its full length.
    pub fn max_prompt_len(&self) -> usize {
        match self.kind {
            WorkloadKind::Fixed => self.input_len,
            WorkloadKind::Random => scaled_max(self.input_len, self.range_ratio),
            WorkloadKind::Agent => {
                self.agent_prefix_len + self.turns * self.turn_input_len + (self.turns - 1) * self.output_len
            }
        }
    }

    /// Output tokens of the longest request.
    pub fn max_output_len(&self) -> usize {
        match self.kind {
            WorkloadKind::Random => scaled_max(self.output_len, self.range_ratio),
            _ => self.output_len,
        }
    }
}

fn scaled_max(mean: usize, ratio: f64) -> usize {
    ((mean as f64 * (1.0 + ratio)).floor() as usize).max(1)
}

/// A length uniform in `[mean*(1-r), mean*(1+r)]`, at least 1.
fn draw_len(rng: &mut ChaCha8Rng, mean: usize, ratio: f64) -> usize {
    let lo = ((mean as f64 * (1.0 - ratio)).ceil() as usize).max(1);
    let hi = scaled_max(mean, ratio).max(lo);
    rng.random_range(lo..=hi)
}

fn draw_ids(rng: &mut ChaCha8Rng, n: usize, vocab_size: usize) -> Vec<u32> {
    (0..n)
        .map(|_| rng.random_range(LOWEST_TOKEN_ID..vocab_size as u32))
        .collect()
}

impl Workload {
    /// Draws every prompt from `spec.seed` (call `spec.validate()` first).
    pub fn generate(spec: &WorkloadSpec) -> Workload {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let vocab = spec.vocab_size;
        let single = |rng: &mut ChaCha8Rng, input_len: usize, output_len: usize| SessionPlan {
            first_prompt: draw_ids(rng, input_len, vocab),
            later_inputs: vec![],
            output_lens: vec![output_len],
            stand_in_replies: vec![draw_ids(rng, output_len, vocab)],
        };
        let sessions = match spec.kind {
            WorkloadKind::Fixed => (0..spec.num_prompts)
                .map(|_| single(&mut rng, spec.input_len, spec.output_len))
                .collect(),
            WorkloadKind::Random => (0..spec.num_prompts)
                .map(|_| {
                    let input_len = draw_len(&mut rng, spec.input_len, spec.range_ratio);
                    let output_len = draw_len(&mut rng, spec.output_len, spec.range_ratio);
                    single(&mut rng, input_len, output_len)
                })
                .collect(),
            WorkloadKind::Agent => {
                let prefix = draw_ids(&mut rng, spec.agent_prefix_len, vocab);
                (0..spec.sessions)
                    .map(|_| {
                        let mut first_prompt = prefix.clone();
                        first_prompt.extend(draw_ids(&mut rng, spec.turn_input_len, vocab));
                        SessionPlan {
                            first_prompt,
                            later_inputs: (1..spec.turns)
                                .map(|_| draw_ids(&mut rng, spec.turn_input_len, vocab))
                                .collect(),
                            output_lens: vec![spec.output_len; spec.turns],
                            stand_in_replies: (0..spec.turns)
                                .map(|_| draw_ids(&mut rng, spec.output_len, vocab))
                                .collect(),
                        }
                    })
                    .collect()
            }
        };
        Workload {
            spec: spec.clone(),
            sessions,
        }
    }

    /// Requests in all (every turn of every session).
    pub fn num_requests(&self) -> usize {
        self.sessions.iter().map(SessionPlan::turns).sum()
    }

    /// Output tokens asked for in all.
    pub fn expected_output_tokens(&self) -> usize {
        self.sessions.iter().flat_map(|s| s.output_lens.iter()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: WorkloadKind) -> WorkloadSpec {
        WorkloadSpec {
            kind,
            input_len: 20,
            output_len: 8,
            num_prompts: 50,
            range_ratio: 0.5,
            sessions: 3,
            turns: 4,
            agent_prefix_len: 30,
            turn_input_len: 5,
            seed: 7,
            vocab_size: 100,
        }
    }

    #[test]
    fn fixed_prompts_have_the_asked_lengths_and_safe_ids() {
        let w = Workload::generate(&spec(WorkloadKind::Fixed));
        assert_eq!(w.num_requests(), 50);
        assert_eq!(w.expected_output_tokens(), 50 * 8);
        for s in &w.sessions {
            assert_eq!(s.first_prompt.len(), 20);
            assert!(s.first_prompt.iter().all(|&t| (LOWEST_TOKEN_ID..100).contains(&t)));
        }
        assert_eq!(w, Workload::generate(&spec(WorkloadKind::Fixed)), "seeded");
        let mut other = spec(WorkloadKind::Fixed);
        other.seed = 8;
        assert_ne!(w, Workload::generate(&other));
    }

    #[test]
    fn random_lengths_stay_in_range_and_vary() {
        let w = Workload::generate(&spec(WorkloadKind::Random));
        let lens: Vec<usize> = w.sessions.iter().map(|s| s.first_prompt.len()).collect();
        assert!(lens.iter().all(|&l| (10..=30).contains(&l)), "{lens:?}");
        assert!(lens.iter().any(|&l| l != lens[0]));
        assert!(w.sessions.iter().all(|s| (4..=12).contains(&s.output_lens[0])));
        assert_eq!(
            w.expected_output_tokens(),
            w.sessions.iter().map(|s| s.output_lens[0]).sum::<usize>()
        );
    }

    #[test]
    fn agent_turns_grow_by_previous_prompt_plus_reply_plus_new_input() {
        let sp = spec(WorkloadKind::Agent);
        let w = Workload::generate(&sp);
        assert_eq!(w.num_requests(), 12);
        let prefix = &w.sessions[0].first_prompt[..30];
        for s in &w.sessions {
            assert_eq!(&s.first_prompt[..30], prefix, "shared system prefix");
            assert_eq!(s.first_prompt.len(), 35);
            assert_eq!(s.turns(), 4);
            let mut prompt = s.first_prompt.clone();
            for turn in 0..4 {
                let reply = &s.stand_in_replies[turn];
                assert_eq!(reply.len(), 8);
                match s.next_prompt(turn, &prompt, reply) {
                    Some(next) => {
                        assert_eq!(next.len(), prompt.len() + 8 + 5);
                        assert_eq!(&next[..prompt.len()], &prompt[..]);
                        assert_eq!(&next[prompt.len()..prompt.len() + 8], &reply[..]);
                        prompt = next;
                    }
                    None => assert_eq!(turn, 3),
                }
            }
            assert_eq!(prompt.len(), sp.max_prompt_len());
        }
        assert_ne!(w.sessions[0].first_prompt, w.sessions[1].first_prompt);
    }

    #[test]
    fn bad_flags_are_named() {
        let mut s = spec(WorkloadKind::Fixed);
        s.num_prompts = 0;
        assert!(s.validate().unwrap_err().contains("--num-prompts"));
        let mut s = spec(WorkloadKind::Random);
        s.range_ratio = 1.5;
        assert!(s.validate().unwrap_err().contains("--range-ratio"));
        let mut s = spec(WorkloadKind::Agent);
        s.vocab_size = 5;
        assert!(s.validate().unwrap_err().contains("--vocab-size"));
    }
}

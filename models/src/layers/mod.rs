//! Building blocks shared by every model family: one implementation each.

pub mod attention;
pub mod dsa;
pub mod gqa;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod vocab;

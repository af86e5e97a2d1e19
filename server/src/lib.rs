//! The `moe` command-line tool and OpenAI-compatible server as a library: the binary in
//! `main.rs` is a thin wrapper, and the fuzz targets and tests reach the request parsing and
//! chat templates through here.

pub mod agent;
pub mod bench;
pub mod chat_template;
pub mod cli;
pub mod energy;
pub mod serve;

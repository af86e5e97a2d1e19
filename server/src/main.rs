//! The `moe` binary: parses the command line and dispatches to a subcommand. Errors are
//! printed as one readable chain on stderr with a non-zero exit code, never a panic trace.

use clap::Parser;
use moe_server::cli;

fn main() {
    restore_default_sigpipe();
    let args = cli::Cli::parse();
    let serving = matches!(args.command, cli::Command::Serve(_));
    cli::init_logging(args.verbose + u8::from(serving));
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Rust ignores SIGPIPE, which turns `moe inspect | head` into a panic on the closed pipe;
/// the default action ends the process quietly, as command-line tools do.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

//! The `moe` binary: parses the command line and dispatches to a subcommand. Errors are
//! printed as one readable chain on stderr with a non-zero exit code, never a panic trace.

mod bench;
mod chat_template;
mod cli;
mod serve;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    let serving = matches!(args.command, cli::Command::Serve(_));
    cli::init_logging(args.verbose + u8::from(serving));
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

//! `ferroplane-lvol-check`: checks the lvol store on a file or block device
//! with plain std I/O (the target need not run; nothing is written).
//!
//! It reads the store's newest superblock, its checkpoint and its log the
//! way a load does (the parsing is the bdev crate's own,
//! `bdev::module::lvol`), then reports leaked or doubly-owned clusters,
//! clusters beyond the store, broken parent links (missing, not read-only,
//! cycles), bad CRCs, and, as notes, what a crash normally leaves (a torn
//! superblock copy, where the log ends).
//!
//! Exit status: 0 when no error was found (notes are fine); 1 when the
//! metadata has errors or cannot be loaded; 2 on a command-line error or
//! when the file cannot be read.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ferroplane-lvol-check",
    about = "Check an lvol store on a file or block device"
)]
struct Args {
    /// The file or block device holding the lvol store.
    path: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let report = match bdev::module::lvol::check::check_file(&args.path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferroplane-lvol-check: {}: {e}", args.path.display());
            return ExitCode::from(2);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report.to_json()) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferroplane-lvol-check: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        println!("{report}");
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

//! One file per verb of the command line; each parses its arguments and
//! calls the library. `run` returns the process exit code.

pub mod create;
pub mod delete;
pub mod exec;
pub mod kill;
pub mod list;
pub mod pause;
pub mod ps;
pub mod run;
pub mod start;
pub mod state;
pub mod update;

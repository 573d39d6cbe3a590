//! `list`: the containers under the state root, as a table or JSON.

use std::path::Path;

use keelson_runtime::Container;

/// Output formats of `list` and `ps`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// JSON.
    Json,
}

/// Arguments of `list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Print only the ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Runs `list`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<u8> {
    let states: Vec<_> = Container::list(root)?
        .iter()
        .map(Container::oci_state)
        .collect();
    if args.quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(0);
    }
    match args.format {
        Format::Json => println!("{}", serde_json::to_string(&states)?),
        Format::Table => {
            println!(
                "{:<24} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for s in &states {
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {}",
                    s.id,
                    s.pid.unwrap_or(0),
                    s.status,
                    s.bundle.display(),
                    s.created.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(0)
}

//! `keelson`: the cluster administrator's command line (beside `kubectl`).
//!
//! ```text
//! keelson token create --ttl 1h --description "rack 3"   # prints <id>.<secret>
//! keelson token list
//! keelson token delete <id>
//! ```
//! It talks to the API with an admin kubeconfig (`--kubeconfig`, else `$KUBECONFIG`, else
//! `~/.kube/config`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use keelson_api_types::bootstrap_token::{BootstrapToken, TokenOptions, bootstrap_kubeconfig};
use keelson_server::tokens;
use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Parser)]
#[command(name = "keelson", version, about = "Keelson cluster administration")]
struct Cli {
    /// Admin kubeconfig (default: `$KUBECONFIG`, then `~/.kube/config`).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bootstrap tokens, with which new nodes join.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (`<id>.<secret>`).
    Create {
        /// How long the token is valid (e.g. 30m, 1h, 2d; 0: forever).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
        /// A note shown by `keelson token list`.
        #[arg(long)]
        description: Option<String>,
        /// Also write a bootstrap kubeconfig (server and CA of this kubeconfig, the new
        /// token) for `keelson-agent node --bootstrap-kubeconfig`.
        #[arg(long)]
        write_kubeconfig: Option<PathBuf>,
    },
    /// List the tokens (never their secrets).
    List,
    /// Delete tokens by id (or whole token).
    Delete {
        /// Token ids or tokens.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// `30s`, `15m`, `1h`, `2d` or plain seconds.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("bad unit in {s:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn read_kubeconfig(path: Option<&Path>) -> Result<Kubeconfig> {
    match path {
        Some(p) => Kubeconfig::read_from(p).with_context(|| format!("reading {}", p.display())),
        None => {
            Kubeconfig::read().context("reading the kubeconfig ($KUBECONFIG or ~/.kube/config)")
        }
    }
}

async fn client(kubeconfig: &Kubeconfig) -> Result<kube::Client> {
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default())
            .await
            .context("loading the kubeconfig")?;
    kube::Client::try_from(config).context("building the API client")
}

/// The current context's server URL and CA (PEM).
fn server_and_ca(kubeconfig: &Kubeconfig) -> Result<(String, String)> {
    use base64::Engine as _;
    let context_name = kubeconfig
        .current_context
        .as_deref()
        .context("the kubeconfig has no current-context")?;
    let context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .with_context(|| format!("context {context_name:?} not found"))?;
    let cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.as_ref())
        .with_context(|| format!("cluster {:?} not found", context.cluster))?;
    let server = cluster
        .server
        .clone()
        .context("the cluster has no server")?;
    let ca = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .context("certificate-authority-data is not base64")?,
        )
        .context("certificate-authority-data is not PEM text")?,
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
        }
        (None, None) => anyhow::bail!("the cluster has no certificate authority"),
    };
    Ok((server, ca))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let kubeconfig = read_kubeconfig(cli.kubeconfig.as_deref())?;
    let client = client(&kubeconfig).await?;
    match cli.command {
        Command::Token(TokenCommand::Create {
            ttl,
            description,
            write_kubeconfig,
        }) => {
            let opts = TokenOptions {
                expiration: tokens::expiration(jiff::Timestamp::now(), ttl),
                description,
                extra_groups: Vec::new(),
            };
            let token: BootstrapToken = tokens::create(&client, &opts).await?;
            if let Some(path) = write_kubeconfig {
                let (server, ca) = server_and_ca(&kubeconfig)?;
                write_private(&path, &bootstrap_kubeconfig(&server, &ca, &token))?;
            }
            println!("{token}");
        }
        Command::Token(TokenCommand::List) => {
            let list = tokens::list(&client).await?;
            print!("{}", tokens::table(&list, jiff::Timestamp::now()));
        }
        Command::Token(TokenCommand::Delete { ids }) => {
            for id in ids {
                tokens::delete(&client, &id).await?;
                println!(
                    "bootstrap token {:?} deleted",
                    id.split('.').next().unwrap_or(&id)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("0"), Ok(Duration::ZERO));
        assert!(parse_ttl("1w").is_err());
    }
}

//! `keelson-agent image`: the node's image store — import OCI layouts or `docker save`
//! archives, pull from a registry, list what is there, remove unused images.

use std::path::PathBuf;

use anyhow::Context as _;
use keelson_agent::image::{ImageStore, PullConfig, Puller, RegistryAuth, gc};
use keelson_agent::pods::StateLayout;

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Import an OCI image layout (directory or tar) or a docker save archive.
    Import {
        /// The layout directory or archive.
        path: PathBuf,
        /// Store the image under this name (default: the names the source carries).
        #[arg(long)]
        name: Option<String>,
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/keelson")]
        state_dir: PathBuf,
    },
    /// Pull an image from a registry (anonymously, or with --username/--password).
    Pull {
        /// The image reference, e.g. `registry.example:5000/app:1`.
        reference: String,
        /// A registry (`host:port`) to speak plain HTTP to instead of HTTPS; repeatable.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// User name for the registry.
        #[arg(long, requires = "password")]
        username: Option<String>,
        /// Password for the registry (or the KEELSON_REGISTRY_PASSWORD environment variable).
        #[arg(long, env = "KEELSON_REGISTRY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/keelson")]
        state_dir: PathBuf,
    },
    /// Remove every image no container on this node uses, with the blobs and layers no
    /// remaining image shares.
    Prune {
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/keelson")]
        state_dir: PathBuf,
    },
    /// List the images in the store.
    Ls {
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/keelson")]
        state_dir: PathBuf,
    },
}

impl ImageCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            ImageCommand::Import {
                path,
                name,
                state_dir,
            } => {
                let store = ImageStore::open(StateLayout::new(state_dir).images())?;
                let imported = store
                    .import(&path, name.as_deref())
                    .with_context(|| format!("importing {}", path.display()))?;
                for (name, digest) in imported {
                    println!("{name}\t{digest}");
                }
                Ok(())
            }
            ImageCommand::Pull {
                reference,
                insecure_registries,
                username,
                password,
                state_dir,
            } => {
                let store = ImageStore::open(StateLayout::new(state_dir).images())?;
                let auth = match (username, password) {
                    (Some(u), Some(p)) => RegistryAuth::Basic(u, p),
                    _ => RegistryAuth::Anonymous,
                };
                let puller = Puller::new(
                    store,
                    &PullConfig {
                        insecure_registries,
                    },
                );
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?;
                let pulled = runtime
                    .block_on(puller.pull(&reference, &auth))
                    .with_context(|| format!("pulling {reference}"))?;
                println!(
                    "{}\t{}\t{} bytes ({} fetched) in {:.1?}",
                    keelson_agent::image::normalize_ref(&reference),
                    pulled.digest,
                    pulled.size,
                    pulled.fetched,
                    pulled.elapsed
                );
                Ok(())
            }
            ImageCommand::Prune { state_dir } => {
                let layout = StateLayout::new(state_dir);
                let store = ImageStore::open(layout.images())?;
                let in_use = gc::digests_in_use(&layout.pods());
                let report = store.prune(&in_use).context("pruning images")?;
                for (names, digest) in &report.removed {
                    let names = if names.is_empty() {
                        "<none>".to_owned()
                    } else {
                        names.join(",")
                    };
                    println!("deleted\t{names}\t{digest}");
                }
                println!(
                    "{} images removed, {} bytes freed",
                    report.removed.len(),
                    report.freed_bytes
                );
                Ok(())
            }
            ImageCommand::Ls { state_dir } => {
                let store = ImageStore::open(StateLayout::new(state_dir).images())?;
                println!("{:<50} {:<72} SIZE", "NAME", "DIGEST");
                for e in store.list()? {
                    println!("{:<50} {:<72} {}", e.name, e.digest, e.size);
                }
                Ok(())
            }
        }
    }
}

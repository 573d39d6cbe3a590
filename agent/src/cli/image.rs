//! `keelson-agent image`: the node's image store — import OCI layouts or `docker save`
//! archives, list what is there.

use std::path::PathBuf;

use anyhow::Context as _;
use keelson_agent::image::ImageStore;
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

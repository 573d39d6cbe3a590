//! `keelson-agent lb …`: attach, program and inspect the service load balancer by hand.

use std::{net::SocketAddrV4, path::PathBuf};

use anyhow::Context as _;
use keelson_agent::lb::{self, Algorithm, AttachOutcome, Frontend, Pins, ServiceOptions};

/// Where the load balancer's programs and maps are pinned by default.
const DEFAULT_PINS: &str = "/sys/fs/bpf/keelson";

#[derive(clap::Args)]
pub struct PinArgs {
    /// bpffs directory holding the load balancer's pinned link and maps.
    #[arg(long = "bpffs", default_value = DEFAULT_PINS)]
    pub dir: PathBuf,
}

impl PinArgs {
    fn pins(&self) -> Pins {
        Pins::new(&self.dir)
    }
}

#[derive(clap::Subcommand)]
pub enum LbCommand {
    /// Load the programs and attach them to a cgroup2 directory; kept across agent restarts.
    Attach {
        /// cgroup2 directory whose processes get service load balancing (e.g. the node's
        /// subtree; `/sys/fs/cgroup` on a pure cgroup v2 host covers the whole machine).
        #[arg(long)]
        cgroup: PathBuf,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Create or replace a service: `lb set 10.96.0.10:80/tcp 10.244.0.5:8080 …`.
    /// With no backends, connects to the service are refused.
    Set {
        /// The frontend, `IPV4:PORT[/tcp|/udp]`.
        frontend: Frontend,
        /// The backends, `IPV4:PORT`.
        backends: Vec<SocketAddrV4>,
        /// How new clients pick a backend: `random` or `maglev`.
        #[arg(long, default_value = "random")]
        algorithm: Algorithm,
        /// Session affinity: a client keeps its backend until this many seconds after its
        /// last connection (`sessionAffinity: ClientIP`).
        #[arg(long, value_name = "SECONDS")]
        affinity_timeout: Option<u32>,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Remove a service.
    Delete {
        /// The frontend, `IPV4:PORT[/tcp|/udp]`.
        frontend: Frontend,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Print every service, its backends, how they are chosen and its counters.
    Dump {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Remove the pins, which detaches the programs and frees the maps.
    Detach {
        #[command(flatten)]
        pins: PinArgs,
    },
}

impl LbCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            LbCommand::Attach { cgroup, pins } => {
                match lb::attach(&cgroup, &pins.pins())
                    .with_context(|| format!("attaching to {}", cgroup.display()))?
                {
                    AttachOutcome::Attached => println!(
                        "attached the load balancer to {}; pinned under {}",
                        cgroup.display(),
                        pins.dir.display()
                    ),
                    AttachOutcome::AlreadyAttached => println!(
                        "already attached (pinned under {}); kept as it is",
                        pins.dir.display()
                    ),
                }
            }
            LbCommand::Set {
                frontend,
                backends,
                algorithm,
                affinity_timeout,
                pins,
            } => {
                let options = ServiceOptions {
                    algorithm,
                    affinity_timeout_secs: affinity_timeout,
                };
                lb::open(&pins.pins())?.upsert_with(frontend, &backends, options)?;
                println!(
                    "service {frontend}: {} backend(s), {options}",
                    backends.len()
                );
            }
            LbCommand::Delete { frontend, pins } => {
                if lb::open(&pins.pins())?.remove(frontend)? {
                    println!("service {frontend} removed");
                } else {
                    anyhow::bail!("service {frontend} does not exist");
                }
            }
            LbCommand::Dump { pins } => {
                let table = lb::open(&pins.pins())?;
                for info in table.details()? {
                    let list: Vec<String> = info.backends.iter().map(ToString::to_string).collect();
                    let list = if list.is_empty() {
                        "(no backends: connects refused)".to_owned()
                    } else {
                        list.join(" ")
                    };
                    println!("{} -> {list}", info.frontend);
                    let stats = info.stats.unwrap_or_default();
                    println!(
                        "    {}; connections {}, refused {}, affinity hits {}, drops {}",
                        info.options,
                        stats.connections,
                        stats.refused,
                        stats.affinity_hits,
                        stats.drops
                    );
                }
                println!(
                    "refused (port not exposed on a service IP): {}",
                    table.unexposed_refused()?
                );
                dump_nodeport(&pins.pins())?;
            }
            LbCommand::Detach { pins } => {
                let removed = lb::detach(&pins.pins())?;
                if removed.is_empty() {
                    println!("nothing pinned under {}", pins.dir.display());
                }
                for path in removed {
                    println!("removed {}", path.display());
                }
            }
        }
        Ok(())
    }
}

/// The NodePort path: its frontends for traffic from outside, the interfaces it is attached
/// to and the number of tracked flows.
fn dump_nodeport(pins: &Pins) -> anyhow::Result<()> {
    let Some(flows) = lb::conntrack_flows(pins)? else {
        return Ok(());
    };
    let interfaces = lb::tc_interfaces(pins)?;
    let frontends = lb::open_tc(pins)?.table.details()?;
    // Nothing to say when the NodePort path was never set up.
    if interfaces.is_empty() && frontends.is_empty() && flows == 0 {
        return Ok(());
    }
    let on = if interfaces.is_empty() {
        "not attached to any interface".to_owned()
    } else {
        format!("on {}", interfaces.join(", "))
    };
    println!("nodePort/externalIP frontends for traffic from outside ({on}):");
    for info in frontends {
        let list: Vec<String> = info.backends.iter().map(ToString::to_string).collect();
        let list = if list.is_empty() {
            "(no backends here: dropped)".to_owned()
        } else {
            list.join(" ")
        };
        println!("  {} -> {list}", info.frontend);
        let stats = info.stats.unwrap_or_default();
        println!(
            "      {}; connections {}, affinity hits {}, packets {}, drops {}",
            info.options, stats.connections, stats.affinity_hits, stats.packets, stats.drops
        );
    }
    println!("conntrack: {flows} flow(s)");
    Ok(())
}

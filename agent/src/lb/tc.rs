//! The NodePort path: the tc programs (`nodeport_ingress`, `nodeport_egress`) on the node's
//! interfaces, their maps and their pins.
//!
//! The programs come from the same object as the socket programs and share its pinned maps.
//! Each is attached as a TCX link (Linux 6.6 or later), pinned as
//! `tc-ingress_v<N>@<interface>:<ifindex>` / `tc-egress_v<N>@…` beside the other pins: the
//! programs stay attached while the agent restarts, attaching again keeps what is pinned, and
//! removing the pins detaches them.
//!
//! Upgrades, as on the socket path: the pins carry [`TC_LINK_VERSION`]; an agent whose
//! programs are newer attaches its own in front of the pinned ones (TCX runs links in order,
//! and ours end the chain, so the new ones take over at once, sharing the conntrack maps) and
//! then unpins the old links. Pinned maps of another layout are recreated before loading.

use std::{mem::size_of, path::PathBuf};

use aya::{
    EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions},
};
use keelson_ebpf_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, CtEntry, CtKey, MaglevTable, NP_ADDRS_MAP,
    NP_AFFINITY_MAP, NP_BACKENDS_MAP, NP_CT_MAP, NP_LOCAL_MAP, NP_MAGLEV_MAP, NP_REV_MAP,
    NP_SERVICES_MAP, NP_STATS_MAP, NP_SVC_CONFIG_MAP, RevEntry, ServiceConfig, ServiceEntry,
    ServiceKey, ServiceStats,
};

use super::{
    bpffs::{ensure_dir, io_err},
    error::{Error, Result},
    loader::{
        KernelSelectionMaps, KernelServiceTable, OBJECT, Pins, open_hash_map, open_maglev_tables,
        open_per_cpu_hash_map, replace_mismatched_maps,
    },
    selection::{SelectionMaps, SummedPerCpu},
    table::ServiceTable,
};

/// The maps of the NodePort path, pinned by name, with their key and value sizes.
pub(super) const MAPS: [(&str, usize, usize); 10] = [
    (
        NP_SERVICES_MAP,
        size_of::<ServiceKey>(),
        size_of::<ServiceEntry>(),
    ),
    (
        NP_BACKENDS_MAP,
        size_of::<BackendKey>(),
        size_of::<Backend>(),
    ),
    (NP_ADDRS_MAP, size_of::<u32>(), size_of::<u32>()),
    (NP_LOCAL_MAP, size_of::<u32>(), size_of::<u32>()),
    (NP_CT_MAP, size_of::<CtKey>(), size_of::<CtEntry>()),
    (NP_REV_MAP, size_of::<CtKey>(), size_of::<RevEntry>()),
    (
        NP_SVC_CONFIG_MAP,
        size_of::<u32>(),
        size_of::<ServiceConfig>(),
    ),
    (NP_MAGLEV_MAP, size_of::<u32>(), size_of::<MaglevTable>()),
    (
        NP_AFFINITY_MAP,
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
    ),
    (NP_STATS_MAP, size_of::<u32>(), size_of::<ServiceStats>()),
];
/// Prefix of the tc link pins.
const LINK_PREFIX: &str = "tc-";
/// Version of the tc programs' link pins; raise it whenever the tc programs change behaviour
/// or start using other maps. Version 1 pinned `tc-<direction>@…`; version 2 selects backends
/// as the socket path does and counts packets and drops; version 3 reads Maglev tables from an
/// array of whole tables; version 4 SNATs flows to a backend behind another device (the VXLAN
/// overlay) to the node's address towards the client.
pub const TC_LINK_VERSION: u32 = 4;

/// The two tc programs and where each is attached.
const PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("nodeport_ingress", TcAttachType::Ingress, "ingress"),
    ("nodeport_egress", TcAttachType::Egress, "egress"),
];

/// `tc-<direction>_v<version>@<interface>:<ifindex>`: with the index, a pin left from an
/// interface that has since been deleted and made again (whose link died with it) is told
/// from a live one.
fn link_pin(pins: &Pins, direction: &str, interface: &str, ifindex: u32) -> PathBuf {
    pins.dir().join(format!(
        "{LINK_PREFIX}{direction}_v{TC_LINK_VERSION}@{interface}:{ifindex}"
    ))
}

/// The interface a link pin's file name names.
fn pin_interface(file_name: &str) -> Option<&str> {
    let (_, rest) = file_name.strip_prefix(LINK_PREFIX)?.split_once('@')?;
    Some(
        rest.rsplit_once(':')
            .map_or(rest, |(interface, _)| interface),
    )
}

/// The interface's index in the caller's network namespace.
fn ifindex(interface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(interface).map_err(|e| {
        io_err(
            "find the interface",
            PathBuf::from(format!("/sys/class/net/{interface}")),
            e.into(),
        )
    })
}

/// Removes pins of `interface` other than `keep`: pins made for another index of it (their
/// links went with the interface they were attached to) and links of older versions.
fn remove_stale_pins(pins: &Pins, interface: &str, keep: &[PathBuf]) -> Result<()> {
    for path in link_pins(pins)? {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if pin_interface(name) == Some(interface) && !keep.contains(&path) {
            std::fs::remove_file(&path).map_err(|e| io_err("remove stale pin", path.clone(), e))?;
            tracing::info!(pin = %path.display(), "removed the pin of an older or vanished link");
        }
    }
    Ok(())
}

/// Attaches the NodePort programs to the ingress and egress of each of `interfaces` (in the
/// caller's network namespace) and pins the links under `pins`; links already pinned are
/// kept, so established flows are not disturbed by an agent restart.
///
/// Requires Linux 6.6 or later (TCX links) and, for SNAT, 6.7 (`BPF_FIB_LOOKUP_SRC`).
///
/// # Errors
/// The pin directory is not on a bpffs, an interface does not exist, or the kernel refuses
/// to load or attach a program.
pub fn attach_tc(pins: &Pins, interfaces: &[String]) -> Result<()> {
    ensure_dir(pins.dir())?;
    let mut missing = Vec::new();
    let mut keep = Vec::new();
    for interface in interfaces {
        let index = ifindex(interface)?;
        let wanted = PROGRAMS.map(|(_, _, dir)| link_pin(pins, dir, interface, index));
        for ((program, attach_type, _), pin) in PROGRAMS.into_iter().zip(wanted.clone()) {
            if !pin.exists() {
                missing.push((program, attach_type, interface, pin));
            }
        }
        keep.push((interface, wanted));
    }
    if !missing.is_empty() {
        attach_missing(pins, missing)?;
    }
    // Only now, with the new links in front: the older links and those of vanished
    // interfaces go.
    for (interface, wanted) in keep {
        remove_stale_pins(pins, interface, &wanted)?;
    }
    Ok(())
}

/// Loads the object and attaches and pins the `missing` (program, direction, interface,
/// pin) links, each in front of any link already on that hook.
fn attach_missing(
    pins: &Pins,
    missing: Vec<(&'static str, TcAttachType, &String, PathBuf)>,
) -> Result<()> {
    replace_mismatched_maps(pins)?;
    // The maps are pinned in the object: shared with the socket programs.
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.dir())
        .load(OBJECT)?;
    for (name, attach_type, interface, pin) in missing {
        let program_err = |op| {
            move |source| Error::Program {
                program: name,
                op,
                source,
            }
        };
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram { program: name })?
            .try_into()
            .map_err(program_err("cast"))?;
        if program.fd().is_err() {
            program.load().map_err(program_err("load"))?;
        }
        let link_id = program
            .attach_with_options(
                interface,
                attach_type,
                // First: an older agent's link on this hook ends the chain for the packets
                // it handles, so the new one must run before it until it is unpinned.
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(program_err("attach (TCX, Linux 6.6+)"))?;
        let link = program
            .take_link(link_id)
            .map_err(program_err("take link"))?;
        let link: FdLink = link.try_into().map_err(|source| Error::Link {
            program: name,
            source,
        })?;
        link.pin(&pin)
            .map_err(|source| Error::Pin { path: pin, source })?;
        tracing::info!(program = name, interface, "NodePort program attached");
    }
    Ok(())
}

/// The interfaces the NodePort programs are pinned on.
///
/// # Errors
/// The pin directory cannot be read.
pub fn tc_interfaces(pins: &Pins) -> Result<Vec<String>> {
    let mut out: Vec<String> = link_pins(pins)?
        .iter()
        .filter_map(|p| pin_interface(p.file_name()?.to_str()?).map(str::to_owned))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

fn link_pins(pins: &Pins) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(pins.dir()) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read", pins.dir().into(), e)),
    };
    Ok(entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(LINK_PREFIX))
        })
        .collect())
}

/// Removes the tc link pins (detaching the programs) and the NodePort maps' pins; returns
/// what was removed.
///
/// # Errors
/// A pin exists but cannot be removed.
pub(super) fn detach_tc(pins: &Pins) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let maps = MAPS.iter().map(|(m, _, _)| pins.dir().join(m));
    for path in link_pins(pins)?.into_iter().chain(maps) {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove pin", path, e)),
        }
    }
    Ok(removed)
}

/// The NodePort path's pinned maps, opened.
pub struct PacketMapsPinned {
    /// External frontends and their backends for packets from outside.
    pub table: KernelServiceTable,
    /// This node's endpoint addresses.
    pub local: BpfHashMap<MapData, u32, u32>,
}

/// Opens the NodePort path's pinned maps.
///
/// # Errors
/// The maps are not pinned (no program loaded yet) or cannot be opened.
pub fn open_tc(pins: &Pins) -> Result<PacketMapsPinned> {
    let path = |name: &str| pins.dir().join(name);
    let selection: KernelSelectionMaps = SelectionMaps {
        config: open_hash_map(&path(NP_SVC_CONFIG_MAP))?,
        maglev: open_maglev_tables(&path(NP_MAGLEV_MAP))?,
        stats: SummedPerCpu(open_per_cpu_hash_map(&path(NP_STATS_MAP))?),
    };
    Ok(PacketMapsPinned {
        table: ServiceTable::new(
            open_hash_map(&path(NP_SERVICES_MAP))?,
            open_hash_map(&path(NP_BACKENDS_MAP))?,
            open_hash_map(&path(NP_ADDRS_MAP))?,
            Box::new(selection),
        )?,
        local: open_hash_map(&path(NP_LOCAL_MAP))?,
    })
}

/// Whether the NodePort path's maps are pinned (any agent of this version that attached the
/// load balancer pinned them, with or without NodePort interfaces).
pub fn tc_maps_pinned(pins: &Pins) -> bool {
    MAPS.iter()
        .all(|(name, _, _)| pins.dir().join(name).exists())
}

/// Number of flows in the NodePort conntrack map (`None` when it is not pinned).
///
/// # Errors
/// The map exists but cannot be read.
pub fn conntrack_flows(pins: &Pins) -> Result<Option<usize>> {
    let path = pins.dir().join(NP_CT_MAP);
    if !path.exists() {
        return Ok(None);
    }
    let map: BpfHashMap<MapData, CtKey, CtEntry> = open_hash_map(&path)?;
    let mut count = 0;
    for key in map.keys() {
        // A key evicted between two steps of the walk ends it early; the count is a snapshot.
        if key.is_err() {
            break;
        }
        count += 1;
    }
    Ok(Some(count))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn link_pins_name_direction_and_interface() {
        let pins = Pins::new("/sys/fs/bpf/keelson");
        assert_eq!(
            link_pin(&pins, "ingress", "eth0", 2),
            Path::new("/sys/fs/bpf/keelson/tc-ingress_v4@eth0:2")
        );
        assert_eq!(pin_interface("tc-ingress_v3@eth0:2"), Some("eth0"));
        // Version 1's pins are still recognised, so an upgrade removes them.
        assert_eq!(pin_interface("tc-ingress@eth0:2"), Some("eth0"));
        assert_eq!(pin_interface("tc-egress@bond0.100:7"), Some("bond0.100"));
        assert_eq!(pin_interface("SERVICES"), None);
    }

    #[test]
    fn pins_of_a_recreated_interface_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(dir.path());
        let old = link_pin(&pins, "ingress", "eth0", 3);
        let older_version = dir.path().join("tc-ingress@eth0:9");
        let other = link_pin(&pins, "ingress", "eth1", 3);
        for p in [&old, &older_version, &other] {
            std::fs::write(p, "").unwrap();
        }
        let current = link_pin(&pins, "ingress", "eth0", 9);
        remove_stale_pins(&pins, "eth0", std::slice::from_ref(&current)).unwrap();
        assert!(!old.exists());
        assert!(!older_version.exists(), "a link of version 1 is replaced");
        assert!(other.exists(), "another interface's pin is kept");
        assert_eq!(tc_interfaces(&pins).unwrap(), vec!["eth1".to_owned()]);
    }
}

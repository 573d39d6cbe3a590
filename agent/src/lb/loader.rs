//! Loading, attaching, pinning and detaching the load balancer's programs and maps.
//!
//! Everything lives under one bpffs directory: the maps (pinned by name by the loader) and one
//! link per program. Because the links are pinned, the programs stay attached when the agent
//! exits or restarts; removing the pins detaches them.
//!
//! Upgrades: link pins carry a version ([`LINK_VERSION`]). An agent whose programs differ from
//! the pinned ones attaches its own beside them (cgroup programs run in attach order, so the
//! old ones keep balancing meanwhile, into the shared maps) and then unpins the old links.
//! A pinned map whose type, key or value size differs from this build's is unpinned and
//! created afresh instead of being misread; the proxy refills it on its first sync (version 4
//! turned the Maglev hash maps into arrays of whole tables: their old pins go this way).

use std::{
    fs::File,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{HashMap as BpfHashMap, Map, MapData, MapInfo, MapType, PerCpuHashMap},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use keelson_ebpf_common::{
    AFFINITY_MAP, AffinityKey, AffinityValue, BACKENDS_MAP, Backend, BackendKey, MAGLEV_MAP,
    MaglevTable, REVNAT_MAP, RevNatKey, RevNatValue, SERVICES_MAP, STATS_MAP, SVC_CONFIG_MAP,
    ServiceConfig, ServiceEntry, ServiceKey, ServiceStats, VIPS_MAP,
};

use super::{
    bpffs::{ensure_dir, io_err},
    error::{Error, Result},
    maglev_tables::MmapTables,
    selection::{SelectionMaps, SummedPerCpu},
    table::ServiceTable,
};

/// The eBPF object built from `ebpf/programs` by the build script.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keelson-ebpf"));

/// The programs of the object, each attached to the cgroup and pinned as `<name>_v<version>` (bpffs refuses dots).
const PROGRAMS: [&str; 4] = ["connect4", "sendmsg4", "recvmsg4", "getpeername4"];
/// Version of the programs' link pins; raise it whenever the programs change behaviour or
/// start using other maps, so that an upgraded agent replaces the attached programs.
/// Version 1 pinned links under the bare program name; version 3 counts refusals as drops
/// in a larger counters value; version 4 reads Maglev tables from an array of whole tables.
pub const LINK_VERSION: u32 = 4;
/// The maps of the object, pinned by name, with their key and value sizes.
const MAPS: [(&str, usize, usize); 8] = [
    (
        SERVICES_MAP,
        size_of::<ServiceKey>(),
        size_of::<ServiceEntry>(),
    ),
    (BACKENDS_MAP, size_of::<BackendKey>(), size_of::<Backend>()),
    (VIPS_MAP, size_of::<u32>(), size_of::<u32>()),
    (REVNAT_MAP, size_of::<RevNatKey>(), size_of::<RevNatValue>()),
    (SVC_CONFIG_MAP, size_of::<u32>(), size_of::<ServiceConfig>()),
    (MAGLEV_MAP, size_of::<u32>(), size_of::<MaglevTable>()),
    (
        AFFINITY_MAP,
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
    ),
    (STATS_MAP, size_of::<u32>(), size_of::<ServiceStats>()),
];

/// Pin name of a program's link in this version.
fn link_name(program: &str) -> String {
    format!("{program}_v{LINK_VERSION}")
}

/// Pin names of links of older versions.
fn legacy_link_names(program: &str) -> impl Iterator<Item = String> {
    std::iter::once(program.to_owned())
        .chain((2..LINK_VERSION).map(move |v| format!("{program}_v{v}")))
}

/// The selection maps over the kernel maps.
pub type KernelSelectionMaps = SelectionMaps<
    BpfHashMap<MapData, u32, ServiceConfig>,
    MmapTables,
    SummedPerCpu<u32, ServiceStats>,
>;

/// A service table over the kernel maps.
pub type KernelServiceTable = ServiceTable<
    BpfHashMap<MapData, ServiceKey, ServiceEntry>,
    BpfHashMap<MapData, BackendKey, Backend>,
    BpfHashMap<MapData, u32, u32>,
>;

/// The pins of one load balancer instance under its bpffs directory.
#[derive(Clone, Debug)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    /// Pins under `dir`, e.g. `/sys/fs/bpf/keelson`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Pins { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// What [`attach`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// Programs were loaded, attached and pinned.
    Attached,
    /// Every program was already attached and pinned (e.g. after an agent restart); kept.
    AlreadyAttached,
}

/// Loads the load balancer, attaches its programs (`connect4`, `sendmsg4`, `recvmsg4`,
/// `getpeername4`) to the cgroup2 directory `cgroup` and pins links and maps under `pins`.
/// Idempotent: programs already pinned are kept, so established and new connections are not
/// disturbed by an agent restart.
///
/// Requires Linux 5.7 or later (BPF links for cgroups).
///
/// # Errors
/// The pin directory is not on a bpffs, the cgroup cannot be opened, or the kernel refuses to
/// load or attach a program.
pub fn attach(cgroup: &Path, pins: &Pins) -> Result<AttachOutcome> {
    ensure_dir(pins.dir())?;
    let missing: Vec<&str> = PROGRAMS
        .into_iter()
        .filter(|name| !pins.path(&link_name(name)).exists())
        .collect();
    if missing.is_empty() {
        open(pins)?.ensure_unexposed_counter()?;
        return Ok(AttachOutcome::AlreadyAttached);
    }
    let cgroup_dir = File::open(cgroup).map_err(|e| io_err("open cgroup", cgroup.into(), e))?;
    replace_mismatched_maps(pins)?;

    // Maps are declared `pinned` in the object: the loader reuses pins found in the directory
    // and pins new maps there, so every program shares the same maps.
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.dir())
        .load(OBJECT)?;
    for name in missing {
        attach_one(&mut ebpf, name, &cgroup_dir, &pins.path(&link_name(name)))?;
    }
    // The new programs run after any older ones; now the older ones can go.
    let legacy = remove_pins(pins, PROGRAMS.into_iter().flat_map(legacy_link_names))?;
    if !legacy.is_empty() {
        tracing::info!(
            links = legacy.len(),
            "replaced the programs of an older agent"
        );
    }
    open(pins)?.ensure_unexposed_counter()?;
    tracing::info!(cgroup = %cgroup.display(), pins = %pins.dir().display(), "load balancer attached");
    Ok(AttachOutcome::Attached)
}

/// Unpins maps of the object (socket and tc paths) whose type, key or value size is not this
/// build's, so the loader creates them anew instead of failing on them.
pub(super) fn replace_mismatched_maps(pins: &Pins) -> Result<()> {
    for (name, key_size, value_size) in MAPS.into_iter().chain(super::tc::MAPS) {
        let path = pins.path(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| Error::OpenPin {
            path: path.clone(),
            source,
        })?;
        // Only the Maglev maps are arrays (created mmapable by the loader, as declared).
        let array = matches!(info.map_type(), Ok(MapType::Array));
        let wants_array = is_maglev_map(name);
        if info.key_size() as usize != key_size
            || info.value_size() as usize != value_size
            || array != wants_array
        {
            tracing::warn!(
                map = name,
                pinned = ?(info.key_size(), info.value_size(), array),
                expected = ?(key_size, value_size, wants_array),
                "pinned map has another layout; replacing it"
            );
            std::fs::remove_file(&path).map_err(|e| io_err("remove pin", path, e))?;
        }
    }
    Ok(())
}

fn is_maglev_map(name: &str) -> bool {
    name == MAGLEV_MAP || name == keelson_ebpf_common::NP_MAGLEV_MAP
}

fn attach_one(ebpf: &mut Ebpf, name: &'static str, cgroup: &File, pin: &Path) -> Result<()> {
    let program_err = |op| {
        move |source| Error::Program {
            program: name,
            op,
            source,
        }
    };
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { program: name })?
        .try_into()
        .map_err(program_err("cast"))?;
    program.load().map_err(program_err("load"))?;
    // BPF links on a cgroup always coexist with other programs (the kernel attaches them as
    // "multi"); the link API wants no attach flags, which `Single` means here.
    let link_id = program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(program_err("attach"))?;
    let link = program
        .take_link(link_id)
        .map_err(program_err("take link"))?;
    let link: FdLink = link.try_into().map_err(|source| Error::Link {
        program: name,
        source,
    })?;
    link.pin(pin).map_err(|source| Error::Pin {
        path: pin.into(),
        source,
    })?;
    Ok(())
}

/// Opens the pinned maps of an attached load balancer as a service table.
///
/// # Errors
/// The maps are not pinned (nothing attached) or cannot be opened.
pub fn open(pins: &Pins) -> Result<KernelServiceTable> {
    let selection: KernelSelectionMaps = SelectionMaps {
        config: open_hash_map(&pins.path(SVC_CONFIG_MAP))?,
        maglev: open_maglev_tables(&pins.path(MAGLEV_MAP))?,
        stats: SummedPerCpu(open_per_cpu_hash_map(&pins.path(STATS_MAP))?),
    };
    ServiceTable::new(
        open_hash_map(&pins.path(SERVICES_MAP))?,
        open_hash_map(&pins.path(BACKENDS_MAP))?,
        open_hash_map(&pins.path(VIPS_MAP))?,
        Box::new(selection),
    )
}

fn open_map(path: &Path) -> Result<Map> {
    let open_err = |source| Error::OpenPin {
        path: path.into(),
        source,
    };
    let data = MapData::from_pin(path).map_err(open_err)?;
    Map::from_map_data(data).map_err(open_err)
}

/// Opens a pinned Maglev array map and maps it into memory.
pub(super) fn open_maglev_tables(path: &Path) -> Result<MmapTables> {
    let open_err = |source| Error::OpenPin {
        path: path.into(),
        source,
    };
    MmapTables::new(MapData::from_pin(path).map_err(open_err)?).map_err(open_err)
}

pub(super) fn open_hash_map<K: Pod, V: Pod>(path: &Path) -> Result<BpfHashMap<MapData, K, V>> {
    BpfHashMap::try_from(open_map(path)?).map_err(|source| Error::OpenPin {
        path: path.into(),
        source,
    })
}

pub(super) fn open_per_cpu_hash_map<K: Pod, V: Pod>(
    path: &Path,
) -> Result<PerCpuHashMap<MapData, K, V>> {
    PerCpuHashMap::try_from(open_map(path)?).map_err(|source| Error::OpenPin {
        path: path.into(),
        source,
    })
}

/// Removes the link and map pins, which detaches the program once no process holds it.
/// Returns the pins that were removed; removing nothing is not an error.
///
/// # Errors
/// A pin exists but cannot be removed.
pub fn detach(pins: &Pins) -> Result<Vec<PathBuf>> {
    let links = PROGRAMS
        .into_iter()
        .flat_map(|p| std::iter::once(link_name(p)).chain(legacy_link_names(p)));
    let maps = MAPS.into_iter().map(|(name, _, _)| name.to_owned());
    let mut removed = remove_pins(pins, links.chain(maps))?;
    removed.extend(super::tc::detach_tc(pins)?);
    // Leave the directory if something else is pinned there.
    let _ = std::fs::remove_dir(pins.dir());
    Ok(removed)
}

/// Removes the named pins that exist; returns their paths.
fn remove_pins(pins: &Pins, names: impl Iterator<Item = String>) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for path in names.map(|name| pins.path(&name)) {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove pin", path, e)),
        }
    }
    Ok(removed)
}

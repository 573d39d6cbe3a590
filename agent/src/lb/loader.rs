//! Loading, attaching, pinning and detaching the load balancer's programs and maps.
//!
//! Everything lives under one bpffs directory: the maps (pinned by name by the loader) and one
//! link per program. Because the links are pinned, the programs stay attached when the agent
//! exits or restarts; removing the pins detaches them.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use keelson_ebpf_common::{
    BACKENDS_MAP, Backend, BackendKey, REVNAT_MAP, SERVICES_MAP, ServiceEntry, ServiceKey, VIPS_MAP,
};

use super::{
    bpffs::{ensure_dir, io_err},
    error::{Error, Result},
    table::ServiceTable,
};

/// The eBPF object built from `ebpf/programs` by the build script.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keelson-ebpf"));

/// The programs of the object, each attached to the cgroup and pinned under its own name.
const PROGRAMS: [&str; 4] = ["connect4", "sendmsg4", "recvmsg4", "getpeername4"];
/// The maps of the object, pinned by name.
const MAPS: [&str; 4] = [SERVICES_MAP, BACKENDS_MAP, VIPS_MAP, REVNAT_MAP];

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
        .filter(|name| !pins.path(name).exists())
        .collect();
    if missing.is_empty() {
        return Ok(AttachOutcome::AlreadyAttached);
    }
    let cgroup_dir = File::open(cgroup).map_err(|e| io_err("open cgroup", cgroup.into(), e))?;

    // Maps are declared `pinned` in the object: the loader reuses pins found in the directory
    // and pins new maps there, so every program shares the same maps.
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.dir())
        .load(OBJECT)?;
    for name in missing {
        attach_one(&mut ebpf, name, &cgroup_dir, &pins.path(name))?;
    }
    tracing::info!(cgroup = %cgroup.display(), pins = %pins.dir().display(), "load balancer attached");
    Ok(AttachOutcome::Attached)
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
    ServiceTable::new(
        open_hash_map(&pins.path(SERVICES_MAP))?,
        open_hash_map(&pins.path(BACKENDS_MAP))?,
        open_hash_map(&pins.path(VIPS_MAP))?,
    )
}

pub(super) fn open_hash_map<K: Pod, V: Pod>(path: &Path) -> Result<BpfHashMap<MapData, K, V>> {
    let open_err = |source| Error::OpenPin {
        path: path.into(),
        source,
    };
    let data = MapData::from_pin(path).map_err(open_err)?;
    BpfHashMap::try_from(Map::from_map_data(data).map_err(open_err)?).map_err(open_err)
}

/// Removes the link and map pins, which detaches the program once no process holds it.
/// Returns the pins that were removed; removing nothing is not an error.
///
/// # Errors
/// A pin exists but cannot be removed.
pub fn detach(pins: &Pins) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for path in PROGRAMS.into_iter().chain(MAPS).map(|name| pins.path(name)) {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove pin", path, e)),
        }
    }
    removed.extend(super::tc::detach_tc(pins)?);
    // Leave the directory if something else is pinned there.
    let _ = std::fs::remove_dir(pins.dir());
    Ok(removed)
}

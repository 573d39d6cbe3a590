//! Loading, attaching, pinning and detaching the load balancer's programs and maps.
//!
//! Everything lives under one bpffs directory: the maps (pinned by name by the loader) and
//! the `cgroup/connect4` link. Because the link is pinned, the program stays attached when
//! the agent exits or restarts; removing the pins detaches it.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use keelson_ebpf_common::{
    BACKENDS_MAP, Backend, BackendKey, SERVICES_MAP, ServiceEntry, ServiceKey,
};

use super::{
    bpffs::{ensure_dir, io_err},
    error::{Error, Result},
    table::ServiceTable,
};

/// The eBPF object built from `ebpf/programs` by the build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keelson-ebpf"));

/// Name of the connect program in the object, also the pin name of its link.
const CONNECT4: &str = "connect4";

/// A service table over the kernel maps.
pub type KernelServiceTable = ServiceTable<
    BpfHashMap<MapData, ServiceKey, ServiceEntry>,
    BpfHashMap<MapData, BackendKey, Backend>,
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

    fn link(&self) -> PathBuf {
        self.dir.join(CONNECT4)
    }

    fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// What [`attach`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// The program was loaded, attached and pinned.
    Attached,
    /// A pinned attachment already existed and was kept (e.g. after an agent restart).
    AlreadyAttached,
}

/// Loads the load balancer, attaches `cgroup/connect4` to the cgroup2 directory `cgroup` and
/// pins link and maps under `pins`. Idempotent: an existing pinned attachment is kept, so
/// established and new connections are not disturbed by an agent restart.
///
/// Requires Linux 5.7 or later (BPF links for cgroups).
///
/// # Errors
/// The pin directory is not on a bpffs, the cgroup cannot be opened, or the kernel refuses to
/// load or attach the program.
pub fn attach(cgroup: &Path, pins: &Pins) -> Result<AttachOutcome> {
    ensure_dir(pins.dir())?;
    let link_pin = pins.link();
    if link_pin.exists() {
        return Ok(AttachOutcome::AlreadyAttached);
    }
    let cgroup_dir = File::open(cgroup).map_err(|e| io_err("open cgroup", cgroup.into(), e))?;

    // Maps are declared `pinned` in the object: the loader reuses pins found in the directory
    // and pins new maps there.
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.dir())
        .load(OBJECT)?;
    let program_err = |op| {
        move |source| Error::Program {
            program: CONNECT4,
            op,
            source,
        }
    };
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(CONNECT4)
        .ok_or(Error::Program {
            program: CONNECT4,
            op: "find",
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(program_err("cast"))?;
    program.load().map_err(program_err("load"))?;
    // BPF links on a cgroup always coexist with other programs (the kernel attaches them as
    // "multi"); the link API wants no attach flags, which `Single` means here.
    let link_id = program
        .attach(&cgroup_dir, CgroupAttachMode::Single)
        .map_err(program_err("attach"))?;
    let link = program
        .take_link(link_id)
        .map_err(program_err("take link"))?;
    let link: FdLink = link.try_into().map_err(|source| Error::Link {
        program: CONNECT4,
        source,
    })?;
    link.pin(&link_pin).map_err(|source| Error::Pin {
        path: link_pin.clone(),
        source,
    })?;
    tracing::info!(cgroup = %cgroup.display(), pins = %pins.dir().display(), "load balancer attached");
    Ok(AttachOutcome::Attached)
}

/// Opens the pinned maps of an attached load balancer as a service table.
///
/// # Errors
/// The maps are not pinned (nothing attached) or cannot be opened.
pub fn open(pins: &Pins) -> Result<KernelServiceTable> {
    let services = BpfHashMap::try_from(open_map(&pins.map(SERVICES_MAP))?).map_err(|source| {
        Error::OpenPin {
            path: pins.map(SERVICES_MAP),
            source,
        }
    })?;
    let backends = BpfHashMap::try_from(open_map(&pins.map(BACKENDS_MAP))?).map_err(|source| {
        Error::OpenPin {
            path: pins.map(BACKENDS_MAP),
            source,
        }
    })?;
    ServiceTable::new(services, backends)
}

fn open_map(path: &Path) -> Result<Map> {
    let data = MapData::from_pin(path).map_err(|source| Error::OpenPin {
        path: path.into(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| Error::OpenPin {
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
    let mut removed = Vec::new();
    for path in [pins.link(), pins.map(SERVICES_MAP), pins.map(BACKENDS_MAP)] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove pin", path, e)),
        }
    }
    // Leave the directory if something else is pinned there.
    let _ = std::fs::remove_dir(pins.dir());
    Ok(removed)
}

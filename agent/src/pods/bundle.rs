//! The OCI runtime spec of one container of a pod: the image's config overridden by the pod
//! spec (command/args, env, workingDir, user), the sandbox's namespaces joined by path, fresh
//! PID, mount and cgroup namespaces, the default capability set, the pod's volumes bound at
//! the container's mount paths, and the container's resources as cgroup limits.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path};

use k8s_openapi::api::core::v1::{Container, Pod};
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder,
    RootBuilder, Spec, UserBuilder,
};

use super::quantity::{cpu_millis, memory_bytes};
use super::volumes::Ready;

/// Why a spec could not be made (reported as a `CreateContainerConfigError`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BundleError(pub String);

/// The capabilities a container gets by default (the set containerd and CRI-O give).
const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The process arguments as Kubernetes defines them: `command` replaces the image's
/// Entrypoint (and drops its Cmd), `args` replaces Cmd.
pub fn process_args(container: &Container, image: &ImageConfiguration) -> Vec<String> {
    let cfg = image.config().clone().unwrap_or_default();
    let entrypoint = cfg.entrypoint().clone().unwrap_or_default();
    let cmd = cfg.cmd().clone().unwrap_or_default();
    match (&container.command, &container.args) {
        (Some(command), args) if !command.is_empty() => {
            let mut v = command.clone();
            v.extend(args.clone().unwrap_or_default());
            v
        }
        (_, Some(args)) if !args.is_empty() => {
            let mut v = entrypoint;
            v.extend(args.clone());
            v
        }
        _ => {
            let mut v = entrypoint;
            v.extend(cmd);
            v
        }
    }
}

/// The environment: the image's, then the container's literal values on top.
fn environment(container: &Container, image: &ImageConfiguration, pod: &Pod) -> Vec<String> {
    let cfg = image.config().clone().unwrap_or_default();
    let mut env: Vec<String> = cfg.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let mut set = |name: &str, value: String| {
        env.retain(|e| e.split('=').next() != Some(name));
        env.push(format!("{name}={value}"));
    };
    set("HOSTNAME", pod.metadata.name.clone().unwrap_or_default());
    for var in container.env.clone().unwrap_or_default() {
        set(&var.name, var.value.unwrap_or_default());
    }
    env
}

/// `uid[:gid]` of the image's `User`, numeric only (names would need the image's passwd).
fn image_user(image: &ImageConfiguration) -> (u32, u32) {
    let user = image
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    let mut parts = user.split(':');
    let uid = parts.next().and_then(|u| u.parse().ok()).unwrap_or(0);
    let gid = parts.next().and_then(|g| g.parse().ok()).unwrap_or(0);
    (uid, gid)
}

fn ns(typ: LinuxNamespaceType, path: Option<&Path>) -> Result<LinuxNamespace, BundleError> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(p) = path {
        b = b.path(p.to_owned());
    }
    b.build().map_err(|e| BundleError(e.to_string()))
}

/// Bind mounts of the container's `volumeMounts`, from the pod's ready volumes.
fn volume_mounts(
    container: &Container,
    volumes: &HashMap<String, Ready>,
) -> Result<Vec<Mount>, BundleError> {
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let ready = volumes.get(&m.name).ok_or_else(|| {
            BundleError(format!(
                "volumeMount {:?}: the pod has no volume of that name",
                m.name
            ))
        })?;
        let mut source = ready.source.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if !Path::new(sub)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
            {
                return Err(BundleError(format!(
                    "subPath {sub:?} must stay inside the volume"
                )));
            }
            source = source.join(sub);
            std::fs::create_dir_all(&source)
                .map_err(|e| BundleError(format!("subPath {}: {e}", source.display())))?;
        }
        let mut options = vec!["rbind".to_owned(), "rprivate".to_owned()];
        if ready.read_only || m.read_only == Some(true) {
            options.push("ro".to_owned());
        }
        mounts.push(
            MountBuilder::default()
                .destination(&m.mount_path)
                .typ("bind")
                .source(source)
                .options(options)
                .build()
                .map_err(|e| BundleError(e.to_string()))?,
        );
    }
    Ok(mounts)
}

/// The spec for `container` of `pod` from `image`, joining the sandbox's namespaces in
/// `sandbox` (files `net`, `uts`, `ipc`), with the pod's ready `volumes`.
///
/// # Errors
/// [`BundleError`] for resource quantities that do not parse, or a volumeMount naming no
/// volume of the pod.
pub fn make_spec(
    pod: &Pod,
    container: &Container,
    image: &ImageConfiguration,
    sandbox: &Path,
    volumes: &HashMap<String, Ready>,
) -> Result<Spec, BundleError> {
    let err = |e: oci_spec::OciSpecError| BundleError(e.to_string());
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    let args = process_args(container, image);
    if args.is_empty() {
        return Err(BundleError(
            "no command: the image has no Entrypoint/Cmd and the container no command".into(),
        ));
    }
    process.set_args(Some(args));
    process.set_env(Some(environment(container, image, pod)));
    // `tty: true`: the supervisor takes the terminal's master through a console socket.
    process.set_terminal(Some(container.tty == Some(true)));
    let cwd = container
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| {
            image
                .config()
                .as_ref()
                .and_then(|c| c.working_dir().clone())
        })
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    process.set_cwd(cwd.into());
    let (mut uid, mut gid) = image_user(image);
    let security = container.security_context.clone().unwrap_or_default();
    let pod_security = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.clone())
        .unwrap_or_default();
    if let Some(u) = security.run_as_user.or(pod_security.run_as_user) {
        uid = u32::try_from(u).map_err(|_| BundleError(format!("runAsUser {u} out of range")))?;
    }
    if let Some(g) = security.run_as_group.or(pod_security.run_as_group) {
        gid = u32::try_from(g).map_err(|_| BundleError(format!("runAsGroup {g} out of range")))?;
    }
    process.set_user(
        UserBuilder::default()
            .uid(uid)
            .gid(gid)
            .build()
            .map_err(err)?,
    );
    let caps: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .inheritable(HashSet::new())
            .ambient(HashSet::new())
            .build()
            .map_err(err)?,
    ));
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .map_err(err)?,
    ));
    // The UTS namespace is the sandbox's; it already carries the pod's name.
    spec.set_hostname(None);
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.extend(volume_mounts(container, volumes)?);
    spec.set_mounts(Some(mounts));

    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_namespaces(Some(vec![
        ns(LinuxNamespaceType::Pid, None)?,
        ns(LinuxNamespaceType::Mount, None)?,
        ns(LinuxNamespaceType::Cgroup, None)?,
        ns(LinuxNamespaceType::Network, Some(&sandbox.join("net")))?,
        ns(LinuxNamespaceType::Uts, Some(&sandbox.join("uts")))?,
        ns(LinuxNamespaceType::Ipc, Some(&sandbox.join("ipc")))?,
    ]));
    let resources = container.resources.clone().unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    let mut res = LinuxResourcesBuilder::default().devices(vec![]);
    if let Some(q) = limits.get("memory") {
        let bytes =
            memory_bytes(&q.0).ok_or_else(|| BundleError(format!("bad memory limit {}", q.0)))?;
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        res = res.memory(
            LinuxMemoryBuilder::default()
                .limit(bytes)
                .swap(bytes)
                .build()
                .map_err(err)?,
        );
    }
    let request = requests.get("cpu").or(limits.get("cpu"));
    let mut cpu = LinuxCpuBuilder::default();
    let mut any_cpu = false;
    if let Some(q) = request {
        let m = cpu_millis(&q.0).ok_or_else(|| BundleError(format!("bad cpu request {}", q.0)))?;
        cpu = cpu.shares((m * 1024 / 1000).max(2));
        any_cpu = true;
    }
    if let Some(q) = limits.get("cpu") {
        let m = cpu_millis(&q.0).ok_or_else(|| BundleError(format!("bad cpu limit {}", q.0)))?;
        let period: u64 = 100_000;
        let quota = i64::try_from((m * period / 1000).max(1000)).unwrap_or(i64::MAX);
        cpu = cpu.quota(quota).period(period);
        any_cpu = true;
    }
    if any_cpu {
        res = res.cpu(cpu.build().map_err(err)?);
    }
    linux.set_resources(Some(res.build().map_err(err)?));
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

    fn image(entry: &[&str], cmd: &[&str]) -> ImageConfiguration {
        let cfg = ConfigBuilder::default()
            .entrypoint(entry.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .cmd(cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .expect("config");
        ImageConfigurationBuilder::default()
            .config(cfg)
            .build()
            .expect("image")
    }

    fn strings(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn command_and_args_override_the_image() {
        let img = image(&["/ep"], &["cmd1"]);
        let mut c = Container::default();
        assert_eq!(process_args(&c, &img), ["/ep", "cmd1"]);
        c.args = strings(&["a"]);
        assert_eq!(process_args(&c, &img), ["/ep", "a"]);
        c.command = strings(&["/bin/sh", "-c"]);
        assert_eq!(process_args(&c, &img), ["/bin/sh", "-c", "a"]);
        c.args = None;
        assert_eq!(process_args(&c, &img), ["/bin/sh", "-c"]);
    }
}

//! Boot decisions: which file a network-booting client gets from DHCP (by PXE architecture,
//! UEFI HTTP boot, or iPXE) and the per-machine iPXE script served over HTTP.
//!
//! The chain is: firmware PXE (BIOS or UEFI) → iPXE over TFTP → (iPXE identifies itself with
//! user-class `iPXE`) → the machine's script over HTTP. Because iPXE gets the script and not
//! the iPXE binary again, there is no chain-load loop. UEFI HTTP boot (arch 16) fetches iPXE
//! over HTTP instead of TFTP.

use std::fmt::Write as _;

use crate::inventory::Target;
use crate::mac::Mac;
use uuid::Uuid;

/// Client architectures of DHCP option 93 (RFC 4578, IANA registry) that we serve.
pub mod arch {
    /// x86 BIOS.
    pub const BIOS: u16 = 0;
    /// EFI BC (x64 in practice).
    pub const EFI_BC: u16 = 7;
    /// EFI x64.
    pub const EFI_X64: u16 = 9;
    /// x64 UEFI HTTP boot.
    pub const EFI_X64_HTTP: u16 = 16;
}

/// Names and places of the boot files.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// TFTP name of the BIOS iPXE binary.
    pub bios: String,
    /// TFTP name (and HTTP name under `/boot/`) of the UEFI x64 iPXE binary.
    pub uefi: String,
    /// Base URL of the HTTP server, e.g. `http://192.0.2.1:8080` (no trailing slash).
    pub http_base: String,
}

impl BootFiles {
    /// The Debian `ipxe` file names with the given HTTP base URL.
    pub fn debian(http_base: impl Into<String>) -> Self {
        BootFiles {
            bios: "undionly.kpxe".into(),
            uefi: "ipxe.efi".into(),
            http_base: http_base.into(),
        }
    }

    /// URL of a machine's iPXE script, carrying its SMBIOS UUID when the client sent one.
    pub fn script_url(&self, mac: Mac, uuid: Option<&Uuid>) -> String {
        match uuid {
            Some(u) => format!("{}/ipxe/{}?uuid={u}", self.http_base, mac.compact()),
            None => format!("{}/ipxe/{}", self.http_base, mac.compact()),
        }
    }
}

/// What the boot client is, from its DHCP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Firmware PXE on BIOS.
    PxeBios,
    /// Firmware PXE on UEFI x64.
    PxeUefi,
    /// UEFI HTTP boot.
    HttpUefi,
    /// iPXE (any platform), which gets the HTTP script.
    Ipxe {
        /// Whether it said `HTTPClient` rather than `PXEClient` in option 60.
        http: bool,
    },
}

/// Classification failures: not a network-boot client, or one we have no binary for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotBootable {
    /// No `PXEClient`/`HTTPClient` vendor class and no iPXE user class.
    NotPxe,
    /// A PXE client of an architecture we cannot serve (e.g. EFI IA32, ARM).
    UnsupportedArch(u16),
}

impl Client {
    /// Classifies a client from option 60 (vendor class), 93 (architecture) and whether
    /// option 77 says iPXE.
    ///
    /// # Errors
    /// [`NotBootable`] when the client is not a boot client we can serve.
    pub fn classify(
        vendor_class: Option<&[u8]>,
        arch: Option<u16>,
        ipxe: bool,
    ) -> Result<Client, NotBootable> {
        let vc = vendor_class.unwrap_or_default();
        let http = vc.starts_with(b"HTTPClient");
        let pxe = vc.starts_with(b"PXEClient");
        if ipxe {
            return Ok(Client::Ipxe { http });
        }
        if !pxe && !http {
            return Err(NotBootable::NotPxe);
        }
        match arch {
            Some(arch::EFI_X64_HTTP) => Ok(Client::HttpUefi),
            _ if http => Ok(Client::HttpUefi),
            None | Some(arch::BIOS) => Ok(Client::PxeBios),
            Some(arch::EFI_BC | arch::EFI_X64) => Ok(Client::PxeUefi),
            Some(other) => Err(NotBootable::UnsupportedArch(other)),
        }
    }

    /// The vendor class to echo in option 60.
    pub fn vendor_class(self) -> &'static str {
        match self {
            Client::HttpUefi | Client::Ipxe { http: true } => "HTTPClient",
            _ => "PXEClient",
        }
    }

    /// Whether the boot file is fetched over TFTP (so `siaddr`/option 66 matter).
    pub fn uses_tftp(self) -> bool {
        matches!(self, Client::PxeBios | Client::PxeUefi)
    }

    /// The boot file (TFTP name or HTTP URL) for this client.
    pub fn boot_file(self, files: &BootFiles, mac: Mac, uuid: Option<&Uuid>) -> String {
        match self {
            Client::PxeBios => files.bios.clone(),
            Client::PxeUefi => files.uefi.clone(),
            Client::HttpUefi => format!("{}/boot/{}", files.http_base, files.uefi),
            Client::Ipxe { .. } => files.script_url(mac, uuid),
        }
    }
}

fn asset_url(http_base: &str, asset: &str) -> String {
    if asset.starts_with("http://") || asset.starts_with("https://") {
        asset.to_string()
    } else {
        format!("{http_base}/assets/{}", asset.trim_start_matches('/'))
    }
}

/// The NoCloud seed URL of a target (ends with `/`, as cloud-init expects).
pub fn nocloud_url(http_base: &str, target: &Target<'_>) -> String {
    format!("{http_base}/nocloud/{}/", target.id)
}

/// Renders the iPXE script that boots `target`'s profile: kernel, initrds, and the profile's
/// command line plus `ds=nocloud;s=<seed URL>`.
pub fn ipxe_script(http_base: &str, target: &Target<'_>) -> String {
    let p = target.profile;
    let mut cmdline = String::new();
    for initrd in &p.initrd {
        // EFI-stub kernels loaded by older iPXE find initrds by name.
        let name = initrd.rsplit('/').next().unwrap_or(initrd);
        let _ = write!(cmdline, "initrd={name} ");
    }
    if !p.cmdline.trim().is_empty() {
        let _ = write!(cmdline, "{} ", p.cmdline.trim());
    }
    let _ = write!(cmdline, "ds=nocloud;s={}", nocloud_url(http_base, target));
    let mut s = String::from("#!ipxe\n");
    let _ = writeln!(
        s,
        "echo Keelson: booting {} (profile {})",
        target.id, target.profile_name
    );
    let _ = writeln!(s, "kernel {} {}", asset_url(http_base, &p.kernel), cmdline);
    for initrd in &p.initrd {
        let _ = writeln!(s, "initrd {}", asset_url(http_base, initrd));
    }
    s.push_str("boot\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    fn mac() -> Mac {
        "52:54:00:12:34:56".parse().unwrap()
    }

    #[test]
    fn classification_by_arch_and_user_class() {
        let pxe = Some(&b"PXEClient:Arch:00000:UNDI:002001"[..]);
        let files = BootFiles::debian("http://192.0.2.1:8080");
        let c = Client::classify(pxe, Some(0), false).unwrap();
        assert_eq!(
            (c, c.boot_file(&files, mac(), None).as_str()),
            (Client::PxeBios, "undionly.kpxe")
        );
        for a in [7, 9] {
            let c = Client::classify(pxe, Some(a), false).unwrap();
            assert_eq!(c.boot_file(&files, mac(), None), "ipxe.efi");
            assert_eq!(c.vendor_class(), "PXEClient");
        }
        let c =
            Client::classify(Some(b"HTTPClient:Arch:00016:UNDI:003001"), Some(16), false).unwrap();
        assert_eq!(c, Client::HttpUefi);
        assert_eq!(c.vendor_class(), "HTTPClient");
        assert_eq!(
            c.boot_file(&files, mac(), None),
            "http://192.0.2.1:8080/boot/ipxe.efi"
        );
        // iPXE (whatever arch) gets the script: no loop back to the iPXE binary.
        let c = Client::classify(pxe, Some(0), true).unwrap();
        assert_eq!(
            c.boot_file(&files, mac(), None),
            "http://192.0.2.1:8080/ipxe/525400123456"
        );
        assert!(!c.uses_tftp());
        assert_eq!(
            Client::classify(None, Some(0), false),
            Err(NotBootable::NotPxe)
        );
        assert_eq!(
            Client::classify(Some(b"MSFT 5.0"), None, false),
            Err(NotBootable::NotPxe)
        );
        assert_eq!(
            Client::classify(pxe, Some(6), false),
            Err(NotBootable::UnsupportedArch(6))
        );
    }

    #[test]
    fn script_has_kernel_initrd_and_seed() {
        let inv =
            Inventory::parse(crate::inventory::tests_sample(), std::path::Path::new("t")).unwrap();
        let t = inv.target(mac()).unwrap();
        let s = ipxe_script("http://192.0.2.1:8080", &t);
        assert_eq!(
            s,
            "#!ipxe\necho Keelson: booting node-1 (profile worker)\n\
             kernel http://192.0.2.1:8080/assets/vmlinuz initrd=initrd.img console=ttyS0 \
             ds=nocloud;s=http://192.0.2.1:8080/nocloud/node-1/\n\
             initrd http://192.0.2.1:8080/assets/initrd.img\nboot\n"
        );
    }
}

//! A real guest booted by a private libvirtd: the tiny Linux of
//! scripts/guest/build-guest.sh (Debian's cloud kernel, busybox-static),
//! whose /init prints `STRATA-SHA256 vda <sha256>` for every virtio disk on
//! the serial console and powers off. Booted with TCG (`<domain
//! type='qemu'>`), direct kernel boot, the serial console logged to a file.
//!
//! The guest's checksums are what QEMU itself reads through the chain that
//! libvirt gave it: the final word on whether the files and the domain XML
//! that Strata left agree.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kernel and initramfs of the guest, built once per machine (and per
/// package versions) under CARGO_TARGET_TMPDIR.
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub versions: String,
}

/// Builds (or finds) the guest. Panics with the script's output when it
/// cannot: a missing guest is a failure, never a skip.
pub fn guest_image() -> GuestImage {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = Command::new("bash")
        .arg(repo().join("scripts/guest/build-guest.sh"))
        .arg(base)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "could not build the test guest with scripts/guest/build-guest.sh (it needs apt \
         and Debian's mirrors for linux-image-cloud-amd64 and busybox-static): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        versions: std::fs::read_to_string(dir.join("versions")).unwrap_or_default(),
    }
}

/// A private libvirtd (scripts/libvirtd/start-libvirtd.sh) whose state lives
/// in a temporary directory of its own, stopped and removed on drop.
///
/// QEMU's capabilities cache is seeded from CARGO_TARGET_TMPDIR and saved
/// there after the first run: libvirtd then starts in ~0.2 s instead of ~8 s
/// (it still probes again when it finds the host CPU changed, which happens
/// on these machines).
pub struct Libvirtd {
    dir: tempfile::TempDir,
    pub uri: String,
}

fn caps_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("strata-libvirtd-cache")
}

fn libvirtd_script(name: &str) -> PathBuf {
    repo().join("scripts/libvirtd").join(name)
}

impl Libvirtd {
    /// None only when STRATA_SKIP_LIBVIRTD_TESTS=1 and libvirtd cannot start.
    pub fn start() -> Option<Libvirtd> {
        let skip = std::env::var("STRATA_SKIP_LIBVIRTD_TESTS").is_ok_and(|v| v == "1");
        let dir = tempfile::tempdir().unwrap();
        let cache = caps_cache();
        if cache.join(".complete").exists() {
            let _ = Command::new("cp")
                .arg("-a")
                .arg(cache.join("cache"))
                .arg(dir.path().join("cache"))
                .status();
        }
        let t0 = Instant::now();
        let out = Command::new("bash")
            .arg(libvirtd_script("start-libvirtd.sh"))
            .env("D", dir.path())
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            let why = match &out {
                Ok(o) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => e.to_string(),
            };
            if skip {
                eprintln!("SKIPPED (STRATA_SKIP_LIBVIRTD_TESTS=1): libvirtd did not start: {why}");
                return None;
            }
            panic!(
                "could not start a private libvirtd with scripts/libvirtd/start-libvirtd.sh \
                 (needs root and `scripts/install-deps.sh --libvirt`; set \
                 STRATA_SKIP_LIBVIRTD_TESTS=1 to skip): {why}"
            );
        }
        eprintln!("libvirtd up in {:.1?}", t0.elapsed());
        let uri = format!(
            "qemu+unix:///system?socket={}/run/libvirt-sock",
            dir.path().display()
        );
        Some(Libvirtd { dir, uri })
    }

    /// `virsh -c URI ARGS`: stdout, or stderr as the error.
    pub fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .expect("virsh");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "virsh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn virsh(&self, args: &[&str]) -> String {
        self.try_virsh(args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn state(&self, dom: &str) -> String {
        self.virsh(&["domstate", dom]).trim().to_string()
    }

    /// The tail of libvirtd's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("log/libvirtd.log")).unwrap_or_default();
        let v: Vec<&str> = log.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(libvirtd_script("stop-libvirtd.sh"))
            .env("D", self.dir.path())
            .output();
        // Save QEMU's capabilities for the next libvirtd (first one wins).
        let cache = caps_cache();
        let caps = self.dir.path().join("cache/qemu/capabilities");
        let has_caps = std::fs::read_dir(&caps).is_ok_and(|mut d| d.next().is_some());
        if has_caps && !cache.join(".complete").exists() {
            let tmp = cache.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).unwrap();
            let ok = Command::new("cp")
                .arg("-a")
                .arg(self.dir.path().join("cache"))
                .arg(tmp.join("cache"))
                .status()
                .is_ok_and(|s| s.success());
            if ok && std::fs::write(tmp.join(".complete"), "").is_ok() {
                let _ = std::fs::remove_dir_all(&cache);
                if std::fs::rename(&tmp, &cache).is_err() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            } else {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
    }
}

/// A disk of the guest: `vda`, `vdb`, ... on virtio.
#[derive(Clone, Debug)]
pub struct Disk {
    pub target: String,
    pub path: PathBuf,
    pub format: String,
    /// More XML inside `<disk>`, e.g. `<backingStore/>`.
    pub extra: String,
}

impl Disk {
    pub fn new(target: &str, path: &Path, format: &str) -> Disk {
        Disk {
            target: target.into(),
            path: path.into(),
            format: format.into(),
            extra: String::new(),
        }
    }

    pub fn with_extra(mut self, xml: &str) -> Disk {
        self.extra = xml.into();
        self
    }
}

/// A persistent domain that boots the guest, with its serial console logged
/// to `serial`.
pub struct GuestDomain {
    pub name: String,
    pub serial: PathBuf,
    pub disks: usize,
}

/// What one boot showed.
#[derive(Debug)]
pub struct Boot {
    /// disk -> sha256 of what the guest read from it
    pub sums: BTreeMap<String, String>,
    /// Block nodes QEMU opened (node-name, drv, file), from
    /// `query-named-block-nodes`, taken before the guest ran.
    pub nodes: Vec<String>,
    /// From `virsh start` to the domain shut off by itself.
    pub elapsed: Duration,
    pub serial: String,
}

impl Boot {
    /// The files QEMU opened (its `file` protocol nodes), sorted.
    pub fn opened_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .nodes
            .iter()
            .filter_map(|n| {
                let mut w = n.splitn(3, ' ');
                let (_, drv, file) = (w.next()?, w.next()?, w.next()?);
                (drv == "file").then(|| PathBuf::from(file))
            })
            .collect();
        v.sort();
        v
    }
}

/// The files of `path`'s backing chain as the image headers say
/// (`qemu-img info --backing-chain`), sorted.
pub fn chain_files(path: &Path) -> Vec<PathBuf> {
    let out = qemu_img(&["info", "-U", "--backing-chain", &path.display().to_string()]);
    let mut v: Vec<PathBuf> = out
        .lines()
        .filter_map(|l| l.strip_prefix("image: "))
        .map(PathBuf::from)
        .collect();
    v.sort();
    v
}

/// How long one boot may take (TCG on a shared, loaded machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn domain_xml(name: &str, g: &GuestImage, disks: &[Disk], serial: &Path) -> String {
    let mut devs = String::new();
    for d in disks {
        devs.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
             <source file='{}'/>{}<target dev='{}' bus='virtio'/></disk>",
            d.format,
            d.path.display(),
            d.extra,
            d.target
        ));
    }
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type>\
         <kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 quiet panic=-1 strata.disks={}</cmdline></os>\
         <features><acpi/></features>\
         <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
         <devices>{devs}<serial type='file'><source path='{}'/><target port='0'/></serial>\
         <memballoon model='none'/></devices></domain>",
        g.kernel.display(),
        g.initrd.display(),
        disks.len(),
        serial.display()
    )
}

impl GuestDomain {
    /// Defines (persistently) a domain booting the guest from `disks`.
    pub fn define(
        lv: &Libvirtd,
        name: &str,
        g: &GuestImage,
        disks: &[Disk],
        dir: &Path,
    ) -> GuestDomain {
        let serial = dir.join(format!("{name}.serial.log"));
        let xml_path = dir.join(format!("{name}.xml"));
        std::fs::write(&xml_path, domain_xml(name, g, disks, &serial)).unwrap();
        lv.virsh(&["define", &xml_path.display().to_string()]);
        std::fs::remove_file(&xml_path).unwrap();
        GuestDomain {
            name: name.into(),
            serial,
            disks: disks.len(),
        }
    }

    /// Starts QEMU paused (libvirt sees a running domain) and runs `f`
    /// with it, then destroys it: for `virsh snapshot-create-as` on a live
    /// domain without waiting for a guest.
    pub fn while_running<T>(&self, lv: &Libvirtd, f: impl FnOnce() -> T) -> T {
        lv.virsh(&["start", "--paused", &self.name]);
        let r = f();
        lv.virsh(&["destroy", &self.name]);
        r
    }

    /// The `<disk>` elements of the persistent definition (for messages).
    pub fn disk_xml(&self, lv: &Libvirtd) -> String {
        let xml = lv.virsh(&["dumpxml", "--inactive", &self.name]);
        let mut out = String::new();
        let mut rest = xml.as_str();
        while let Some(i) = rest.find("<disk ") {
            let end = rest[i..].find("</disk>").map_or(rest.len(), |j| i + j + 7);
            out.push_str(&rest[i..end]);
            out.push('\n');
            rest = &rest[end..];
        }
        out
    }

    /// Boots the guest and waits for it to power off. Err: QEMU did not
    /// start, the guest did not finish in time, or it reported an error.
    pub fn boot(&self, lv: &Libvirtd) -> Result<Boot, String> {
        let _ = std::fs::remove_file(&self.serial);
        let t0 = Instant::now();
        lv.try_virsh(&["start", "--paused", &self.name])?;
        let nodes = lv
            .try_virsh(&[
                "qemu-monitor-command",
                &self.name,
                "--pretty",
                r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            ])
            .map(|j| block_nodes(&j))
            .unwrap_or_else(|e| vec![e]);
        lv.virsh(&["resume", &self.name]);
        loop {
            if lv.state(&self.name) == "shut off" {
                break;
            }
            if t0.elapsed() > BOOT_TIMEOUT {
                let _ = lv.try_virsh(&["destroy", &self.name]);
                return Err(format!(
                    "the guest did not power off within {BOOT_TIMEOUT:?}; serial console:\n{}",
                    std::fs::read_to_string(&self.serial).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let elapsed = t0.elapsed();
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let _ = std::fs::remove_file(&self.serial);
        let mut sums = BTreeMap::new();
        let mut done = false;
        for line in serial.lines() {
            let line = line.trim_end_matches('\r');
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["STRATA-SHA256", disk, sum] => {
                    sums.insert(disk.to_string(), sum.to_string());
                }
                ["STRATA-DONE", ..] => done = true,
                ["STRATA-ERROR", ..] => {
                    return Err(format!("the guest reported: {line}\nserial:\n{serial}"))
                }
                _ => {}
            }
        }
        if !done || sums.len() != self.disks {
            return Err(format!(
                "the guest did not report {} checksums; serial console:\n{serial}",
                self.disks
            ));
        }
        eprintln!("boot of {} took {elapsed:.1?}", self.name);
        Ok(Boot {
            sums,
            nodes,
            elapsed,
            serial,
        })
    }
}

/// (node-name, drv, file) of each node in `query-named-block-nodes --pretty`
/// output: the keys at the nodes' own indentation.
fn block_nodes(json: &str) -> Vec<String> {
    let mut nodes = Vec::new();
    let (mut name, mut drv, mut file) = (String::new(), String::new(), String::new());
    let value = |l: &str| {
        l.split_once(": ")
            .map(|(_, v)| v.trim_end_matches(',').trim_matches('"').to_string())
            .unwrap_or_default()
    };
    for l in json.lines() {
        if l.starts_with("      \"") && !l.starts_with("       ") {
            let t = l.trim_start();
            if t.starts_with("\"node-name\"") {
                name = value(t);
            } else if t.starts_with("\"drv\"") {
                drv = value(t);
            } else if t.starts_with("\"file\"") {
                file = value(t);
            }
        } else if l.starts_with("    }") && !l.starts_with("     ") {
            nodes.push(format!("{name} {drv} {file}"));
            (name, drv, file) = (String::new(), String::new(), String::new());
        }
    }
    nodes
}

/// `qemu-img` with these arguments; panics on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f FMT -c CMD FILE`, e.g. `write -P 0x22 2M 64k`.
pub fn qemu_io(path: &Path, format: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c", cmd])
        .arg(path)
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "qemu-io -c '{cmd}' {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// sha256 of a file, as `sha256sum` prints it.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// sha256 of the guest view of `path`'s chain: `qemu-img convert -O raw`
/// into `scratch` (removed after).
pub fn sha256_view(path: &Path, scratch: &Path) -> String {
    let raw = scratch.join(format!("view-{}.raw", std::process::id()));
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        &path.display().to_string(),
        &raw.display().to_string(),
    ]);
    let sum = sha256_file(&raw);
    std::fs::remove_file(&raw).unwrap();
    sum
}

/// A path as a `String` (for argument lists).
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The guest view of `img` as raw bytes (`-U`: QEMU may have it open).
pub fn raw_of(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("view.raw");
    qemu_img(&["convert", "-U", "-O", "raw", &s(img), &s(&raw)]);
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    v
}

/// The number of the guest's write at 8 MiB (0: none): the counter the
/// writing guest's /init stamps there (`STRATA-W <n>`).
pub fn counter(view: &[u8]) -> u64 {
    let b = &view[8 << 20..(8 << 20) + 18];
    std::str::from_utf8(b)
        .ok()
        .and_then(|t| t.strip_prefix("STRATA-W "))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

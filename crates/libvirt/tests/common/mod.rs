//! Shared helpers: images on disk, guest reads and writes, and a domain
//! on libvirt's in-process test driver.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Chain, FileStorage, OpenOptions};
use virt::connect::Connect;
use virt::domain::Domain;

pub const MIB: u64 = 1024 * 1024;
pub const SIZE: u64 = 16 * MIB;

/// Creates a qcow2 image of `size` bytes.
pub fn make_qcow2(path: &Path, size: u64) {
    let storage = FileStorage::create(path).unwrap();
    let opts = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    create_qcow2(Box::new(storage), path, &opts).unwrap();
}

/// Writes `len` bytes of `byte` at `offset` into the top of `path`'s chain.
pub fn write(path: &Path, offset: u64, len: usize, byte: u8) {
    let mut c = Chain::open(path, &OpenOptions::new().writable(true)).unwrap();
    c.write_at(&vec![byte; len], offset).unwrap();
    c.flush().unwrap();
}

/// The whole guest view of `path`'s chain.
pub fn view(path: &Path) -> Vec<u8> {
    let c = Chain::open(path, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut buf, 0).unwrap();
    buf
}

/// Backing chain of `path`, top first.
pub fn chain(path: &Path) -> Vec<PathBuf> {
    let c = Chain::open(path, &OpenOptions::new().force_share(true)).unwrap();
    c.layers()
        .iter()
        .map(|l| std::fs::canonicalize(&l.path).unwrap())
        .collect()
}

/// `qemu-img check` exit status 0.
pub fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A shut-off test-driver domain `vm` with one qcow2 disk `vda` at
/// `DIR/test.qcow2`, holding 0x11 in its first MiB.
pub struct TestVm {
    pub dir: tempfile::TempDir,
    pub conn: Connect,
    pub base: PathBuf,
}

impl TestVm {
    pub fn new() -> TestVm {
        Self::with_disks(&["vda"])
    }

    pub fn with_disks(targets: &[&str]) -> TestVm {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let mut disks = String::new();
        for (i, t) in targets.iter().enumerate() {
            let name = if i == 0 {
                "test.qcow2".to_string()
            } else {
                format!("test-{t}.qcow2")
            };
            let p = root.join(&name);
            make_qcow2(&p, SIZE);
            write(&p, 0, MIB as usize, 0x11);
            disks.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{t}' bus='virtio'/></disk>",
                p.display()
            ));
        }
        let node = format!(
            "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>vm</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>\
             <memory>65536</memory><os><type>hvm</type></os>\
             <devices>{disks}</devices><test:runstate>5</test:runstate></domain></node>"
        );
        let node_path = root.join("node.xml");
        std::fs::write(&node_path, node).unwrap();
        let conn = Connect::open(Some(&format!("test://{}", node_path.display()))).unwrap();
        TestVm {
            base: root.join("test.qcow2"),
            dir,
            conn,
        }
    }

    /// A shut-off test-driver domain `vm` whose `<devices>` are
    /// `devices(root)` (root: the canonical temporary directory, where the
    /// caller makes the images first).
    pub fn with_devices(devices: impl FnOnce(&Path) -> String) -> TestVm {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let devices = devices(&root);
        let node = format!(
            "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>vm</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>\
             <memory>65536</memory><os><type>hvm</type></os>\
             <devices>{devices}</devices><test:runstate>5</test:runstate></domain></node>"
        );
        let node_path = root.join("node.xml");
        std::fs::write(&node_path, node).unwrap();
        let conn = Connect::open(Some(&format!("test://{}", node_path.display()))).unwrap();
        TestVm {
            base: root.join("test.qcow2"),
            dir,
            conn,
        }
    }

    /// Takes a snapshot the way libvirt does on a running domain
    /// (`virsh snapshot-create-as --disk-only` with the default file
    /// names): an overlay per `disks` target made with qemu-img, the
    /// domain's disk switched to it with the whole chain written as nested
    /// `<backingStore>`, and the snapshot recorded with the definition as
    /// it was (its own `<backingStore>` included, ending in an empty one).
    pub fn libvirt_snapshot(&self, name: &str, disks: &[&str]) {
        let dom = self.dom();
        let before = self.xml();
        let parent = virt::domain_snapshot::DomainSnapshot::current(&dom, 0)
            .ok()
            .and_then(|s| s.get_name().ok());
        let mut after = before.clone();
        let mut snap_disks = String::new();
        for t in disks {
            let src = self.active_of(t);
            let fmt = if src.extension().is_some_and(|e| e == "raw") {
                "raw"
            } else {
                "qcow2"
            };
            let ov = strata_libvirt::default_overlay_path(&src, name);
            qemu(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                fmt,
                "-b",
                src.to_str().unwrap(),
                ov.to_str().unwrap(),
            ]);
            let mut bs = String::new();
            for (i, l) in chain(&src).iter().enumerate() {
                let f = if i == 0 { fmt } else { "qcow2" };
                bs.push_str(&format!(
                    "<backingStore type='file'><format type='{f}'/><source file='{}'/>",
                    l.display()
                ));
            }
            bs.push_str("<backingStore/>");
            for _ in chain(&src) {
                bs.push_str("</backingStore>");
            }
            after = replace_disk(&after, t, &ov, &bs);
            snap_disks.push_str(&format!(
                "<disk name='{t}' snapshot='external' type='file'><driver type='qcow2'/>\
                 <source file='{}'/></disk>",
                ov.display()
            ));
        }
        let parent = parent
            .map(|p| format!("<parent><name>{p}</name></parent>"))
            .unwrap_or_default();
        let snap = format!(
            "<domainsnapshot><name>{name}</name><state>disk-snapshot</state>{parent}\
             <creationTime>{}</creationTime><memory snapshot='no'/><disks>{snap_disks}</disks>\
             {before}</domainsnapshot>",
            1_700_000_000 + self.snapshot_names().len()
        );
        virt::domain_snapshot::DomainSnapshot::create_xml(
            &dom,
            &snap,
            virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
                | virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
        )
        .unwrap();
        Domain::define_xml(&self.conn, &after).unwrap();
    }

    /// `<backingStore>` elements of disk `target` in the inactive XML.
    pub fn backing_stores(&self, target: &str) -> usize {
        disk_xml(&self.xml(), target)
            .matches("<backingStore")
            .count()
    }

    pub fn root(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.path()).unwrap()
    }

    pub fn dom(&self) -> Domain {
        Domain::lookup_by_name(&self.conn, "vm").unwrap()
    }

    pub fn xml(&self) -> String {
        self.dom()
            .get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .unwrap()
    }

    /// The file `vda` uses now.
    pub fn active(&self) -> PathBuf {
        self.active_of("vda")
    }

    pub fn active_of(&self, disk: &str) -> PathBuf {
        let d = strata_libvirt::domain_disks(&self.conn, "vm").unwrap();
        d.into_iter().find(|d| d.disk == disk).unwrap().source
    }

    pub fn snapshot_names(&self) -> Vec<String> {
        strata_libvirt::snapshot_list(&self.conn, "vm")
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    /// Image files in the directory tree (sorted), node.xml left out.
    pub fn files(&self) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.file_name().unwrap() != "node.xml" {
                    out.push(p);
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.root(), &mut v);
        v.sort();
        v
    }
}

/// Runs qemu-img, panicking on failure.
pub fn qemu(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `<disk>...</disk>` text of disk `target` in a domain XML.
pub fn disk_xml(xml: &str, target: &str) -> String {
    let (start, end) = disk_span(xml, target);
    xml[start..end].to_string()
}

fn disk_span(xml: &str, target: &str) -> (usize, usize) {
    let t = xml.find(&format!("<target dev='{target}'")).unwrap();
    let start = xml[..t].rfind("<disk ").unwrap();
    let end = t + xml[t..].find("</disk>").unwrap() + "</disk>".len();
    (start, end)
}

/// `xml` with disk `target`'s source set to `file` (qcow2) and its
/// `<backingStore>` replaced by `backing_store`.
pub fn replace_disk(xml: &str, target: &str, file: &Path, backing_store: &str) -> String {
    let (start, end) = disk_span(xml, target);
    let disk = &xml[start..end];
    let mut d = disk.to_string();
    if let Some(b) = d.find("<backingStore") {
        let t = d.find("<target").unwrap();
        d.replace_range(b..t, "");
    }
    let s = d.find("<source").unwrap();
    let se = s + d[s..].find("/>").unwrap() + 2;
    d.replace_range(
        s..se,
        &format!("<source file='{}'/>{backing_store}", file.display()),
    );
    let d = d.replacen("type='raw'", "type='qcow2'", 1);
    format!("{}{d}{}", &xml[..start], &xml[end..])
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.conn.close();
    }
}

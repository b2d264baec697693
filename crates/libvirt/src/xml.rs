//! Domain and snapshot XML: read the parts Strata needs, change only the
//! elements it must (a disk's `<source file=>` and `<driver type=>`, the
//! snapshot's `<parent>`, Strata's own `<metadata>` element), and keep
//! everything else of the document as libvirt wrote it.

use std::path::{Path, PathBuf};

use xmltree::{Element, EmitterConfig, Namespace, XMLNode};

use crate::error::{Error, Result};

/// XML namespace of Strata's element in the domain's `<metadata>`.
pub const STRATA_NS: &str = "https://example.invalid/strata/libvirt/1";
const STRATA_PREFIX: &str = "strata";

/// Parses an XML document.
pub(crate) fn parse(text: &str, what: &str) -> Result<Element> {
    Element::parse(text.as_bytes()).map_err(|e| Error::xml(what, e.to_string()))
}

/// Serialises an element (no XML declaration, indented).
pub(crate) fn write(e: &Element, what: &str) -> Result<String> {
    let mut out = Vec::new();
    e.write_with_config(
        &mut out,
        EmitterConfig::new()
            .perform_indent(true)
            .write_document_declaration(false),
    )
    .map_err(|err| Error::xml(what, err.to_string()))?;
    String::from_utf8(out).map_err(|err| Error::xml(what, err.to_string()))
}

fn children<'a>(e: &'a Element, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
    e.children
        .iter()
        .filter_map(XMLNode::as_element)
        .filter(move |c| c.name == name && c.namespace.is_none())
}

fn child<'a>(e: &'a Element, name: &str) -> Option<&'a Element> {
    e.children
        .iter()
        .filter_map(XMLNode::as_element)
        .find(|c| c.name == name && c.namespace.is_none())
}

fn child_mut<'a>(e: &'a mut Element, name: &str) -> Option<&'a mut Element> {
    e.children
        .iter_mut()
        .filter_map(XMLNode::as_mut_element)
        .find(|c| c.name == name && c.namespace.is_none())
}

fn text_of(e: &Element, name: &str) -> Option<String> {
    child(e, name)
        .and_then(|c| c.get_text())
        .map(|t| t.trim().to_string())
}

fn attr<'a>(e: &'a Element, name: &str) -> Option<&'a str> {
    e.attributes.get(name).map(String::as_str)
}

/// A `<disk>` of a domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// Target device name (`vda`).
    pub target: String,
    /// `<disk type=>` (`file`, `block`, `network`, ...).
    pub kind: String,
    /// `<disk device=>` (`disk`, `cdrom`, ...).
    pub device: String,
    /// `<source file=>`, when the disk is file-backed and has a source.
    pub source: Option<PathBuf>,
    /// `<driver type=>` (`qcow2`, `raw`, ...).
    pub format: Option<String>,
    /// `<readonly/>` is present.
    pub readonly: bool,
    /// `<shareable/>` is present.
    pub shareable: bool,
    /// `<disk snapshot=>` (`no`, `external`, `internal`), when given.
    pub snapshot: Option<String>,
}

impl DomainDisk {
    /// Whether Strata can work on its image: a file-backed disk (not a
    /// cdrom or floppy) with a source, in qcow2 or raw format. Such a
    /// disk's file is a root of the file graph even when it is not
    /// snapshotted (see [`DomainDisk::snapshot_skip`]).
    pub fn is_eligible(&self) -> bool {
        self.kind == "file"
            && self.device == "disk"
            && self.source.is_some()
            && matches!(self.format.as_deref(), Some("qcow2") | Some("raw"))
    }

    /// Why `virsh snapshot-create-as --disk-only` (without `--diskspec`)
    /// leaves this disk out, or `None` when it takes an external snapshot
    /// of it: cdrom and floppy devices, `snapshot='no'`, read-only and
    /// shareable disks, and anything that is not a file-backed qcow2 or
    /// raw disk with a source.
    pub fn snapshot_skip(&self) -> Option<String> {
        if self.device != "disk" {
            return Some(format!("a {} device", self.device));
        }
        if self.snapshot.as_deref() == Some("no") {
            return Some("snapshot='no' in the domain definition".into());
        }
        if self.readonly {
            return Some("read-only (<readonly/>)".into());
        }
        if self.shareable {
            return Some("shareable (<shareable/>)".into());
        }
        if self.kind != "file" {
            return Some(format!("not a file-backed disk (type='{}')", self.kind));
        }
        if self.source.is_none() {
            return Some("no source file".into());
        }
        match self.format.as_deref() {
            Some("qcow2") | Some("raw") => None,
            Some(f) => Some(format!("format {f} (only qcow2 and raw are handled)")),
            None => Some("no <driver type=> (format unknown)".into()),
        }
    }
}

/// The `<disk>` elements of a `<domain>`.
pub(crate) fn domain_disks(domain: &Element) -> Vec<DomainDisk> {
    let Some(devices) = child(domain, "devices") else {
        return Vec::new();
    };
    children(devices, "disk")
        .filter_map(|d| {
            let target = child(d, "target").and_then(|t| attr(t, "dev"))?.to_string();
            Some(DomainDisk {
                target,
                kind: attr(d, "type").unwrap_or("file").to_string(),
                device: attr(d, "device").unwrap_or("disk").to_string(),
                source: child(d, "source")
                    .and_then(|s| attr(s, "file"))
                    .map(PathBuf::from),
                format: child(d, "driver")
                    .and_then(|s| attr(s, "type"))
                    .map(str::to_string),
                readonly: child(d, "readonly").is_some(),
                shareable: child(d, "shareable").is_some(),
                snapshot: attr(d, "snapshot").map(str::to_string),
            })
        })
        .collect()
}

fn disk_mut<'a>(domain: &'a mut Element, target: &str) -> Result<&'a mut Element> {
    let what = "domain XML";
    let devices =
        child_mut(domain, "devices").ok_or_else(|| Error::xml(what, "no <devices> element"))?;
    devices
        .children
        .iter_mut()
        .filter_map(XMLNode::as_mut_element)
        .find(|d| {
            d.name == "disk" && child(d, "target").and_then(|t| attr(t, "dev")) == Some(target)
        })
        .ok_or_else(|| Error::xml(what, format!("no <disk> with target {target}")))
}

/// Removes the `<backingStore>` of the disk `target`, so that libvirt
/// probes the chain from the image headers when it starts QEMU.
///
/// libvirt 9.0 trusts a `<backingStore>` in the persistent definition
/// (written there by a snapshot of a running domain) and hands that chain
/// to QEMU as it is; an empty `<backingStore/>` means "no backing file".
/// Once Strata changes a disk's source or chain, what is recorded there is
/// stale, so it goes; checked with QEMU's `query-named-block-nodes` in
/// tests/real_libvirtd.rs. A disk without `target` is not an error.
pub(crate) fn drop_backing_store(domain: &mut Element, target: &str) {
    if let Ok(disk) = disk_mut(domain, target) {
        disk.children.retain(|n| {
            !n.as_element()
                .is_some_and(|e| e.name == "backingStore" && e.namespace.is_none())
        });
    }
}

/// Sets `<source file=>` and `<driver type=>` of the disk `target` and
/// drops its (now stale) `<backingStore>`; nothing else of the document
/// changes.
pub(crate) fn set_disk_source(
    domain: &mut Element,
    target: &str,
    file: &Path,
    format: &str,
) -> Result<()> {
    let what = "domain XML";
    drop_backing_store(domain, target);
    let disk = disk_mut(domain, target)?;
    let file = file
        .to_str()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not UTF-8", file.display())))?;
    let source =
        child_mut(disk, "source").ok_or_else(|| Error::xml(what, "disk without <source>"))?;
    source.attributes.insert("file".into(), file.into());
    match child_mut(disk, "driver") {
        Some(driver) => {
            driver.attributes.insert("type".into(), format.into());
        }
        None => {
            let mut driver = Element::new("driver");
            driver.attributes.insert("name".into(), "qemu".into());
            driver.attributes.insert("type".into(), format.into());
            disk.children.insert(0, XMLNode::Element(driver));
        }
    }
    Ok(())
}

/// A file Strata created for a disk, as recorded in the domain's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFile {
    /// The disk target it belongs to.
    pub disk: String,
    /// The file.
    pub path: PathBuf,
}

fn is_strata(e: &Element) -> bool {
    e.name == "images" && e.namespace.as_deref() == Some(STRATA_NS)
}

/// The files Strata created, from `<metadata><strata:images>`.
pub(crate) fn owned_files(domain: &Element) -> Vec<OwnedFile> {
    let Some(meta) = child(domain, "metadata") else {
        return Vec::new();
    };
    let Some(images) = meta
        .children
        .iter()
        .filter_map(XMLNode::as_element)
        .find(|e| is_strata(e))
    else {
        return Vec::new();
    };
    images
        .children
        .iter()
        .filter_map(XMLNode::as_element)
        .filter(|e| e.name == "image")
        .filter_map(|e| {
            Some(OwnedFile {
                disk: attr(e, "disk")?.to_string(),
                path: PathBuf::from(attr(e, "path")?),
            })
        })
        .collect()
}

/// Replaces Strata's element in `<metadata>` with `owned` (removes it
/// when empty); other applications' metadata stays as it is.
pub(crate) fn set_owned_files(domain: &mut Element, owned: &[OwnedFile]) -> Result<()> {
    if child(domain, "metadata").is_none() {
        if owned.is_empty() {
            return Ok(());
        }
        domain
            .children
            .push(XMLNode::Element(Element::new("metadata")));
    }
    let meta = child_mut(domain, "metadata")
        .ok_or_else(|| Error::xml("domain XML", "no <metadata> element"))?;
    meta.children
        .retain(|n| !n.as_element().is_some_and(is_strata));
    if owned.is_empty() {
        return Ok(());
    }
    let mut images = Element::new("images");
    images.prefix = Some(STRATA_PREFIX.into());
    images.namespace = Some(STRATA_NS.into());
    let mut ns = Namespace::empty();
    ns.put(STRATA_PREFIX, STRATA_NS);
    images.namespaces = Some(ns.clone());
    for o in owned {
        let mut e = Element::new("image");
        e.prefix = Some(STRATA_PREFIX.into());
        e.namespace = Some(STRATA_NS.into());
        e.namespaces = Some(ns.clone());
        e.attributes.insert("disk".into(), o.disk.clone());
        let path = o
            .path
            .to_str()
            .ok_or_else(|| Error::InvalidArgument(format!("{}: not UTF-8", o.path.display())))?;
        e.attributes.insert("path".into(), path.into());
        images.children.push(XMLNode::Element(e));
    }
    meta.children.push(XMLNode::Element(images));
    Ok(())
}

/// One `<disk>` of a `<domainsnapshot>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapDiskXml {
    /// Disk target (`name=`).
    pub target: String,
    /// `snapshot=` (`external`, `internal`, `no`).
    pub snapshot: String,
    /// The overlay created by the snapshot (`<source file=>`).
    pub overlay: Option<PathBuf>,
}

/// The parts of a `<domainsnapshot>` Strata reads.
#[derive(Debug, Clone)]
pub(crate) struct SnapXml {
    pub name: String,
    pub description: Option<String>,
    pub state: String,
    pub creation_time: i64,
    pub parent: Option<String>,
    pub disks: Vec<SnapDiskXml>,
    /// `<memory snapshot=>` (`no`, `internal`, `external`; empty when absent).
    pub memory: String,
    /// `<memory file=>`: the memory state file of an external snapshot.
    pub memory_file: Option<PathBuf>,
    /// The domain definition saved with the snapshot.
    pub domain: Option<Element>,
}

impl SnapXml {
    /// Whether any state of the snapshot is inside an image
    /// (`snapshot='internal'` disks or memory).
    pub fn is_internal(&self) -> bool {
        self.memory == "internal" || self.disks.iter().any(|d| d.snapshot == "internal")
    }
}

pub(crate) fn read_snapshot(e: &Element) -> Result<SnapXml> {
    let name = text_of(e, "name").ok_or_else(|| Error::xml("snapshot XML", "no <name> element"))?;
    let disks = child(e, "disks")
        .map(|d| {
            children(d, "disk")
                .filter_map(|d| {
                    Some(SnapDiskXml {
                        target: attr(d, "name")?.to_string(),
                        snapshot: attr(d, "snapshot").unwrap_or("").to_string(),
                        overlay: child(d, "source")
                            .and_then(|s| attr(s, "file"))
                            .map(PathBuf::from),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let memory = child(e, "memory");
    Ok(SnapXml {
        memory: memory
            .and_then(|m| attr(m, "snapshot"))
            .unwrap_or("")
            .to_string(),
        memory_file: memory.and_then(|m| attr(m, "file")).map(PathBuf::from),
        description: text_of(e, "description"),
        state: text_of(e, "state").unwrap_or_default(),
        creation_time: text_of(e, "creationTime")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
        parent: child(e, "parent").and_then(|p| text_of(p, "name")),
        disks,
        domain: child(e, "domain").cloned(),
        name,
    })
}

fn text_element(name: &str, text: &str) -> Element {
    let mut e = Element::new(name);
    e.children.push(XMLNode::Text(text.to_string()));
    e
}

/// A new disk-only external snapshot of a shut-off domain, as libvirt
/// itself records one (`virsh snapshot-create-as --disk-only` on an
/// inactive domain): state `shutoff`, no memory, one `<disk>` per disk of
/// the domain (`external` with the overlay, or `no`), and the domain
/// definition as it was when the snapshot was taken.
pub(crate) struct NewSnapshot<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub parent: Option<&'a str>,
    pub creation_time: i64,
    /// (target, overlay when the disk is snapshotted, its format).
    pub disks: Vec<(String, Option<PathBuf>)>,
    pub domain: Element,
}

pub(crate) fn build_snapshot(s: NewSnapshot<'_>) -> Result<Element> {
    let mut root = Element::new("domainsnapshot");
    let mut push = |e: Element| root.children.push(XMLNode::Element(e));
    push(text_element("name", s.name));
    if let Some(d) = s.description {
        push(text_element("description", d));
    }
    push(text_element("state", "shutoff"));
    if let Some(p) = s.parent {
        let mut parent = Element::new("parent");
        parent
            .children
            .push(XMLNode::Element(text_element("name", p)));
        push(parent);
    }
    push(text_element("creationTime", &s.creation_time.to_string()));
    let mut memory = Element::new("memory");
    memory.attributes.insert("snapshot".into(), "no".into());
    push(memory);
    let mut disks = Element::new("disks");
    for (target, overlay) in &s.disks {
        let mut d = Element::new("disk");
        d.attributes.insert("name".into(), target.clone());
        match overlay {
            Some(path) => {
                d.attributes.insert("snapshot".into(), "external".into());
                d.attributes.insert("type".into(), "file".into());
                let mut driver = Element::new("driver");
                driver.attributes.insert("type".into(), "qcow2".into());
                d.children.push(XMLNode::Element(driver));
                let mut source = Element::new("source");
                let p = path.to_str().ok_or_else(|| {
                    Error::InvalidArgument(format!("{}: not UTF-8", path.display()))
                })?;
                source.attributes.insert("file".into(), p.into());
                d.children.push(XMLNode::Element(source));
            }
            None => {
                d.attributes.insert("snapshot".into(), "no".into());
            }
        }
        disks.children.push(XMLNode::Element(d));
    }
    push(disks);
    push(s.domain);
    Ok(root)
}

/// Changes where the snapshot's saved domain definition has the disk
/// `target` (the file holding the snapshot's state).
pub(crate) fn set_snapshot_state_file(
    snap: &mut Element,
    target: &str,
    file: &Path,
    format: &str,
) -> Result<()> {
    let domain = child_mut(snap, "domain")
        .ok_or_else(|| Error::xml("snapshot XML", "no <domain> element"))?;
    set_disk_source(domain, target, file, format)
}

/// [`drop_backing_store`] in the domain definition saved inside a
/// snapshot; returns whether there was one to drop.
pub(crate) fn drop_snapshot_backing_store(snap: &mut Element, target: &str) -> bool {
    let Some(domain) = child_mut(snap, "domain") else {
        return false;
    };
    let before = write(domain, "snapshot XML").ok();
    drop_backing_store(domain, target);
    before != write(domain, "snapshot XML").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='test'>
  <name>vm</name>
  <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
  <metadata>
    <other:thing xmlns:other="http://other.example/1">keep me</other:thing>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/kvm/test.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/x.iso'/>
      <target dev='hdc' bus='ide'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn disks_are_read_and_only_file_disks_are_eligible() {
        let d = parse(DOMAIN, "t").unwrap();
        let disks = domain_disks(&d);
        assert_eq!(disks.len(), 2);
        assert!(disks[0].is_eligible());
        assert_eq!(
            disks[0].source.as_deref(),
            Some(Path::new("/kvm/test.qcow2"))
        );
        assert!(!disks[1].is_eligible());
    }

    #[test]
    fn swapping_a_disk_changes_source_and_driver_only() {
        let mut d = parse(DOMAIN, "t").unwrap();
        set_disk_source(&mut d, "vda", Path::new("/kvm/test.take-1"), "qcow2").unwrap();
        let text = write(&d, "t").unwrap();
        let again = parse(&text, "t").unwrap();
        let disks = domain_disks(&again);
        assert_eq!(
            disks[0].source.as_deref(),
            Some(Path::new("/kvm/test.take-1"))
        );
        assert_eq!(disks[1].source.as_deref(), Some(Path::new("/iso/x.iso")));
        assert!(text.contains("6695eb01-f6a4-8304-79aa-97f2502e193f"));
        assert!(text.contains("keep me"));
    }

    #[test]
    fn swapping_a_disk_drops_its_stale_backing_store_only() {
        let text = DOMAIN.replace(
            "<target dev='vda' bus='virtio'/>",
            "<backingStore type='file'><format type='qcow2'/><source file='/kvm/old'/>\
             <backingStore/></backingStore><target dev='vda' bus='virtio'/>",
        );
        let text = text.replace(
            "<target dev='hdc' bus='ide'/>",
            "<backingStore/><target dev='hdc' bus='ide'/>",
        );
        let mut d = parse(&text, "t").unwrap();
        set_disk_source(&mut d, "vda", Path::new("/kvm/test.take-1"), "qcow2").unwrap();
        let out = write(&d, "t").unwrap();
        assert!(!out.contains("/kvm/old"), "{out}");
        assert_eq!(
            out.matches("<backingStore").count(),
            1,
            "hdc keeps its own: {out}"
        );
    }

    #[test]
    fn disks_libvirt_leaves_out_of_a_disk_only_snapshot_say_why() {
        let text = DOMAIN.replace(
            "</devices>",
            "<disk type='file' device='disk' snapshot='no'><driver type='qcow2'/>\
             <source file='/a'/><target dev='vdb'/></disk>\
             <disk type='file' device='disk'><driver type='raw'/><source file='/b'/>\
             <target dev='vdc'/><readonly/></disk>\
             <disk type='file' device='disk'><driver type='raw'/><source file='/c'/>\
             <target dev='vdd'/><shareable/></disk>\
             <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/x'/>\
             <target dev='vde'/></disk></devices>",
        );
        let d = parse(&text, "t").unwrap();
        let why: Vec<Option<String>> = domain_disks(&d).iter().map(|d| d.snapshot_skip()).collect();
        assert_eq!(why[0], None);
        assert!(why[1].as_deref().unwrap().contains("cdrom"));
        assert!(why[2].as_deref().unwrap().contains("snapshot='no'"));
        assert!(why[3].as_deref().unwrap().contains("read-only"));
        assert!(why[4].as_deref().unwrap().contains("shareable"));
        assert!(why[5].as_deref().unwrap().contains("type='block'"));
    }

    #[test]
    fn owned_files_round_trip_next_to_foreign_metadata() {
        let mut d = parse(DOMAIN, "t").unwrap();
        let owned = vec![OwnedFile {
            disk: "vda".into(),
            path: "/kvm/test.take-1".into(),
        }];
        set_owned_files(&mut d, &owned).unwrap();
        let text = write(&d, "t").unwrap();
        let again = parse(&text, "t").unwrap();
        assert_eq!(owned_files(&again), owned);
        assert!(text.contains("keep me"));
        let mut again = again;
        set_owned_files(&mut again, &[]).unwrap();
        assert!(owned_files(&again).is_empty());
        assert!(write(&again, "t").unwrap().contains("keep me"));
    }

    #[test]
    fn new_snapshot_reads_back() {
        let d = parse(DOMAIN, "t").unwrap();
        let s = build_snapshot(NewSnapshot {
            name: "take-1",
            description: Some("first snapshot"),
            parent: Some("take-0"),
            creation_time: 1594000000,
            disks: vec![("vda".into(), Some("/kvm/test.take-1".into()))],
            domain: d,
        })
        .unwrap();
        let text = write(&s, "t").unwrap();
        let r = read_snapshot(&parse(&text, "t").unwrap()).unwrap();
        assert_eq!(r.name, "take-1");
        assert_eq!(r.parent.as_deref(), Some("take-0"));
        assert_eq!(r.description.as_deref(), Some("first snapshot"));
        assert_eq!(r.creation_time, 1594000000);
        assert_eq!(
            r.disks[0].overlay.as_deref(),
            Some(Path::new("/kvm/test.take-1"))
        );
        let dom = r.domain.unwrap();
        assert_eq!(
            domain_disks(&dom)[0].source.as_deref(),
            Some(Path::new("/kvm/test.qcow2"))
        );
    }
}

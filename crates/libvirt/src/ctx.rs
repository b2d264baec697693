//! What every operation starts from (the domain, its XML, its snapshots),
//! the file graph (which image backs which), and the transaction that
//! undoes libvirt changes and removes created files on failure.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use strata_image::backing::{self, FileId};
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{FileStorage, ImageFormat};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::domain_snapshot::DomainSnapshot;
use virt::sys;
use xmltree::Element;

use crate::error::{Error, Result};
use crate::xml::{self, DomainDisk, OwnedFile, SnapXml};

/// A snapshot as loaded at the start of an operation.
#[derive(Debug, Clone)]
pub(crate) struct Snap {
    /// The XML as libvirt gave it (restored verbatim on rollback).
    pub text: String,
    /// The parsed document (edited for redefinition).
    pub tree: Element,
    /// What Strata reads of it.
    pub info: SnapXml,
    /// Whether it is the domain's current snapshot.
    pub current: bool,
}

impl Snap {
    /// The file holding this snapshot's state of disk `target` (the disk's
    /// source in the saved domain definition) and its format, for an
    /// external snapshot of that disk.
    pub fn state_file(&self, target: &str) -> Option<(PathBuf, Option<String>)> {
        let d = self.info.disks.iter().find(|d| d.target == target)?;
        if d.snapshot != "external" {
            return None;
        }
        let domain = self.info.domain.as_ref()?;
        let disk = xml::domain_disks(domain)
            .into_iter()
            .find(|d| d.target == target)?;
        Some((disk.source?, disk.format))
    }
    /// The overlay this snapshot created for disk `target`.
    pub fn overlay(&self, target: &str) -> Option<PathBuf> {
        self.info
            .disks
            .iter()
            .find(|d| d.target == target && d.snapshot == "external")
            .and_then(|d| d.overlay.clone())
    }
    /// Targets of the disks this snapshot has external state for.
    pub fn external_disks(&self) -> Vec<String> {
        self.info
            .disks
            .iter()
            .filter(|d| d.snapshot == "external")
            .map(|d| d.target.clone())
            .collect()
    }
}

/// The per-domain lock: an exclusive `flock` on `<lock dir>/<key>.lock`,
/// where the key is the domain's UUID (with a hash of the URI for
/// libvirt's in-process test driver, whose domains are private to each
/// connection). The lock dir is `$STRATA_LOCK_DIR`, else `/run/strata`
/// when it can be created (root), else `$XDG_RUNTIME_DIR/strata`, else
/// `strata-locks` in the temporary directory (removed when empty). The file is removed while
/// still locked when the operation ends; a locker that finds its file was
/// unlinked under it tries again, so two holders are impossible.
#[derive(Debug)]
pub(crate) struct DomainLock {
    file: fs::File,
    path: PathBuf,
    remove_dir: bool,
}

/// (the directory, whether to remove it when empty after use).
fn lock_dir() -> (PathBuf, bool) {
    if let Some(d) = std::env::var_os("STRATA_LOCK_DIR").filter(|d| !d.is_empty()) {
        return (PathBuf::from(d), false);
    }
    let run = PathBuf::from("/run/strata");
    if run.is_dir() || fs::create_dir(&run).is_ok() {
        // Every user's lock files in one place (sticky, like /tmp).
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&run, fs::Permissions::from_mode(0o1777));
        return (run, false);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return (PathBuf::from(d).join("strata"), false);
    }
    (std::env::temp_dir().join("strata-locks"), true)
}

fn open_lock(path: &Path) -> std::io::Result<fs::File> {
    let rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path);
    match rw {
        // Another user's lock file: flock works on a read-only descriptor.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => fs::File::open(path),
        r => r,
    }
}

impl DomainLock {
    /// Takes the lock of the domain `uuid` or refuses with [`Error::Busy`].
    pub fn acquire(conn: &Connect, domain: &str, uuid: &str) -> Result<DomainLock> {
        let mut key = uuid.to_string();
        if conn
            .get_type()
            .is_ok_and(|t| t.eq_ignore_ascii_case("test"))
        {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            conn.get_uri().unwrap_or_default().hash(&mut h);
            key = format!("test-{:016x}-{uuid}", h.finish());
        }
        let (dir, remove_dir) = lock_dir();
        let path = dir.join(format!("{key}.lock"));
        for _ in 0..100 {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create lock directory", e))?;
            let file = match open_lock(&path) {
                Ok(f) => f,
                // The directory was removed by a holder that just finished.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, "open lock file", e)),
            };
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::Busy {
                        domain: domain.to_string(),
                        lock: path,
                    })
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(Error::io(&path, "lock", e));
                }
            }
            // The holder before us may have unlinked the file between our
            // open and our lock: then we hold a lock nobody else can see.
            let ours = FileId::of_file(&file).map_err(|e| Error::io(&path, "stat lock", e))?;
            match FileId::of(&path) {
                Ok(id) if id == ours => {
                    return Ok(DomainLock {
                        file,
                        path,
                        remove_dir,
                    });
                }
                _ => continue,
            }
        }
        Err(Error::Busy {
            domain: domain.to_string(),
            lock: path,
        })
    }
}

impl Drop for DomainLock {
    fn drop(&mut self) {
        // Unlinked while still held: see the type's documentation.
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
        if self.remove_dir {
            if let Some(dir) = self.path.parent() {
                let _ = fs::remove_dir(dir); // only when empty
            }
        }
    }
}

/// The domain and its snapshots, loaded once per operation.
pub(crate) struct Ctx<'c> {
    pub conn: &'c Connect,
    pub dom: Domain,
    /// Held for the whole operation; everything below was read under it.
    pub _lock: DomainLock,
    pub name: String,
    /// The inactive definition as libvirt gave it.
    pub text: String,
    pub xml: Element,
    pub snaps: Vec<Snap>,
    /// The domain runs (or is paused): its live definition, what QEMU
    /// has open. `None`: shut off.
    pub live: Option<Element>,
}

fn state_name(dom: &Domain) -> String {
    match dom.get_state().map(|s| s.0) {
        Ok(sys::VIR_DOMAIN_RUNNING) => "running".into(),
        Ok(sys::VIR_DOMAIN_PAUSED) => "paused".into(),
        Ok(sys::VIR_DOMAIN_BLOCKED) => "blocked".into(),
        Ok(sys::VIR_DOMAIN_PMSUSPENDED) => "suspended".into(),
        Ok(sys::VIR_DOMAIN_SHUTDOWN) => "shutting down".into(),
        _ => "active".into(),
    }
}

impl<'c> Ctx<'c> {
    /// Looks the domain up, takes its lock ([`DomainLock`]), then loads its
    /// XML and snapshots (so the plan is made from what libvirt says under
    /// the lock); a running or paused (persistent) domain comes with its
    /// live definition in [`Ctx::live`].
    pub fn load_any(conn: &'c Connect, name: &str) -> Result<Ctx<'c>> {
        Ctx::load_inner(conn, name, true)
    }

    fn load_inner(conn: &'c Connect, name: &str, allow_active: bool) -> Result<Ctx<'c>> {
        let dom = Domain::lookup_by_name(conn, name)
            .map_err(|e| Error::libvirt(format!("look up domain {name:?}"), e))?;
        let uuid = dom
            .get_uuid_string()
            .map_err(|e| Error::libvirt("get domain UUID", e))?;
        let lock = DomainLock::acquire(conn, name, &uuid)?;
        let active = dom
            .is_active()
            .map_err(|e| Error::libvirt("query domain state", e))?;
        if active && !allow_active {
            return Err(Error::DomainActive {
                domain: name.to_string(),
                state: state_name(&dom),
            });
        }
        let mut ctx = Ctx {
            conn,
            dom,
            _lock: lock,
            name: name.to_string(),
            text: String::new(),
            xml: Element::new("domain"),
            snaps: Vec::new(),
            live: None,
        };
        ctx.refresh()?;
        if ctx.live.is_some()
            && !ctx
                .dom
                .is_persistent()
                .map_err(|e| Error::libvirt("query domain persistence", e))?
        {
            return Err(Error::Unsupported(format!(
                "domain {name:?} is transient (it has no persistent definition): Strata keeps \
                 its records in the persistent definition; define it first (virsh dumpxml \
                 {name} > {name}.xml; virsh define {name}.xml); nothing was changed"
            )));
        }
        Ok(ctx)
    }

    /// The domain's state name ("running", "paused", ...).
    pub fn state_name(&self) -> String {
        state_name(&self.dom)
    }

    /// Reads the domain XML (inactive and, when active, live) and the
    /// snapshots again (after a live job changed them, or the domain was
    /// stopped).
    pub fn refresh(&mut self) -> Result<()> {
        let dom = &self.dom;
        let active = dom
            .is_active()
            .map_err(|e| Error::libvirt("query domain state", e))?;
        let text = dom
            .get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| Error::libvirt("dump domain XML", e))?;
        let xml = xml::parse(&text, "domain XML")?;
        let mut snaps = Vec::new();
        for s in dom
            .list_all_snapshots(0)
            .map_err(|e| Error::libvirt("list snapshots", e))?
        {
            snaps.push(load_snap(&s)?);
        }
        snaps.sort_by(|a, b| {
            (a.info.creation_time, &a.info.name).cmp(&(b.info.creation_time, &b.info.name))
        });
        let live = if active {
            let t = dom
                .get_xml_desc(sys::VIR_DOMAIN_XML_SECURE)
                .map_err(|e| Error::libvirt("dump live domain XML", e))?;
            Some(xml::parse(&t, "live domain XML")?)
        } else {
            None
        };
        self.text = text;
        self.xml = xml;
        self.snaps = snaps;
        self.live = live;
        Ok(())
    }

    pub fn snap(&self, name: &str) -> Result<&Snap> {
        self.snaps
            .iter()
            .find(|s| s.info.name == name)
            .ok_or_else(|| Error::NoSuchSnapshot {
                domain: self.name.clone(),
                name: name.to_string(),
            })
    }

    pub fn current(&self) -> Option<&Snap> {
        self.snaps.iter().find(|s| s.current)
    }

    pub fn disks(&self) -> Vec<DomainDisk> {
        xml::domain_disks(&self.xml)
    }

    /// The eligible disk `target`, or the only eligible disk.
    pub fn disk(&self, target: Option<&str>) -> Result<DomainDisk> {
        let eligible: Vec<DomainDisk> = self
            .disks()
            .into_iter()
            .filter(DomainDisk::is_eligible)
            .collect();
        let no = |why: String| Error::NoSuchDisk {
            domain: self.name.clone(),
            why,
        };
        match target {
            Some(t) => {
                let d = self
                    .disks()
                    .into_iter()
                    .find(|d| d.target == t || d.source.as_deref() == Some(Path::new(t)))
                    .ok_or_else(|| no(format!("no disk {t}")))?;
                if !d.is_eligible() {
                    return Err(no(format!(
                        "disk {} is not a file-backed qcow2 or raw disk",
                        d.target
                    )));
                }
                Ok(d)
            }
            None => match eligible.as_slice() {
                [d] => Ok(d.clone()),
                [] => Err(no("no file-backed qcow2 or raw disk".into())),
                _ => Err(no(format!(
                    "several disks ({}): choose one",
                    eligible
                        .iter()
                        .map(|d| d.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            },
        }
    }

    pub fn owned(&self) -> Vec<OwnedFile> {
        xml::owned_files(&self.xml)
    }

    /// Overlays named as a snapshot's external `<source>` in libvirt's
    /// snapshot metadata (libvirt or Strata made them for that snapshot).
    pub fn snapshot_overlays(&self) -> Vec<OwnedFile> {
        let mut v = Vec::new();
        for s in &self.snaps {
            for t in s.external_disks() {
                if let Some(o) = s.overlay(&t) {
                    v.push(OwnedFile { disk: t, path: o });
                }
            }
        }
        v
    }

    /// Files Strata may merge away and remove when nothing needs them:
    /// the ones it created ([`Ctx::owned`]) and the overlays a snapshot's
    /// metadata names ([`Ctx::snapshot_overlays`]), as libvirt 9.7+ itself
    /// treats them. Anything else (the user's images) is never removed.
    pub fn removable(&self) -> Vec<OwnedFile> {
        let mut v = self.owned();
        v.extend(self.snapshot_overlays());
        v
    }

    pub fn is_owned(&self, path: &Path) -> bool {
        let c = canon(path);
        self.removable().iter().any(|o| canon(&o.path) == c)
    }

    /// Every file the domain or its snapshots name, with its format when
    /// known, for [`Graph::load`].
    pub fn known_files(&self) -> Vec<(PathBuf, Option<ImageFormat>)> {
        let mut v = Vec::new();
        for d in self.disks().into_iter().filter(DomainDisk::is_eligible) {
            if let Some(src) = d.source {
                v.push((src, d.format.as_deref().and_then(ImageFormat::from_name)));
            }
        }
        for s in &self.snaps {
            for t in s.external_disks() {
                if let Some((f, fmt)) = s.state_file(&t) {
                    v.push((f, fmt.as_deref().and_then(ImageFormat::from_name)));
                }
                if let Some(o) = s.overlay(&t) {
                    v.push((o, Some(ImageFormat::Qcow2)));
                }
            }
        }
        for o in self.owned() {
            v.push((o.path, None));
        }
        v
    }

    /// State files of every snapshot not in `except`, canonical.
    pub fn state_roots(&self, except: &[&str]) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for s in &self.snaps {
            if except.contains(&s.info.name.as_str()) {
                continue;
            }
            for t in s.external_disks() {
                if let Some((f, _)) = s.state_file(&t) {
                    v.push(canon(&f));
                }
            }
        }
        v
    }

    /// Active files of the eligible disks, canonical, by target.
    pub fn actives(&self) -> Vec<(String, PathBuf)> {
        self.disks()
            .into_iter()
            .filter(DomainDisk::is_eligible)
            .filter_map(|d| Some((d.target, canon(&d.source?))))
            .collect()
    }
}

fn load_snap(s: &DomainSnapshot) -> Result<Snap> {
    let text = s
        .get_xml_desc(sys::VIR_DOMAIN_SNAPSHOT_XML_SECURE)
        .map_err(|e| Error::libvirt("dump snapshot XML", e))?;
    let tree = xml::parse(&text, "snapshot XML")?;
    let info = xml::read_snapshot(&tree)?;
    let current = s
        .is_current(0)
        .map_err(|e| Error::libvirt(format!("query snapshot {}", info.name), e))?;
    Ok(Snap {
        text,
        tree,
        info,
        current,
    })
}

/// A path made canonical when the file exists (identity for comparisons).
pub(crate) fn canon(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.into()))
}

/// One image file of the graph.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub format: ImageFormat,
    pub virtual_size: u64,
    /// Canonical path of the backing file, with its format.
    pub backing: Option<(PathBuf, ImageFormat)>,
}

/// Which file backs which: every file the domain and its snapshots name,
/// and their backing chains, keyed by canonical path. Missing files are
/// left out.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    pub nodes: HashMap<PathBuf, Node>,
}

/// Reads `path`'s header alone (no backing files opened, no locks taken).
fn open_alone(path: &Path, format: Option<ImageFormat>) -> Result<Node> {
    let peek = backing::peek(path, format)?;
    let backing = match peek.backing {
        Some(b) => {
            let fmt = b
                .format
                .as_deref()
                .and_then(ImageFormat::from_name)
                .ok_or_else(|| {
                    Error::Image(strata_image::Error::BackingFormatUnknown {
                        path: path.to_path_buf(),
                        backing: b.name.clone(),
                    })
                })?;
            Some((canon(&backing::resolve_backing_path(path, &b.name)), fmt))
        }
        None => None,
    };
    Ok(Node {
        format: peek.format,
        virtual_size: peek.virtual_size,
        backing,
    })
}

impl Graph {
    pub fn load(files: &[(PathBuf, Option<ImageFormat>)]) -> Result<Graph> {
        let mut g = Graph::default();
        let mut todo: Vec<(PathBuf, Option<ImageFormat>)> =
            files.iter().map(|(p, f)| (canon(p), *f)).collect();
        let mut steps = 0usize;
        while let Some((p, fmt)) = todo.pop() {
            if g.nodes.contains_key(&p) || !p.is_file() {
                continue;
            }
            steps += 1;
            if steps > 10_000 {
                return Err(Error::InvalidArgument(
                    "too many images in the domain's backing chains".into(),
                ));
            }
            let node = open_alone(&p, fmt)?;
            if let Some((b, bf)) = &node.backing {
                todo.push((b.clone(), Some(*bf)));
            }
            g.nodes.insert(p, node);
        }
        Ok(g)
    }

    pub fn node(&self, p: &Path) -> Option<&Node> {
        self.nodes.get(&canon(p))
    }

    /// Every file the roots read through (the roots included).
    pub fn closure(&self, roots: &[PathBuf]) -> HashSet<PathBuf> {
        let mut seen = HashSet::new();
        for r in roots {
            let mut cur = Some(canon(r));
            while let Some(p) = cur {
                if !seen.insert(p.clone()) {
                    break;
                }
                cur = self
                    .nodes
                    .get(&p)
                    .and_then(|n| n.backing.as_ref().map(|b| b.0.clone()));
            }
        }
        seen
    }

    /// Files of the graph whose backing file is `of`, restricted to `within`.
    pub fn children(&self, of: &Path, within: &HashSet<PathBuf>) -> Vec<PathBuf> {
        let of = canon(of);
        let mut v: Vec<PathBuf> = self
            .nodes
            .iter()
            .filter(|(p, n)| within.contains(*p) && n.backing.as_ref().is_some_and(|b| b.0 == of))
            .map(|(p, _)| p.clone())
            .collect();
        v.sort();
        v
    }
}

/// Images outside `known` in `path`'s directory whose backing file is
/// `path`: files Strata did not make that would break if `path` went away.
pub(crate) fn foreign_users(path: &Path, known: &HashSet<PathBuf>) -> Vec<PathBuf> {
    let target = canon(path);
    let Some(dir) = target.parent() else {
        return Vec::new();
    };
    let exclude: Vec<FileId> = known.iter().filter_map(|p| FileId::try_of(p)).collect();
    backing::users_of(&target, &[dir.to_path_buf()], &[], &exclude)
        .map(|users| users.iter().map(|p| canon(p)).collect())
        .unwrap_or_default()
}

/// libvirt's default name of an external snapshot file: the source with
/// its suffix replaced by the snapshot name (`/kvm/test.qcow2` ->
/// `/kvm/test.take-1`), or the name appended when there is no suffix.
pub fn default_overlay_path(source: &Path, snapshot: &str) -> PathBuf {
    let file = source
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match file.rfind('.') {
        Some(i) if i > 0 => &file[..i],
        _ => file.as_str(),
    };
    source.with_file_name(format!("{stem}.{snapshot}"))
}

/// `base` if free, else `base-1`, `base-2`, ...
pub(crate) fn unique_path(base: &Path, taken: &BTreeSet<PathBuf>) -> PathBuf {
    let free = |p: &Path| !p.exists() && !taken.contains(p);
    if free(base) {
        return base.to_path_buf();
    }
    let name = base
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    (1..)
        .map(|i| base.with_file_name(format!("{name}-{i}")))
        .find(|p| free(p))
        .unwrap_or_else(|| base.to_path_buf())
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not UTF-8", p.display())))
}

/// Undo log of one operation.
pub(crate) struct Txn<'a, 'c> {
    ctx: &'a Ctx<'c>,
    created: Vec<PathBuf>,
    domain_defined: bool,
    snaps_added: Vec<String>,
    snaps_changed: bool,
    /// Fresh files to move into place at commit: (temporary, final).
    renames: Vec<(PathBuf, PathBuf)>,
}

impl<'a, 'c> Txn<'a, 'c> {
    pub fn new(ctx: &'a Ctx<'c>) -> Txn<'a, 'c> {
        Txn {
            ctx,
            created: Vec::new(),
            domain_defined: false,
            snaps_added: Vec::new(),
            snaps_changed: false,
            renames: Vec::new(),
        }
    }

    /// Creates a qcow2 overlay at `path` (which must not exist) on
    /// `backing` (recorded by its absolute path, with its format).
    pub fn create_overlay(
        &mut self,
        path: &Path,
        backing: &Path,
        format: ImageFormat,
        size: u64,
    ) -> Result<()> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::FileExists(path.to_path_buf())
                } else {
                    Error::io(path, "create overlay", e)
                }
            })?;
        self.created.push(path.to_path_buf());
        let storage = FileStorage::from_file(file, path);
        let opts = CreateOptions {
            size,
            backing: Some((path_str(backing)?.to_string(), format)),
            ..CreateOptions::default()
        };
        let img = create_qcow2(Box::new(storage), path, &opts)?;
        drop(img);
        Ok(())
    }

    /// Creates the overlay at a temporary name beside `path`, moved over
    /// `path` by [`Txn::finish`] (for reusing the name of a file that is
    /// discarded by the same operation).
    pub fn create_overlay_replacing(
        &mut self,
        path: &Path,
        backing: &Path,
        format: ImageFormat,
        size: u64,
    ) -> Result<()> {
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.strata-new"));
        if tmp.exists() {
            // A leftover of an interrupted run: never ours to keep.
            fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, "remove leftover", e))?;
        }
        self.create_overlay(&tmp, backing, format, size)?;
        self.renames.push((tmp, path.to_path_buf()));
        Ok(())
    }

    pub fn define_domain(&mut self, domain: &Element) -> Result<()> {
        let text = xml::write(domain, "domain XML")?;
        crate::testing::fail_point("define_domain")?;
        self.domain_defined = true;
        Domain::define_xml(self.ctx.conn, &text).map_err(|e| Error::libvirt("define domain", e))?;
        Ok(())
    }

    /// (Re)defines a snapshot from XML with the REDEFINE flag.
    pub fn define_snapshot(&mut self, snap: &Element, name: &str, current: bool) -> Result<()> {
        let text = xml::write(snap, "snapshot XML")?;
        crate::testing::fail_point("define_snapshot")?;
        let is_new = !self.ctx.snaps.iter().any(|s| s.info.name == name);
        if is_new {
            self.snaps_added.push(name.to_string());
        } else {
            self.snaps_changed = true;
        }
        redefine(&self.ctx.dom, &text, name, current)
    }

    pub fn delete_snapshot_metadata(&mut self, name: &str) -> Result<()> {
        crate::testing::fail_point("delete_snapshot")?;
        self.snaps_changed = true;
        let s = DomainSnapshot::lookup_by_name(&self.ctx.dom, name, 0)
            .map_err(|e| Error::libvirt(format!("look up snapshot {name}"), e))?;
        delete_metadata(self.ctx.conn, &s, name)
    }

    /// Moves fresh files into place. After this nothing is undone.
    pub fn finish(mut self) -> Result<()> {
        let renames = std::mem::take(&mut self.renames);
        for (tmp, dst) in &renames {
            if let Err(e) = fs::rename(tmp, dst) {
                let err = Error::io(dst, "move new overlay into place", e);
                self.renames = renames.clone();
                return Err(self.rollback(err));
            }
        }
        Ok(())
    }

    /// Undoes everything recorded, returns `err` wrapped with what could
    /// not be undone.
    pub fn rollback(self, err: Error) -> Error {
        let ctx = self.ctx;
        let mut problems = Vec::new();
        for name in self.snaps_added.iter().rev() {
            if let Ok(s) = DomainSnapshot::lookup_by_name(&ctx.dom, name, 0) {
                if let Err(e) = delete_metadata(ctx.conn, &s, name) {
                    problems.push(e.to_string());
                }
            }
        }
        if self.snaps_changed || !self.snaps_added.is_empty() {
            // Parents before children; the current one last, as current.
            let mut done: HashSet<&str> = HashSet::new();
            let mut pending: Vec<&Snap> = ctx.snaps.iter().collect();
            while !pending.is_empty() {
                let before = pending.len();
                pending.retain(|s| {
                    let ready = s
                        .info
                        .parent
                        .as_deref()
                        .is_none_or(|p| done.contains(p) || ctx.snap(p).is_err());
                    if ready {
                        if let Err(e) = redefine(&ctx.dom, &s.text, &s.info.name, false) {
                            problems.push(e.to_string());
                        }
                        done.insert(s.info.name.as_str());
                    }
                    !ready
                });
                if pending.len() == before {
                    break;
                }
            }
            if let Some(cur) = ctx.current() {
                if let Err(e) = redefine(&ctx.dom, &cur.text, &cur.info.name, true) {
                    problems.push(e.to_string());
                }
            }
        }
        if self.domain_defined {
            if let Err(e) = Domain::define_xml(ctx.conn, &ctx.text) {
                problems.push(format!("restore domain XML: {e}"));
            }
        }
        for p in self.created.iter().rev() {
            if let Err(e) = fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("remove {}: {e}", p.display()));
                }
            }
        }
        Error::RolledBack {
            cause: Box::new(err),
            problems,
        }
    }
}

/// Removes a snapshot from libvirt's metadata only (its files stay).
/// libvirt's test driver keeps nothing but metadata and does not know the
/// flag: there, and only there, a plain delete is the same thing.
fn delete_metadata(conn: &Connect, s: &DomainSnapshot, name: &str) -> Result<()> {
    match s.delete(sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY) {
        Ok(()) => Ok(()),
        Err(e)
            if e.code() == virt::error::ErrorNumber::InvalidArg
                && conn
                    .get_type()
                    .is_ok_and(|t| t.eq_ignore_ascii_case("test")) =>
        {
            s.delete(0)
                .map_err(|e| Error::libvirt(format!("delete snapshot {name} metadata"), e))
        }
        Err(e) => Err(Error::libvirt(
            format!("delete snapshot {name} metadata"),
            e,
        )),
    }
}

fn redefine(dom: &Domain, text: &str, name: &str, current: bool) -> Result<()> {
    let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE;
    if current {
        flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT;
    }
    DomainSnapshot::create_xml(dom, text, flags)
        .map(drop)
        .map_err(|e| Error::libvirt(format!("redefine snapshot {name}"), e))
}

/// Removes files no longer needed; returns (removed, warnings).
pub(crate) fn remove_files(files: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let mut removed = Vec::new();
    let mut warnings = Vec::new();
    for f in files {
        match fs::remove_file(f) {
            Ok(()) => removed.push(f.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warnings.push(format!("could not remove {}: {e}", f.display())),
        }
    }
    (removed, warnings)
}

/// Virtual size and format of `path` alone.
pub(crate) fn image_of(path: &Path, format: Option<ImageFormat>) -> Result<Node> {
    open_alone(path, format)
}

//! Everything about backing files that does not need a whole open image:
//! reading the backing name and format from a qcow2 header, resolving a
//! backing name relative to the image naming it, file identity, the list
//! of files a chain reads through, the images in a directory that use a
//! file as their backing file, and the header-only rebase.
//!
//! The rules are those of [`Chain::open`](crate::Chain::open) (see
//! docs/backing-policy.md): relative names resolve against the directory
//! of the image naming them; protocol and JSON names are refused; a
//! backing file's format comes from the image's backing-format extension,
//! never from probing; loops and chains deeper than
//! [`limits::MAX_CHAIN_DEPTH`] are refused.
//!
//! ```
//! use strata_image::backing::{chain_files, users_of, FileId};
//! use strata_image::create::{create_qcow2, CreateOptions};
//! use strata_image::{FileStorage, ImageFormat};
//!
//! let dir = tempfile::tempdir()?;
//! let base = dir.path().join("base.qcow2");
//! let top = dir.path().join("top.qcow2");
//! let mut o = CreateOptions { size: 1 << 20, ..CreateOptions::default() };
//! create_qcow2(Box::new(FileStorage::create(&base)?), &base, &o)?;
//! o.backing = Some(("base.qcow2".into(), ImageFormat::Qcow2));
//! create_qcow2(Box::new(FileStorage::create(&top)?), &top, &o)?;
//!
//! // The chain's files, from the headers alone.
//! let files = chain_files(&top, None)?;
//! assert_eq!(files.len(), 2);
//! assert_eq!(FileId::of(&files[1].path)?, FileId::of(&base)?);
//!
//! // Who uses base.qcow2 as backing file in its directory.
//! let users = users_of(&base, &[dir.path().to_path_buf()], &[], &[])?;
//! assert_eq!(users, vec![top]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use strata_format::header::{has_qcow2_magic, peek_cluster_bits, Header};
use strata_format::limits;

use crate::chain::{Chain, Image, ImageFormat, Layer, OpenOptions, WritePolicy};
use crate::error::{Error, Result};
use crate::storage::{FileStorage, Storage};

/// The identity of a file: its device and inode numbers. Two paths name
/// the same file exactly when their identities are equal (hard links,
/// symbolic links, `..` and relative names included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl FileId {
    fn from_meta(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
    /// The identity of the file `path` names (symbolic links followed).
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        std::fs::metadata(path).map(|m| FileId::from_meta(&m))
    }
    /// [`FileId::of`], `None` when the file cannot be reached.
    pub fn try_of(path: &Path) -> Option<FileId> {
        FileId::of(path).ok()
    }
    /// The identity of an open file.
    pub fn of_file(file: &std::fs::File) -> std::io::Result<FileId> {
        file.metadata().map(|m| FileId::from_meta(&m))
    }
    /// The identity of an open layer's file: from its descriptor when it
    /// has one (immune to the path being replaced since), else its path.
    pub fn of_layer(layer: &Layer) -> std::io::Result<FileId> {
        match layer.image.storage().file() {
            Some(f) => FileId::of_file(f),
            None => FileId::of(&layer.path),
        }
    }
}

/// Whether a backing name is a protocol or JSON name rather than a path.
pub fn is_protocol_name(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
    }
}

/// Resolves a backing name recorded in `parent` to a path: absolute names
/// as they are, relative names against the parent's directory.
pub fn resolve_backing_path(parent: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        parent.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// A backing file as an image header records it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackingRef {
    /// The name as recorded (relative to the image's directory, or
    /// absolute, or a protocol name).
    pub name: String,
    /// The recorded backing format, if any (qemu-img's spelling).
    pub format: Option<String>,
}

/// What an image's header says, read without opening the image (no
/// tables are loaded, no lock is taken).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Peek {
    /// The image's format (given, or probed from the magic).
    pub format: ImageFormat,
    /// Virtual size in bytes (a raw file's length rounded up to 512, as
    /// [`RawImage`](crate::RawImage) sees it).
    pub virtual_size: u64,
    /// The backing file the header names (always `None` for raw files).
    pub backing: Option<BackingRef>,
}

/// Reads the header of `path`: its format (probed from the magic when
/// `format` is `None`), virtual size and backing file. The qcow2 header is
/// validated as [`Chain::open`] validates it; nothing else is read.
pub fn peek(path: &Path, format: Option<ImageFormat>) -> Result<Peek> {
    let storage = FileStorage::open(path, false).map_err(|e| Error::io(path, "open", 0, e))?;
    let file_len = storage.len().map_err(|e| Error::io(path, "stat", 0, e))?;
    let mut prefix = [0u8; 24];
    storage
        .read_at(&mut prefix, 0)
        .map_err(|e| Error::io(path, "read header", 0, e))?;
    let format = format.unwrap_or(if has_qcow2_magic(&prefix) {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    });
    if format == ImageFormat::Raw {
        return Ok(Peek {
            format,
            virtual_size: file_len.div_ceil(512).saturating_mul(512),
            backing: None,
        });
    }
    let fmt_err = |source| Error::Format {
        path: path.to_path_buf(),
        source,
    };
    let bits = peek_cluster_bits(&prefix).map_err(fmt_err)?;
    let mut c0 = vec![0u8; (1u64 << bits).min(file_len) as usize];
    storage
        .read_at(&mut c0, 0)
        .map_err(|e| Error::io(path, "read header", 0, e))?;
    let h = Header::parse(&c0).map_err(fmt_err)?;
    let backing = h
        .backing_file()
        .filter(|n| !n.is_empty())
        .map(|n| BackingRef {
            name: n.to_string(),
            format: h.backing_format().map(str::to_string),
        });
    Ok(Peek {
        format,
        virtual_size: h.size(),
        backing,
    })
}

/// The backing file the qcow2 header of `path` names (`None` for raw files
/// and images without one).
pub fn read_backing(path: &Path) -> Result<Option<BackingRef>> {
    Ok(peek(path, None)?.backing)
}

/// The backing name of a file with a qcow2 magic whose header does not
/// validate, from the two header fields that locate it (bytes 8 to 20):
/// a guard that looks for users of a file must count such images too.
fn raw_backing_name(path: &Path) -> Option<String> {
    let storage = FileStorage::open(path, false).ok()?;
    let mut head = [0u8; 20];
    storage.read_at(&mut head, 0).ok()?;
    if !has_qcow2_magic(&head) {
        return None;
    }
    let off = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(head[16..20].try_into().ok()?);
    if off == 0 || len == 0 || len > limits::MAX_BACKING_NAME {
        return None;
    }
    let mut name = vec![0u8; len as usize];
    storage.read_at(&mut name, off).ok()?;
    String::from_utf8(name).ok()
}

/// Checks a recorded backing name and format as [`Chain::open`] does;
/// returns the backing file's path and format.
pub fn check_backing(parent: &Path, backing: &BackingRef) -> Result<(PathBuf, ImageFormat)> {
    if is_protocol_name(&backing.name) {
        return Err(Error::Backing {
            path: parent.to_path_buf(),
            backing: backing.name.clone(),
            why: "protocol and JSON backing names are refused; only plain file paths are followed"
                .into(),
        });
    }
    let Some(fmt) = backing.format.as_deref() else {
        return Err(Error::BackingFormatUnknown {
            path: parent.to_path_buf(),
            backing: backing.name.clone(),
        });
    };
    let format = ImageFormat::from_name(fmt).ok_or_else(|| Error::Backing {
        path: parent.to_path_buf(),
        backing: backing.name.clone(),
        why: "unsupported backing format".into(),
    })?;
    Ok((resolve_backing_path(parent, &backing.name), format))
}

/// One file of a chain, as [`chain_files`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainFile {
    /// The path (as resolved, not canonicalised).
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// The backing name the image above recorded (`None` for the top).
    pub named_as: Option<String>,
}

/// The files of `path`'s backing chain, top first, from the headers alone
/// (the same rules as [`Chain::open`]: protocol names, missing formats,
/// loops and chains deeper than the limit are errors naming the image).
pub fn chain_files(path: &Path, format: Option<ImageFormat>) -> Result<Vec<ChainFile>> {
    let id = FileId::of(path).map_err(|e| Error::io(path, "stat", 0, e))?;
    let mut ids = vec![id];
    let mut cur = ChainFile {
        path: path.to_path_buf(),
        format: ImageFormat::Raw,
        named_as: None,
    };
    let mut peeked = peek(path, format)?;
    cur.format = peeked.format;
    let mut files = Vec::new();
    loop {
        let Some(b) = peeked.backing.take() else {
            files.push(cur);
            return Ok(files);
        };
        let (bpath, bfmt) = check_backing(&cur.path, &b)?;
        let parent = cur.path.clone();
        files.push(cur);
        if files.len() >= limits::MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooDeep {
                path: path.to_path_buf(),
                limit: limits::MAX_CHAIN_DEPTH,
            });
        }
        let id = FileId::of(&bpath).map_err(|e| Error::Backing {
            path: parent.clone(),
            backing: b.name.clone(),
            why: format!("cannot open {}: {e}", bpath.display()),
        })?;
        if ids.contains(&id) {
            return Err(Error::BackingLoop {
                path: parent,
                backing: bpath,
            });
        }
        ids.push(id);
        peeked = peek(&bpath, Some(bfmt)).map_err(|e| Error::Backing {
            path: parent.clone(),
            backing: b.name.clone(),
            why: e.to_string(),
        })?;
        cur = ChainFile {
            path: bpath,
            format: bfmt,
            named_as: Some(b.name),
        };
    }
}

/// Images that name `base` as their backing file: every regular file with
/// a qcow2 magic directly in one of the directories `dirs` (not in their
/// subdirectories), and the `also` paths; files in `exclude` and `base`
/// itself are not counted. A file in a directory that cannot be read is
/// passed over; an `also` file that cannot be read is an error. Sorted,
/// each file once.
pub fn users_of(
    base: &Path,
    dirs: &[PathBuf],
    also: &[PathBuf],
    exclude: &[FileId],
) -> Result<Vec<PathBuf>> {
    let base_id = FileId::of(base).map_err(|e| Error::io(base, "stat", 0, e))?;
    let mut candidates = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list directory", 0, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, "list directory", 0, e))?;
            let path = entry.path();
            if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                candidates.push((path, false));
            }
        }
    }
    candidates.extend(also.iter().map(|p| (p.clone(), true)));
    let mut users: Vec<PathBuf> = Vec::new();
    let mut user_ids: Vec<FileId> = Vec::new();
    for (path, named) in candidates {
        let id = match FileId::of(&path) {
            Ok(id) => id,
            Err(e) if named => return Err(Error::io(&path, "open", 0, e)),
            Err(_) => continue,
        };
        if id == base_id || exclude.contains(&id) || user_ids.contains(&id) {
            continue;
        }
        let name = match read_backing(&path) {
            Ok(b) => b.map(|b| b.name),
            Err(e @ Error::Io { .. }) if named => return Err(e),
            // Unreadable files in the directory are not images we can judge.
            Err(Error::Io { .. }) => None,
            // A damaged qcow2 header may still name the base.
            Err(_) => raw_backing_name(&path),
        };
        let Some(name) = name else { continue };
        if is_protocol_name(&name) {
            continue;
        }
        if FileId::try_of(&resolve_backing_path(&path, &name)) == Some(base_id) {
            users.push(path);
            user_ids.push(id);
        }
    }
    users.sort();
    Ok(users)
}

/// The header-only rebase (`qemu-img rebase -u`): opens the qcow2 image at
/// `path` alone, writable (taking QEMU's write lock), and records
/// `backing` — a name as the header is to hold it (relative to `path`'s
/// directory, or absolute) and its format — or no backing file. The guest
/// view changes unless the new backing file reads like the old one; the
/// caller answers for that. `policy` says what to do with a dirty image
/// or unknown autoclear bits ([`WritePolicy::qemu`] is what `qemu-img
/// rebase -u` does; the default refuses them, writing nothing).
pub fn set_backing_file(
    path: &Path,
    backing: Option<(&str, ImageFormat)>,
    policy: WritePolicy,
) -> Result<()> {
    let opts = OpenOptions {
        writable: true,
        no_backing: true,
        write_policy: policy,
        ..OpenOptions::default()
    };
    let mut chain = Chain::open(path, &opts)?;
    match &mut chain.layers_mut()[0].image {
        Image::Qcow2(q) => q.set_backing(backing.map(|(n, f)| (n, f.name()))),
        Image::Raw(_) => Err(Error::InvalidArgument(format!(
            "{}: only qcow2 images have a backing file",
            path.display()
        ))),
    }
}

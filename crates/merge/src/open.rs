//! Opening chains for a merge, identifying files, refusing unsafe states,
//! and the guard against committing into a shared base.

use std::path::{Path, PathBuf};

use strata_image::backing::resolve_backing_path;
use strata_image::{Chain, Image, ImageFormat, Layer, OpenOptions};

use crate::error::{MergeError, Result};

/// Identity of a file (device, inode).
pub(crate) type FileId = strata_image::FileId;

pub(crate) fn file_id(path: &Path) -> Result<FileId> {
    FileId::of(path).map_err(|e| MergeError::io(path, "stat", e))
}

/// Identity of an open layer's file (from its descriptor when it has one).
pub(crate) fn layer_id(layer: &Layer) -> Result<FileId> {
    FileId::of_layer(layer).map_err(|e| MergeError::io(&layer.path, "stat", e))
}

fn try_id(path: &Path) -> Option<FileId> {
    FileId::try_of(path)
}

/// The index of the layer of `chain` (below the top) that is the file
/// `wanted` (commit's `-b`), found as qemu-img's `bdrv_find_backing_image` finds `-b`:
/// for each image of the chain from the top down, the backing file it
/// names is `wanted` when it records exactly that name, or when `wanted`
/// (if relative, taken relative to that image's directory) is the same
/// file. Failing that, `wanted` relative to the working directory (a
/// Strata extension qemu-img does not have).
pub(crate) fn find_commit_base(chain: &Chain, top: &Path, wanted: &Path) -> Result<usize> {
    let layers = chain.layers();
    let name = wanted.to_string_lossy();
    for (i, l) in layers.iter().enumerate().skip(1) {
        if l.named_as.as_deref() == Some(&*name) {
            return Ok(i);
        }
        let parent = if i == 1 { top } else { &layers[i - 1].path };
        let id = try_id(&resolve_backing_path(parent, &name));
        if id.is_some() && id == try_id(&l.path) {
            return Ok(i);
        }
    }
    if let Some(id) = try_id(wanted) {
        for (i, l) in layers.iter().enumerate().skip(1) {
            if try_id(&l.path) == Some(id) {
                return Ok(i);
            }
        }
    }
    Err(MergeError::NotInChain {
        top: top.to_path_buf(),
        base: wanted.to_path_buf(),
    })
}

/// The index of the layer of `chain` (below the top) that is the file
/// `wanted`: as given (relative to the working directory), or else
/// relative to the top's directory (how qemu-img reads `-b`).
pub(crate) fn find_layer(chain: &Chain, top: &Path, wanted: &Path) -> Result<usize> {
    let mut ids = Vec::new();
    ids.extend(try_id(wanted));
    ids.extend(try_id(&resolve_backing_path(
        top,
        &wanted.to_string_lossy(),
    )));
    for (i, l) in chain.layers().iter().enumerate().skip(1) {
        if let Some(id) = try_id(&l.path) {
            if ids.contains(&id) {
                return Ok(i);
            }
        }
    }
    Err(MergeError::NotInChain {
        top: top.to_path_buf(),
        base: wanted.to_path_buf(),
    })
}

/// The name `top` should record to reach `layer`: the name the layer above
/// it recorded when that resolves to the same file from the top's
/// directory, else the layer's absolute path.
pub(crate) fn backing_name_for(top: &Path, layer: &Layer) -> Result<String> {
    if let Some(name) = &layer.named_as {
        if try_id(&resolve_backing_path(top, name)) == try_id(&layer.path) {
            return Ok(name.clone());
        }
    }
    let abs = std::fs::canonicalize(&layer.path)
        .map_err(|e| MergeError::io(&layer.path, "resolve path", e))?;
    abs.to_str().map(str::to_string).ok_or_else(|| {
        MergeError::InvalidArgument(format!(
            "{}: the path is not valid UTF-8 and cannot be recorded as a backing name",
            abs.display()
        ))
    })
}

/// Refuses an image the operation must not write: corrupt bit set, dirty
/// (lazy refcounts not repaired), unknown autoclear bits, or carrying a
/// bitmap directory the write path cannot keep (it would drop the
/// bitmaps), before anything is written: the states the write path's
/// default policy ([`strata_image::WritePolicy`]) refuses at the first
/// write, refused up front. Valid persistent bitmaps are kept up to date by the write path.
pub(crate) fn refuse_unwritable(layer: &Layer, op: &'static str) -> Result<()> {
    let Image::Qcow2(q) = &layer.image else {
        return Ok(());
    };
    let h = q.header();
    let why = if h.corrupt() {
        "the image is marked corrupt (run `strata check -r all` first)"
    } else if h.dirty() {
        "the image is dirty (lazy refcounts); repair it first (`strata check -r all` or `qemu-img check -r all`)"
    } else if !(h.autoclear_features() & !known_autoclear(q)).is_empty() {
        // The write path's default policy refuses to clear them; say so
        // before anything is written.
        "it has unknown autoclear feature bits, which writing would clear"
    } else if let Err(e) = q.bitmaps().and_then(|bs| {
        // Every consistent bitmap's bits must load, or the write path
        // would drop them.
        bs.iter()
            .filter(|b| !b.in_use)
            .try_for_each(|b| q.dirty_bitmap(&b.name).map(|_| ()))
    }) {
        return Err(MergeError::Refused {
            path: layer.path.clone(),
            op,
            why: format!("its persistent dirty bitmaps cannot be read ({e}); remove them first (`strata bitmap --remove`)"),
        });
    } else {
        return Ok(());
    };
    Err(MergeError::Refused {
        path: layer.path.clone(),
        op,
        why: why.into(),
    })
}

/// The autoclear bits the write path knows and keeps: bitmaps, and the
/// raw external data bit of an image with a data file.
fn known_autoclear(q: &strata_image::Qcow2Image) -> strata_format::header::Autoclear {
    use strata_format::header::Autoclear;
    match q.data_file() {
        Some(_) => Autoclear::BITMAPS | Autoclear::DATA_FILE_RAW,
        None => Autoclear::BITMAPS,
    }
}

/// Refuses a layer whose header says it is damaged (read, not written).
/// Returns the number of leaked clusters the check found (harmless).
pub(crate) fn refuse_damaged(layer: &Layer, op: &'static str) -> Result<u64> {
    if let Image::Qcow2(q) = &layer.image {
        if q.header().corrupt() {
            return Err(MergeError::Refused {
                path: layer.path.clone(),
                op,
                why: "the image is marked corrupt (run `strata check -r all` first)".into(),
            });
        }
        if q.header().dirty() {
            return Err(MergeError::Refused {
                path: layer.path.clone(),
                op,
                why: "the image is dirty (lazy refcounts); repair it first (`strata check -r all`)"
                    .into(),
            });
        }
        // The full consistency check: tables or data pointing outside the
        // file, refcounts below the references, broken entries. Leaks are
        // harmless and allowed.
        let report = strata_image::check::check(q)?;
        if report.corruptions > 0 || report.check_errors > 0 {
            let first = report
                .problems
                .first()
                .map(|p| p.message.clone())
                .unwrap_or_default();
            return Err(MergeError::Refused {
                path: layer.path.clone(),
                op,
                why: format!(
                    "`strata check` finds {} corruption(s) and {} error(s) (first: {first}); \
                     run `strata check -r all` first",
                    report.corruptions, report.check_errors
                ),
            });
        }
        return Ok(report.leaks);
    }
    Ok(0)
}

/// [`refuse_damaged`] for each of `layers`, the checks running side by
/// side (a few at a time): their CPU and the first reads of each image's
/// tables overlap. Returns each layer's leaked clusters, or the error of
/// the first layer (in `layers`' order) that is refused, as checking them
/// one after the other would.
pub(crate) fn refuse_damaged_all(layers: &[&Layer], op: &'static str) -> Result<Vec<u64>> {
    refuse_damaged_each(layers, op).into_iter().collect()
}

/// [`refuse_damaged`] for each of `layers`, side by side; every result,
/// in `layers`' order.
pub(crate) fn refuse_damaged_each(layers: &[&Layer], op: &'static str) -> Vec<Result<u64>> {
    let width = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, 4);
    let qcow2 = layers
        .iter()
        .filter(|l| matches!(l.image, Image::Qcow2(_)))
        .count();
    if width == 1 || qcow2 < 2 {
        return layers.iter().map(|l| refuse_damaged(l, op)).collect();
    }
    let mut out = Vec::with_capacity(layers.len());
    for group in layers.chunks(width) {
        std::thread::scope(|sc| {
            let handles: Vec<_> = group
                .iter()
                .map(|l| sc.spawn(move || refuse_damaged(l, op)))
                .collect();
            for h in handles {
                out.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
        });
    }
    out
}

/// Opens one image alone (no backing files), with QEMU-compatible locks.
pub(crate) fn open_alone(path: &Path, format: ImageFormat, writable: bool) -> Result<Chain> {
    Ok(Chain::open(
        path,
        &OpenOptions::new()
            .format(Some(format))
            .writable(writable)
            .no_backing(true),
    )?)
}

/// Where [`users_of`] looks for images that use a base: the base's
/// directory, the top's directory and the caller's directories (each once),
/// then the caller's files.
pub(crate) fn search_places(base: &Path, top: &Path, dirs: &[PathBuf]) -> Vec<PathBuf> {
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut places: Vec<PathBuf> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for d in [dir_of(base), dir_of(top)]
        .into_iter()
        .chain(dirs.iter().cloned())
    {
        let canon = std::fs::canonicalize(&d).unwrap_or_else(|_| d.clone());
        if !seen.contains(&canon) {
            seen.push(canon.clone());
            places.push(canon);
        }
    }
    places
}

/// Images that name `base` as their backing file, in `dirs` and `also`,
/// the files in `exclude` (the chain being merged) not counted (see
/// [`strata_image::backing::users_of`]).
pub(crate) fn users_of(
    base: &Path,
    exclude: &[FileId],
    dirs: &[PathBuf],
    also: &[PathBuf],
) -> Result<Vec<PathBuf>> {
    strata_image::backing::users_of(base, dirs, also, exclude).map_err(|e| match e {
        // A directory scan's I/O error names the place and the operation,
        // as the merge's other file operations do.
        strata_image::Error::Io {
            path, op, cause, ..
        } => MergeError::Io {
            path,
            op,
            source: cause,
        },
        e => e.into(),
    })
}

/// Refuses `path` when it does not lie under `dir` (both resolved:
/// symbolic links and `..` followed).
pub(crate) fn confine(path: &Path, dir: Option<&Path>) -> Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    let d = std::fs::canonicalize(dir).map_err(|e| MergeError::io(dir, "resolve directory", e))?;
    let p = std::fs::canonicalize(path).map_err(|e| MergeError::io(path, "resolve path", e))?;
    if p.starts_with(&d) {
        return Ok(());
    }
    Err(MergeError::InvalidArgument(format!(
        "{}: is outside the allowed directory {} (resolved: {})",
        path.display(),
        d.display(),
        p.display()
    )))
}

/// The identity (device, inode, when a file) and length of every source
/// file when the merge began.
#[derive(Debug, Default)]
pub(crate) struct Sources(Vec<(PathBuf, Option<FileId>, u64)>);

impl Sources {
    pub(crate) fn record(&mut self, layers: &[Layer]) -> Result<()> {
        for l in layers {
            let len = l
                .image
                .storage()
                .len()
                .map_err(|e| MergeError::io(&l.path, "stat", e))?;
            let id = match l.image.storage().file() {
                Some(_) => Some(layer_id(l)?),
                None => None,
            };
            self.0.push((l.path.clone(), id, len));
        }
        Ok(())
    }

    /// Fails when a source file is shorter than it was, or when its path
    /// now names another file than the one read.
    /// `layers` are the layers recorded, in the same order.
    pub(crate) fn verify<'l>(
        &self,
        layers: impl IntoIterator<Item = &'l Layer>,
        op: &'static str,
    ) -> Result<()> {
        for ((path, id, len), l) in self.0.iter().zip(layers) {
            let now = l
                .image
                .storage()
                .len()
                .map_err(|e| MergeError::io(path, "stat", e))?;
            if now < *len {
                return Err(MergeError::SourceChanged {
                    path: path.clone(),
                    why: format!(
                        "was truncated from {len} to {now} bytes while the {op} read it \
                         (by another process ignoring the image locks); what was read from it \
                         past its new end cannot be trusted"
                    ),
                });
            }
            if let Some(id) = id {
                if file_id(path).ok().as_ref() != Some(id) {
                    return Err(MergeError::SourceChanged {
                        path: path.clone(),
                        why: format!(
                            "was replaced by another file while the {op} read it (by another \
                             process ignoring the image locks)"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// [`crate::commit()`] of a chain the caller holds open: the chain is closed
/// (its flush error returned; its locks released, since a commit must take
/// its own, writable, on the base), then committed by its top's path. The
/// files the commit opens must be the very files of the caller's chain
/// (device and inode, top to bottom): a chain re-pointed or replaced in
/// between is refused before anything is written.
pub fn commit_chain(
    chain: Chain,
    opts: &crate::CommitOptions,
    hooks: &mut crate::Hooks<'_>,
) -> Result<crate::CommitReport> {
    let top = chain.top().path.clone();
    let format = chain.top().image.format();
    let held = chain
        .layers()
        .iter()
        .map(layer_id)
        .collect::<Result<Vec<_>>>()?;
    chain.close()?;
    let now = strata_image::backing::chain_files(&top, Some(format))?;
    let now_ids = now
        .iter()
        .map(|f| file_id(&f.path))
        .collect::<Result<Vec<_>>>()?;
    if now_ids != held {
        return Err(MergeError::SourceChanged {
            path: top,
            why: "its backing chain is no longer the chain the caller held open (a file was \
                  replaced or re-pointed); nothing was written"
                .into(),
        });
    }
    crate::commit(&top, opts, hooks)
}

//! What an export shows of its source and where its writes go, beyond the format: a slice
//! (`offset`/`size` or `partition`), a temporary snapshot overlay (`snapshot`) or a persistent
//! qcow2 overlay (`overlay`). [`source_config`] says how the source itself is opened (read-only
//! under a snapshot; the overlay image in place of the source); [`apply`] wraps the opened
//! backend.

use std::path::{Path, PathBuf};

use crate::backend::{cow, partition, Backend, BlockBackend, Cow, Layered, Refusal};
use crate::config::{ExportConfig, Source};
use crate::error::{Error, Result};

mod overlay;

/// The part of the disk an export shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// `size` bytes from `offset` (to the disk's end when `size` is None).
    Range { offset: u64, size: Option<u64> },
    /// Partition N of the disk's MBR or GPT partition table (1-based, as Linux numbers them).
    Partition(u32),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layers {
    pub slice: Option<Slice>,
    /// Writes go to a temporary overlay, dropped at close; the source is opened read-only.
    pub snapshot: bool,
    /// Writes go to the qcow2 image at this path, whose backing file is the source.
    pub overlay: Option<PathBuf>,
}

impl Layers {
    pub fn is_empty(&self) -> bool {
        self.slice.is_none() && !self.snapshot && self.overlay.is_none()
    }
}

/// How the source is opened: read-only under a snapshot; under an overlay, the overlay image
/// (created if missing) opened as qcow2, with the source as its backing file.
pub fn source_config(cfg: &ExportConfig) -> Result<ExportConfig> {
    let layers = &cfg.layers;
    if layers.is_empty() {
        return Ok(cfg.clone());
    }
    if cfg.growable {
        return Err(Error::InvalidConfig(
            "a slice, a snapshot or an overlay has a fixed size; it cannot be growable".into(),
        ));
    }
    if layers.snapshot && layers.overlay.is_some() {
        return Err(Error::InvalidConfig(
            "snapshot and overlay exclude each other (a snapshot's overlay is temporary)".into(),
        ));
    }
    if (layers.snapshot || layers.overlay.is_some()) && !cfg.writable {
        return Err(Error::InvalidConfig("a snapshot or an overlay needs writable".into()));
    }
    let mut source_cfg = cfg.clone();
    if layers.snapshot {
        source_cfg.writable = false;
    }
    if let Some(path) = &layers.overlay {
        source_cfg.source = Source::Qcow2(overlay::prepare(path, &cfg.source)?);
    }
    Ok(source_cfg)
}

/// Wraps the opened source backend in the snapshot overlay and the slice, as configured.
pub fn apply(backend: Backend, cfg: &ExportConfig) -> Result<Backend> {
    let layers = &cfg.layers;
    if layers.slice.is_none() && !layers.snapshot {
        return Ok(backend);
    }
    let name = source_name(&cfg.source);
    let (start, len) = match layers.slice {
        None => (0, backend.len()),
        Some(slice) => find_slice(&backend, slice, &name)?,
    };
    let align = u64::from(backend.alignment());
    if start % align != 0 {
        return Err(Error::Refused {
            code: "SLICE_OUT_OF_RANGE",
            message: format!(
                "{name}: the slice starts at byte {start}, which is not a multiple of the \
                 source's alignment ({align} bytes with cache 'none')"
            ),
        });
    }
    let cow = if layers.snapshot {
        let dir = cow::scratch_dir();
        Some(Cow::new(&dir, backend.len()).map_err(|e| Error::Internal(e.to_string()))?)
    } else {
        None
    };
    let layered =
        Layered::new(backend, cow, start, len).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Backend::Layered(layered))
}

fn find_slice(disk: &Backend, slice: Slice, name: &str) -> Result<(u64, u64)> {
    let refused = |e: std::io::Error| match crate::backend::refusal_of(&e) {
        Some(r) => Error::Refused { code: r.code, message: r.message.clone() },
        None => Error::Refused {
            code: "PARTITION_NOT_FOUND",
            message: format!("{name}: cannot read the partition table: {e}"),
        },
    };
    match slice {
        Slice::Partition(n) => {
            let span = partition::find(disk, n, name).map_err(refused)?;
            Ok((span.start, span.len))
        }
        Slice::Range { offset, size } => {
            let disk_len = disk.len();
            let len = size.unwrap_or(disk_len.saturating_sub(offset));
            match offset.checked_add(len) {
                Some(end) if end <= disk_len && len > 0 => Ok((offset, len)),
                _ => Err(refused(Refusal::error(
                    "SLICE_OUT_OF_RANGE",
                    format!(
                        "{name}: the slice of {} bytes from offset {offset} does not lie inside \
                         the disk ({disk_len} bytes)",
                        size.map_or("the remaining".into(), |s| s.to_string())
                    ),
                ))),
            }
        }
    }
}

fn source_name(source: &Source) -> String {
    match source {
        Source::Raw(p) | Source::Qcow2(p) | Source::Vmdk(p) | Source::Auto(p) => {
            p.display().to_string()
        }
        Source::Null(_) => "the null image".into(),
        Source::Nbd(src) => src.uri.clone(),
    }
}

/// The path of `target` as seen from directory `from` (both absolute): `../x/y.img`.
fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    rel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        let rel = |t: &str, f: &str| relative_to(Path::new(t), Path::new(f));
        assert_eq!(rel("/a/b/img.raw", "/a/b"), PathBuf::from("img.raw"));
        assert_eq!(rel("/a/img.raw", "/a/b/c"), PathBuf::from("../../img.raw"));
        assert_eq!(rel("/x/y/img.raw", "/a/b"), PathBuf::from("../../x/y/img.raw"));
        assert_eq!(rel("/img.raw", "/"), PathBuf::from("img.raw"));
    }
}

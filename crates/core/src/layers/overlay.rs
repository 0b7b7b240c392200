//! `overlay: PATH`: a qcow2 image whose backing file is the source, so the export's writes land
//! in it and the source is only read. Created through imago's qcow2 create builder when missing,
//! with the backing file name (relative to the overlay's directory, as `qemu-img create -b`
//! records a relative name) and format in the header; reused when its backing file is the
//! source; refused otherwise. An NBD source is recorded by its URI (as QEMU records an `nbd:`
//! backing file), and opened over NBD as the overlay's backing file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, Storage, StorageOpenOptions};

use super::relative_to;
use crate::backend::probe::{self, Probed};
use crate::backend::BlockBackend;
use crate::config::{NbdSource, Source};
use crate::error::{Error, Result};

/// Header extension that names the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_END: u32 = 0;

/// Makes sure the overlay at `path` exists with `source` as its backing file; returns its path.
pub fn prepare(path: &Path, source: &Source) -> Result<PathBuf> {
    let (source_path, format) = match source {
        Source::Raw(p) => (p, "raw"),
        Source::Qcow2(p) => (p, "qcow2"),
        Source::Auto(p) => match probe::probe_file(p).map_err(open_err(p))? {
            Probed::Qcow2 => (p, "qcow2"),
            Probed::Raw => (p, "raw"),
            Probed::Other(name) => {
                return Err(open_err(p)(io::Error::other(format!(
                    "the image looks like {name}, which cannot back a qcow2 overlay here"
                ))))
            }
        },
        Source::Vmdk(p) => {
            return Err(open_err(p)(io::Error::other(
                "a vmdk image cannot back a qcow2 overlay here; use snapshot",
            )))
        }
        Source::Nbd(src) => return prepare_nbd(path, src),
        Source::Null(_) => {
            return Err(Error::InvalidConfig(
                "an overlay needs an image file or an NBD export as its source (its backing \
                 file); use snapshot for a temporary overlay of a null source"
                    .into(),
            ))
        }
    };
    let source_path = std::fs::canonicalize(source_path).map_err(open_err(source_path))?;
    match std::fs::symlink_metadata(path) {
        Ok(_) => check_backing(path, &source_path, format)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let size = std::fs::metadata(&source_path).map_err(open_err(&source_path))?;
            let size = if format == "raw" {
                size.len()
            } else {
                crate::backend::Qcow2Backend::virtual_size(&source_path)
                    .map_err(open_err(&source_path))?
            };
            let dir = overlay_dir(path)?;
            let backing = relative_to(&source_path, &dir).to_string_lossy().into_owned();
            create(path, &backing, format, size)?;
            log::info!(
                "created the overlay {} over {} ({format})",
                path.display(),
                source_path.display()
            );
        }
        Err(e) => return Err(overlay_err(path, e.to_string())),
    }
    Ok(path.to_path_buf())
}

/// [`prepare`] for an NBD source: the overlay names it by its URI. Connects once (read-only)
/// to learn its format and size when the overlay is created or checked.
fn prepare_nbd(path: &Path, src: &NbdSource) -> Result<PathBuf> {
    let backend = src.connect(false, false, 1)?;
    let format = match src.probe(&backend)? {
        Probed::Raw => "raw",
        Probed::Qcow2 => "qcow2",
        Probed::Other(name) => {
            return Err(Error::InvalidConfig(format!(
                "{} looks like {name}, which cannot back a qcow2 overlay here",
                src.uri
            )))
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            drop(backend);
            check_backing_uri(path, &src.uri, format)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let size = if format == "raw" {
                backend.len()
            } else {
                let opts =
                    crate::backend::Qcow2Options { nbd: src.settings(1), ..Default::default() };
                src.open_qcow2(backend, opts)?.len()
            };
            create(path, &src.uri, format, size)?;
            log::info!("created the overlay {} over {} ({format})", path.display(), src.uri);
        }
        Err(e) => return Err(overlay_err(path, e.to_string())),
    }
    Ok(path.to_path_buf())
}

/// The overlay's directory, canonical.
fn overlay_dir(path: &Path) -> Result<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::canonicalize(dir).map_err(|e| overlay_err(path, e.to_string()))
}

fn open_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::SourceOpen { path: path.to_path_buf(), source }
}

fn overlay_err(path: &Path, why: String) -> Error {
    Error::Refused {
        code: "OVERLAY_INVALID",
        message: format!("overlay {}: {why}", path.display()),
    }
}

/// Creates the overlay of `size` bytes naming `backing` (a path relative to the overlay's
/// directory, or a URI) of format `format`; on failure, nothing is left at `path`.
fn create(path: &Path, backing: &str, format: &str, size: u64) -> Result<()> {
    let backing = backing.to_string();
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| overlay_err(path, format!("cannot create it: {e}")))?;
    let made = tokio::runtime::Builder::new_current_thread().build().and_then(|rt| {
        rt.block_on(async {
            let opts = StorageOpenOptions::new().filename(path).write(true);
            let file = imago::file::File::open(opts).await?;
            Qcow2::<imago::file::File>::create_builder(file)
                .size(size)
                .backing(backing, format.to_string())
                .create()
                .await
        })
    });
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(overlay_err(path, format!("cannot create it: {e}")));
    }
    Ok(())
}

/// The backing file name and format an existing overlay records; refuses what is no overlay.
fn recorded_backing(path: &Path) -> Result<(String, Option<String>)> {
    let mut head = Vec::new();
    File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(|e| overlay_err(path, format!("cannot read it: {e}")))?;
    let header = parse_header(&head).map_err(|why| overlay_err(path, why))?;
    let Some(name) = header.backing else {
        return Err(overlay_err(path, "it has no backing file; it is not an overlay".into()));
    };
    Ok((name, header.backing_format))
}

/// Refuses an existing overlay whose recorded backing format is not `format`.
fn check_format(path: &Path, recorded: Option<String>, format: &str) -> Result<()> {
    if let Some(recorded) = recorded.filter(|f| f != format) {
        return Err(overlay_err(
            path,
            format!("it records its backing file as {recorded}, but the source is {format}"),
        ));
    }
    Ok(())
}

/// Refuses an existing overlay whose backing file is not the NBD export at `uri` (the same URI).
fn check_backing_uri(path: &Path, uri: &str, format: &str) -> Result<()> {
    let (name, recorded) = recorded_backing(path)?;
    if name != uri {
        return Err(overlay_err(
            path,
            format!(
                "its backing file is {name:?}, not the source {uri}; give another overlay path, \
                 or export that overlay's own backing file"
            ),
        ));
    }
    check_format(path, recorded, format)
}

/// Refuses an existing overlay whose backing file is not `source`.
fn check_backing(path: &Path, source: &Path, format: &str) -> Result<()> {
    let (name, recorded) = recorded_backing(path)?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let resolved = std::fs::canonicalize(dir.join(&name));
    if resolved.as_deref().ok() != Some(source) {
        return Err(overlay_err(
            path,
            format!(
                "its backing file is {name:?}, not the source {}; give another overlay path, or \
                 export that overlay's own backing file",
                source.display()
            ),
        ));
    }
    check_format(path, recorded, format)
}

#[derive(Debug, PartialEq, Eq)]
struct Header {
    backing: Option<String>,
    backing_format: Option<String>,
}

/// The backing file name and format of a qcow2 header (`head`: the file's first bytes).
fn parse_header(head: &[u8]) -> std::result::Result<Header, String> {
    let be32 = |at: usize| head.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap()));
    let be64 = |at: usize| head.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().unwrap()));
    if head.get(..4) != Some(&probe::QCOW2_MAGIC[..]) {
        return Err("it is not a qcow2 image".into());
    }
    let version = be32(4).ok_or("its header is truncated")?;
    let header_len = match version {
        2 => 72,
        3 => be32(100).ok_or("its header is truncated")? as usize,
        v => return Err(format!("unsupported qcow2 version {v}")),
    };
    let offset = be64(8).ok_or("its header is truncated")? as usize;
    let len = be32(16).ok_or("its header is truncated")? as usize;
    let backing = if offset == 0 {
        None
    } else {
        let name = head.get(offset..offset + len).ok_or("its backing file name is out of reach")?;
        Some(String::from_utf8_lossy(name).into_owned())
    };
    let mut at = header_len;
    let mut backing_format = None;
    while let (Some(kind), Some(len)) = (be32(at), be32(at + 4)) {
        if kind == EXT_END {
            break;
        }
        let data = head.get(at + 8..at + 8 + len as usize).ok_or("a header extension is cut")?;
        if kind == EXT_BACKING_FORMAT {
            backing_format = Some(String::from_utf8_lossy(data).into_owned());
        }
        at += 8 + (len as usize).next_multiple_of(8);
    }
    Ok(Header { backing, backing_format })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header of `header_len` bytes naming `backing`, with a backing-format extension.
    fn v3(backing: &str, format: &str) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(&probe::QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&(format.len() as u32).to_be_bytes());
        h.extend_from_slice(format.as_bytes());
        h.resize(h.len().next_multiple_of(8), 0);
        h.extend_from_slice(&[0u8; 8]);
        let at = h.len() as u64;
        h[8..16].copy_from_slice(&at.to_be_bytes());
        h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        h.extend_from_slice(backing.as_bytes());
        h
    }

    #[test]
    fn backing_name_and_format_are_read_from_the_header() {
        let h = parse_header(&v3("../base.raw", "raw")).unwrap();
        assert_eq!(h.backing.as_deref(), Some("../base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        let mut none = v3("x", "qcow2");
        none[8..16].fill(0);
        assert_eq!(parse_header(&none).unwrap().backing, None);
        assert!(parse_header(b"not qcow2").unwrap_err().contains("not a qcow2"));
        let mut cut = v3("../base.raw", "raw");
        cut.truncate(cut.len() - 3);
        assert!(parse_header(&cut).unwrap_err().contains("out of reach"));
    }
}

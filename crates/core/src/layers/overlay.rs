//! `overlay: PATH`: a qcow2 image whose backing file is the source, so the export's writes land
//! in it and the source is only read. Created through imago's qcow2 create builder when missing,
//! with the backing file name (relative to the overlay's directory, as `qemu-img create -b`
//! records a relative name) and format in the header; reused when its backing file is the
//! source; refused otherwise.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, Storage, StorageOpenOptions};

use super::relative_to;
use crate::backend::probe::{self, Probed};
use crate::config::Source;
use crate::error::{Error, Result};

/// Header extension that names the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_END: u32 = 0;

/// Makes sure the overlay at `path` exists with `source` as its backing file; returns its path.
pub fn prepare(path: &Path, source: &Source) -> Result<PathBuf> {
    let (source_path, format) =
        match source {
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
            Source::Null(_) | Source::Nbd(_) => return Err(Error::InvalidConfig(
                "an overlay needs an image file as its source (its backing file); use snapshot \
                 for a temporary overlay of this source"
                    .into(),
            )),
        };
    let source_path = std::fs::canonicalize(source_path).map_err(open_err(source_path))?;
    match std::fs::symlink_metadata(path) {
        Ok(_) => check_backing(path, &source_path, format)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(path, &source_path, format)?,
        Err(e) => return Err(overlay_err(path, e.to_string())),
    }
    Ok(path.to_path_buf())
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

/// Creates the overlay; on failure, nothing is left at `path`.
fn create(path: &Path, source: &Path, format: &str) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).map_err(|e| overlay_err(path, e.to_string()))?;
    let size = std::fs::metadata(source).map_err(open_err(source))?;
    let size = if format == "raw" {
        size.len()
    } else {
        crate::backend::Qcow2Backend::virtual_size(source).map_err(open_err(source))?
    };
    let backing = relative_to(source, &dir).to_string_lossy().into_owned();
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
    log::info!("created the overlay {} over {} ({format})", path.display(), source.display());
    Ok(())
}

/// Refuses an existing overlay whose backing file is not `source`.
fn check_backing(path: &Path, source: &Path, format: &str) -> Result<()> {
    let mut head = Vec::new();
    File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(|e| overlay_err(path, format!("cannot read it: {e}")))?;
    let header = parse_header(&head).map_err(|why| overlay_err(path, why))?;
    let Some(name) = header.backing else {
        return Err(overlay_err(path, "it has no backing file; it is not an overlay".into()));
    };
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
    if let Some(recorded) = header.backing_format.filter(|f| f != format) {
        return Err(overlay_err(
            path,
            format!("it records its backing file as {recorded}, but the source is {format}"),
        ));
    }
    Ok(())
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

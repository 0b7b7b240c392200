//! One export's whole configuration, already validated by the caller's policy layer (ts/), and
//! the function that turns it into a running session. Rejects what it cannot serve.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::backend::nbd::handshake::ConnectError;
use crate::backend::nbd::{self, NbdOptions, NbdSettings, OpenError, TlsFiles};
use crate::backend::probe::{self, Probed};
use crate::backend::{
    refusal_of, Backend, BlockBackend, CacheMode, FaultBackend, FaultSpec, LockMode, NbdBackend,
    NbdStorage, NullBackend, ProbedRaw, Qcow2Backend, Qcow2Options, RawBackend, RawOptions,
    VmdkBackend, MAX_IMAGE_SIZE,
};
use crate::error::{Error, Result};
use crate::export::{Export, ExportOptions};
use crate::layers::{self, Layers};
use crate::sys;
use crate::transport::{
    IoUringMode, PassthroughMode, Session, SessionConfig, SessionEvent, MAX_TRANSFER,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An image file (or block device) used as-is.
    Raw(PathBuf),
    /// A qcow2 image (v2 or v3) with its backing chain, presented as the disk it describes.
    Qcow2(PathBuf),
    /// A VMDK descriptor with flat extents (imago), read-only.
    Vmdk(PathBuf),
    /// Probe the header: qcow2 if it has the qcow2 magic, else raw. A probed raw image refuses
    /// writes that would make it look like another format (docs/formats.md).
    Auto(PathBuf),
    /// A disk of this many bytes that reads zeros and drops writes.
    Null(u64),
    /// A disk on an NBD server.
    Nbd(NbdSource),
}

/// The format of an NBD export's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdFormat {
    /// The bytes as they are.
    Raw,
    /// A qcow2 image (a qcow2 file served raw), through imago over the NBD connection.
    Qcow2,
    /// Probed like a file: qcow2 by its magic, else raw (a raw image found by probing refuses
    /// first-sector writes that would make it look like another format).
    Auto,
}

/// An NBD source: the URI (`nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://`) and how to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSource {
    pub uri: String,
    /// How the export's bytes are read: as they are, as a qcow2 image, or probed.
    pub format: NbdFormat,
    pub tls: TlsFiles,
    pub connect_timeout: Duration,
    pub reconnect_delay: Duration,
    /// A request without an answer this long breaks its connection; zero: never.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub source: Source,
    pub mountpoint: PathBuf,
    pub writable: bool,
    pub growable: bool,
    pub allow_other: bool,
    pub threads: usize,
    pub cache: CacheMode,
    pub writethrough: bool,
    pub io_uring: IoUringMode,
    /// Whether opens may go straight to a raw image (FUSE passthrough).
    pub passthrough: PassthroughMode,
    /// QEMU-compatible image locks on the image and its backing files.
    pub locking: LockMode,
    /// Read-only: share write and resize with others (`qemu-img -U`).
    pub force_share: bool,
    /// A slice of the disk, a snapshot overlay or a persistent qcow2 overlay (`layers`).
    pub layers: Layers,
}

/// Most queues one export may have; each costs a thread and its buffers.
pub const MAX_THREADS: usize = 64;

/// Opens the backend, mounts, answers INIT; returns once the export serves requests.
pub fn start(
    cfg: ExportConfig,
    on_event: Box<dyn Fn(SessionEvent) + Send + Sync>,
) -> Result<Session> {
    start_with_faults(cfg, None, on_event)
}

/// Test only (docs/reliability.md): [`start`] with the backend wrapped in a fault injector.
#[doc(hidden)]
pub fn start_with_faults(
    cfg: ExportConfig,
    faults: Option<FaultSpec>,
    on_event: Box<dyn Fn(SessionEvent) + Send + Sync>,
) -> Result<Session> {
    let export = open_export(&cfg, faults.clone())?;
    let session_cfg = SessionConfig {
        mountpoint: cfg.mountpoint.clone(),
        allow_other: cfg.allow_other,
        threads: cfg.threads,
        io_uring: cfg.io_uring,
        passthrough: cfg.passthrough,
    };
    let on_event: std::sync::Arc<dyn Fn(SessionEvent) + Send + Sync> = on_event.into();
    let sink = on_event.clone();
    match Session::start(export, session_cfg.clone(), Box::new(move |e| sink(e))) {
        // The kernel offered io_uring but would not take our entries: serve by read(2) on a
        // fresh mount, and say why.
        Err(Error::IoUring(reason)) if cfg.io_uring == IoUringMode::Auto => {
            log::warn!("FUSE-over-io_uring: {reason}; serving by read(2) instead");
            let export = open_export(&cfg, faults)?;
            let cfg = SessionConfig { io_uring: IoUringMode::Off, ..session_cfg };
            let mut session = Session::start(export, cfg, Box::new(move |e| on_event(e)))?;
            session.set_io_uring_fallback(reason);
            Ok(session)
        }
        other => other,
    }
}

/// Serves the export over a fake device instead of a mount (`mountpoint` is ignored): returns
/// the session and the peer end of a SOCK_SEQPACKET socketpair, which stands in for the kernel.
/// Tests write crafted requests into the peer and read the replies from it.
pub fn start_fake_device(
    cfg: ExportConfig,
    on_event: Box<dyn Fn(SessionEvent) + Send + Sync>,
) -> Result<(Session, OwnedFd)> {
    let export = open_export(&cfg, None)?;
    let (ours, peer) = sys::seqpacket_pair()
        .map_err(|e| Error::Internal(format!("cannot create a fake device: {e}")))?;
    Ok((Session::serve_fake_device(export, ours, on_event)?, peer))
}

fn open_export(cfg: &ExportConfig, faults: Option<FaultSpec>) -> Result<Export> {
    let export_cfg = cfg;
    // The source as it is opened: read-only under a snapshot, the overlay image under an overlay.
    let cfg = &layers::source_config(cfg)?;
    if cfg.growable && !cfg.writable {
        return Err(Error::InvalidConfig("growable needs writable".into()));
    }
    if cfg.threads == 0 || cfg.threads > MAX_THREADS {
        return Err(Error::InvalidConfig(format!(
            "threads must be between 1 and {MAX_THREADS}, not {}",
            cfg.threads
        )));
    }
    if cfg.force_share && cfg.writable {
        return Err(Error::InvalidConfig("forceShare is for read-only exports".into()));
    }
    let (locking, force_share) = (cfg.locking, cfg.force_share);
    let raw_opts = RawOptions { writable: cfg.writable, cache: cfg.cache, locking, force_share };
    // An overlay over an NBD source names it by its URI as its backing file.
    let nbd = match &export_cfg.source {
        Source::Nbd(src) => src.settings(cfg.threads),
        _ => NbdSettings { connections: cfg.threads, ..Default::default() },
    };
    let qcow2_opts =
        Qcow2Options { writable: cfg.writable, cache: cfg.cache, locking, force_share, nbd };
    let open_err = |path: &PathBuf| {
        let path = path.clone();
        move |source: std::io::Error| match refusal_of(&source) {
            Some(r) => Error::Refused { code: r.code, message: r.message.clone() },
            None => Error::SourceOpen { path, source },
        }
    };
    let backend = match &cfg.source {
        Source::Raw(path) => {
            Backend::Raw(RawBackend::open(path, raw_opts).map_err(open_err(path))?)
        }
        Source::Qcow2(path) => {
            Backend::Qcow2(Qcow2Backend::open(path, qcow2_opts.clone()).map_err(open_err(path))?)
        }
        Source::Vmdk(path) => open_vmdk(path, cfg).map_err(open_err(path))?,
        Source::Auto(path) => match probe::probe_file(path).map_err(open_err(path))? {
            Probed::Other("vmdk") => open_vmdk(path, cfg).map_err(open_err(path))?,
            Probed::Qcow2 => Backend::Qcow2(
                Qcow2Backend::open(path, qcow2_opts.clone()).map_err(open_err(path))?,
            ),
            Probed::Raw => Backend::ProbedRaw(ProbedRaw::new(
                RawBackend::open(path, raw_opts).map_err(open_err(path))?,
            )),
            Probed::Other(name) => {
                let reason = format!(
                    "the image looks like {name}, which blockfuse cannot read; use format raw \
                     to export its bytes as they are"
                );
                return Err(open_err(path)(std::io::Error::other(reason)));
            }
        },
        Source::Null(0) => return Err(Error::InvalidConfig("a null backend needs a size".into())),
        Source::Null(len) => Backend::Null(NullBackend::new(*len)),
        Source::Nbd(src) => open_nbd(src, cfg)?,
    };
    if backend.len() > MAX_IMAGE_SIZE {
        let what = match &cfg.source {
            Source::Raw(p) | Source::Qcow2(p) | Source::Vmdk(p) | Source::Auto(p) => {
                p.display().to_string()
            }
            Source::Null(_) => "the null image".into(),
            Source::Nbd(src) => src.uri.clone(),
        };
        return Err(Error::Refused {
            code: "IMAGE_TOO_LARGE",
            message: format!(
                "{what}: size {} bytes is larger than 2^53-1 ({MAX_IMAGE_SIZE}), the largest \
                 size blockfuse serves exactly",
                backend.len()
            ),
        });
    }
    let backend = layers::apply(backend, export_cfg)?;
    let backend = match faults {
        Some(spec) => Backend::Fault(FaultBackend::new(backend, spec).map_err(|e| {
            Error::Internal(format!("cannot start the fault injector's timer thread: {e}"))
        })?),
        None => backend,
    };
    let (uid, gid) = sys::effective_ids();
    let opts = ExportOptions {
        writable: export_cfg.writable,
        growable: cfg.growable,
        allow_other: cfg.allow_other,
        writethrough: cfg.writethrough,
        max_read: MAX_TRANSFER,
    };
    Ok(Export::new(backend, opts, uid, gid))
}

/// A vmdk image, read-only: imago has no VMDK writer.
fn open_vmdk(path: &std::path::Path, cfg: &ExportConfig) -> std::io::Result<Backend> {
    if cfg.writable {
        return Err(std::io::Error::other(
            "the image is vmdk, which blockfuse serves read-only (imago does not write VMDK); \
             export it read-only, or with snapshot to write to a temporary overlay",
        ));
    }
    let backend = VmdkBackend::open(path, cfg.locking, cfg.force_share)
        .map_err(|e| std::io::Error::new(e.kind(), format!("vmdk: {e}")))?;
    Ok(Backend::Vmdk(backend))
}

impl NbdSource {
    /// The settings besides the URI, for `connections` connections at most.
    pub fn settings(&self, connections: usize) -> NbdSettings {
        NbdSettings {
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            reconnect_delay: self.reconnect_delay,
            request_timeout: self.request_timeout,
            connections,
        }
    }

    /// Connects to the source's export.
    pub(crate) fn connect(
        &self,
        writable: bool,
        writethrough: bool,
        connections: usize,
    ) -> Result<NbdBackend> {
        let uri =
            nbd::uri::parse(&self.uri).map_err(|e| Error::NbdUri(format!("{}: {e}", self.uri)))?;
        let opts =
            NbdOptions { writable, writethrough, ..self.settings(connections).read_only(uri) };
        NbdBackend::open(&opts).map_err(|e| match e {
            OpenError::ReadOnly(m) => Error::NbdReadOnly(m),
            OpenError::Connect(ConnectError::Unreachable(m)) => Error::NbdConnect(m),
            OpenError::Connect(ConnectError::UnknownExport(m)) => Error::NbdExportNotFound(m),
            OpenError::Connect(ConnectError::Tls(m)) => Error::NbdTls(m),
            OpenError::Connect(ConnectError::Handshake(m)) => Error::NbdHandshake(m),
        })
    }

    /// What the export holds: its format if given, else what its first sector says.
    pub(crate) fn probe(&self, backend: &NbdBackend) -> Result<Probed> {
        match self.format {
            NbdFormat::Raw => return Ok(Probed::Raw),
            NbdFormat::Qcow2 => return Ok(Probed::Qcow2),
            NbdFormat::Auto => {}
        }
        // At least one block of the server's minimum size (a server may refuse less).
        let block = u64::from(backend.alignment().max(1)).max(probe::PROBE_SECTOR);
        let mut head = vec![0u8; block.min(backend.len()) as usize];
        let read = tokio::runtime::Builder::new_current_thread()
            .build()
            .and_then(|rt| rt.block_on(backend.read_at(&mut head, 0)));
        read.map_err(|e| {
            Error::NbdHandshake(format!("cannot read the first sector of {}: {e}", self.uri))
        })?;
        let n = head.len().min(probe::PROBE_SECTOR as usize);
        Ok(probe::probe_header(&head[..n]))
    }

    /// Opens the qcow2 image the export holds.
    pub(crate) fn open_qcow2(
        &self,
        backend: NbdBackend,
        opts: Qcow2Options,
    ) -> Result<Qcow2Backend> {
        Qcow2Backend::open_nbd(NbdStorage::new(backend, &self.uri), opts).map_err(|e| {
            match refusal_of(&e) {
                Some(r) => Error::Refused { code: r.code, message: r.message.clone() },
                None => Error::SourceOpen { path: PathBuf::from(&self.uri), source: e },
            }
        })
    }
}

fn open_nbd(src: &NbdSource, cfg: &ExportConfig) -> Result<Backend> {
    if cfg.growable {
        return Err(Error::InvalidConfig(
            "an NBD export has a fixed size; it cannot be growable".into(),
        ));
    }
    let backend = src.connect(cfg.writable, cfg.writethrough, cfg.threads)?;
    let probed = src.probe(&backend)?;
    match (src.format, probed) {
        (NbdFormat::Raw, _) => Ok(Backend::Nbd(backend)),
        (_, Probed::Raw) => Ok(Backend::ProbedNbd(ProbedRaw::new(backend))),
        (_, Probed::Qcow2) => {
            let opts = Qcow2Options {
                writable: cfg.writable,
                nbd: src.settings(cfg.threads),
                ..Default::default()
            };
            Ok(Backend::Qcow2(src.open_qcow2(backend, opts)?))
        }
        (_, Probed::Other(name)) => Err(Error::InvalidConfig(format!(
            "{} looks like {name}, which blockfuse cannot read; use format raw to export its \
             bytes as they are",
            src.uri
        ))),
    }
}

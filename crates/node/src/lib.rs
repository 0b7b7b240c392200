//! napi-rs binding of blockfuse-core: type conversion, error-code mapping and events. No logic:
//! policy lives in ts/, semantics in the core. Errors reach JS as `CODE: message`; ts/native.ts
//! turns the prefix into `err.code`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use blockfuse_core::backend::nbd::TlsFiles;
use blockfuse_core::backend::{BlockBackend, CacheMode, FaultSpec, LockMode, MAX_IMAGE_SIZE};
use blockfuse_core::config::{self, ExportConfig, NbdFormat, NbdSource, Source};
use blockfuse_core::layers::{Layers, Slice};
use blockfuse_core::transport::{IoUringMode, PassthroughMode, Session, SessionEvent};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

/// Core log records at warning level and above go to stderr, prefixed `blockfuse:`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("blockfuse: {}: {}", record.level().as_str().to_lowercase(), record.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    static LOGGER: StderrLogger = StderrLogger;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if the host already set a logger, which then gets our records.
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
    });
}

fn js_error(code: &str, message: impl std::fmt::Display) -> Error {
    Error::new(Status::GenericFailure, format!("{code}: {message}"))
}

fn core_error(e: blockfuse_core::Error) -> Error {
    js_error(e.code(), &e)
}

/// Runs `f`, turning a panic into an INTERNAL error so that none crosses into Node.
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(js_error("INTERNAL", format!("{what} panicked: {msg}")))
    })
}

#[napi(object)]
pub struct NativeExportConfig {
    /// 'raw' | 'qcow2' | 'vmdk' | 'null' | 'auto'
    pub format: String,
    pub source: Option<String>,
    pub null_size: Option<f64>,
    pub mountpoint: String,
    pub writable: bool,
    pub growable: bool,
    pub allow_other: bool,
    pub threads: u32,
    /// 'writeback' | 'none'
    pub cache: String,
    pub writethrough: bool,
    /// 'auto' | 'on' | 'off'
    pub io_uring: String,
    /// 'auto' | 'on' | 'off'
    pub passthrough: String,
    /// 'auto' | 'on' | 'off'
    pub locking: String,
    pub force_share: bool,
    /// An NBD source (then `source` and `nullSize` are unset; format is 'raw' or 'auto').
    pub nbd: Option<NativeNbdConfig>,
    /// A slice: bytes from `offset` (`size` of them, or to the end), or partition N.
    pub offset: Option<f64>,
    pub size: Option<f64>,
    pub partition: Option<u32>,
    /// Writes go to a temporary overlay dropped at close.
    pub snapshot: Option<bool>,
    /// Writes go to the qcow2 overlay at this path (created if missing).
    pub overlay: Option<String>,
}

#[napi(object)]
pub struct NativeNbdConfig {
    pub uri: String,
    pub tls_ca: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_server_name: Option<String>,
    pub connect_timeout_ms: f64,
    pub reconnect_delay_ms: f64,
    pub request_timeout_ms: f64,
}

#[napi(object)]
#[derive(Clone)]
pub struct NativeEvent {
    /// 'halt'
    pub kind: String,
    pub reason: String,
}

fn to_core(c: NativeExportConfig) -> Result<ExportConfig> {
    let invalid = |m: String| js_error("INVALID_CONFIG", m);
    let path = |format: &str, source: Option<String>| {
        source
            .map(PathBuf::from)
            .ok_or_else(|| invalid(format!("format {format} needs a source path")))
    };
    let millis = |what: &str, ms: f64| {
        if ms.is_finite() && (0.0..=86_400_000.0).contains(&ms) {
            Ok(std::time::Duration::from_millis(ms as u64))
        } else {
            Err(invalid(format!("{what} must be between 0 and 86400000 ms, not {ms}")))
        }
    };
    let source = match (c.format.as_str(), c.nbd) {
        (format @ ("raw" | "qcow2" | "auto"), Some(n)) => Source::Nbd(NbdSource {
            uri: n.uri,
            format: match format {
                "raw" => NbdFormat::Raw,
                "qcow2" => NbdFormat::Qcow2,
                _ => NbdFormat::Auto,
            },
            tls: TlsFiles {
                ca: n.tls_ca.map(PathBuf::from),
                cert: n.tls_cert.map(PathBuf::from),
                key: n.tls_key.map(PathBuf::from),
                server_name: n.tls_server_name,
            },
            connect_timeout: millis("connectTimeout", n.connect_timeout_ms)?,
            reconnect_delay: millis("reconnectDelay", n.reconnect_delay_ms)?,
            request_timeout: millis("requestTimeout", n.request_timeout_ms)?,
        }),
        (other, Some(_)) => {
            return Err(invalid(format!("format {other} cannot be used with an NBD source")))
        }
        (format, None) => match format {
            "raw" => Source::Raw(path("raw", c.source)?),
            "qcow2" => Source::Qcow2(path("qcow2", c.source)?),
            "vmdk" => Source::Vmdk(path("vmdk", c.source)?),
            "auto" => Source::Auto(path("auto", c.source)?),
            "null" => {
                let size =
                    c.null_size.ok_or_else(|| invalid("format null needs nullSize".into()))?;
                if !(size >= 1.0 && size.fract() == 0.0 && size <= 9_007_199_254_740_991.0) {
                    return Err(invalid(format!(
                        "nullSize must be a positive integer, not {size}"
                    )));
                }
                Source::Null(size as u64)
            }
            other => return Err(invalid(format!("unknown format {other:?}"))),
        },
    };
    let cache = match c.cache.as_str() {
        "writeback" => CacheMode::Writeback,
        "none" => CacheMode::None,
        other => return Err(invalid(format!("unknown cache mode {other:?}"))),
    };
    let io_uring = match c.io_uring.as_str() {
        "auto" => IoUringMode::Auto,
        "on" => IoUringMode::On,
        "off" => IoUringMode::Off,
        other => return Err(invalid(format!("unknown ioUring mode {other:?}"))),
    };
    let passthrough = match c.passthrough.as_str() {
        "auto" => PassthroughMode::Auto,
        "on" => PassthroughMode::On,
        "off" => PassthroughMode::Off,
        other => return Err(invalid(format!("unknown passthrough mode {other:?}"))),
    };
    let locking = match c.locking.as_str() {
        "auto" => LockMode::Auto,
        "on" => LockMode::On,
        "off" => LockMode::Off,
        other => return Err(invalid(format!("unknown locking mode {other:?}"))),
    };
    let whole = |what: &str, v: f64| {
        if v.fract() != 0.0 || !(0.0..=MAX_IMAGE_SIZE as f64).contains(&v) {
            return Err(invalid(format!("{what} must be an integer from 0 to 2^53-1, not {v}")));
        }
        Ok(v as u64)
    };
    let slice = match (c.partition, c.offset, c.size) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(invalid("partition excludes offset and size".into()))
        }
        (Some(n), None, None) => Some(Slice::Partition(n)),
        (None, None, None) => None,
        (None, offset, size) => Some(Slice::Range {
            offset: offset.map(|o| whole("offset", o)).transpose()?.unwrap_or(0),
            size: size.map(|s| whole("size", s)).transpose()?,
        }),
    };
    let layers = Layers {
        slice,
        snapshot: c.snapshot.unwrap_or(false),
        overlay: c.overlay.map(PathBuf::from),
    };
    Ok(ExportConfig {
        layers,
        source,
        mountpoint: PathBuf::from(c.mountpoint),
        writable: c.writable,
        growable: c.growable,
        allow_other: c.allow_other,
        threads: c.threads as usize,
        cache,
        writethrough: c.writethrough,
        io_uring,
        passthrough,
        locking,
        force_share: c.force_share,
    })
}

/// Test only: `BLOCKFUSE_FAULTS` (e.g. `eio@0-4096,enospc@1M-2M:w,delay=5ms`) makes every export
/// this process mounts inject those faults (docs/reliability.md). Never set it in production.
fn faults_from_env() -> Result<Option<FaultSpec>> {
    let Some(spec) = std::env::var_os("BLOCKFUSE_FAULTS") else { return Ok(None) };
    let spec = spec.to_string_lossy();
    let parsed = FaultSpec::parse(&spec)
        .map_err(|e| js_error("INVALID_CONFIG", format!("BLOCKFUSE_FAULTS: {e}")))?;
    log::warn!("BLOCKFUSE_FAULTS is set: injecting faults ({spec}); for tests only");
    Ok(Some(parsed))
}

type EventCallback = ThreadsafeFunction<NativeEvent>;

pub struct MountTask {
    config: Option<NativeExportConfig>,
    on_event: Option<Arc<EventCallback>>,
}

impl Task for MountTask {
    type Output = Session;
    type JsValue = NativeExport;

    fn compute(&mut self) -> Result<Session> {
        let config = self.config.take().ok_or_else(|| js_error("INTERNAL", "mount ran twice"))?;
        let callback = self.on_event.take();
        no_panic("mount", move || {
            let cfg = to_core(config)?;
            config::start_with_faults(cfg, faults_from_env()?, event_sink(callback))
                .map_err(core_error)
        })
    }

    fn resolve(&mut self, _env: Env, session: Session) -> Result<NativeExport> {
        Ok(NativeExport { session: Arc::new(Mutex::new(Some(session))), fake_peer: None })
    }
}

pub struct CloseTask {
    session: Arc<Mutex<Option<Session>>>,
}

impl Task for CloseTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> Result<()> {
        let session = self.session.clone();
        no_panic("close", move || {
            let taken = session.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                // Dropping the session after shutdown releases the event callback, so Node may
                // exit once every export is closed.
                Some(mut s) => s.shutdown().map_err(core_error),
                None => Ok(()),
            }
        })
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> Result<()> {
        Ok(())
    }
}

#[napi(object)]
pub struct NativeStats {
    /// Requests served, by FUSE opcode name (READ, WRITE, GETATTR, ...); only nonzero entries.
    pub requests: std::collections::HashMap<String, f64>,
    pub bytes_read: f64,
    pub bytes_written: f64,
    /// Requests answered with an error, except ENOSYS.
    pub errors: f64,
    /// Requests answered ENOSYS (operations not implemented by design, e.g. STATX).
    pub unsupported: f64,
    /// Requests being served right now, one entry per queue.
    pub in_flight: Vec<u32>,
    /// Requests each queue has taken in since the start, one entry per queue.
    pub served: Vec<f64>,
    /// Replies that could not be sent to the kernel (logged; should stay 0).
    pub lost_replies: f64,
}

/// A mounted export. Private: the public API is ts/index.ts.
#[napi]
pub struct NativeExport {
    session: Arc<Mutex<Option<Session>>>,
    /// With a fake device: the end that stands in for the kernel.
    fake_peer: Option<std::os::fd::OwnedFd>,
}

/// Turns halt events into calls of the JS callback.
fn event_sink(callback: Option<Arc<EventCallback>>) -> Box<dyn Fn(SessionEvent) + Send + Sync> {
    Box::new(move |ev: SessionEvent| {
        let SessionEvent::Halt { reason } = ev;
        if let Some(cb) = &callback {
            let ev = NativeEvent { kind: "halt".into(), reason };
            cb.call(Ok(ev), ThreadsafeFunctionCallMode::NonBlocking);
        }
    })
}

#[napi]
impl NativeExport {
    /// Mounts and answers FUSE INIT; resolves when the kernel can serve requests.
    #[napi(ts_return_type = "Promise<NativeExport>")]
    pub fn mount(
        config: NativeExportConfig,
        #[napi(ts_arg_type = "(err: Error | null, event: NativeEvent) => void")]
        on_event: EventCallback,
    ) -> AsyncTask<MountTask> {
        init_logging();
        AsyncTask::new(MountTask { config: Some(config), on_event: Some(Arc::new(on_event)) })
    }

    /// Serves the export over a fake device instead of a mount (`mountpoint` is ignored): the
    /// real request path, fed by whoever writes FUSE requests into `fakeDevicePeerFd`. For tests
    /// of what the kernel never sends (malformed streams, halts).
    #[napi]
    pub fn start_fake_device(
        config: NativeExportConfig,
        #[napi(ts_arg_type = "(err: Error | null, event: NativeEvent) => void")]
        on_event: EventCallback,
    ) -> Result<NativeExport> {
        init_logging();
        let callback = Some(Arc::new(on_event));
        no_panic("startFakeDevice", move || {
            let cfg = to_core(config)?;
            let (session, peer) =
                config::start_fake_device(cfg, event_sink(callback)).map_err(core_error)?;
            Ok(NativeExport { session: Arc::new(Mutex::new(Some(session))), fake_peer: Some(peer) })
        })
    }

    /// The fd that stands in for the kernel, for an export made by `startFakeDevice`; else null.
    #[napi(getter)]
    pub fn fake_device_peer_fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        self.fake_peer.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Unmounts, waits for in-flight requests, flushes the backend. Idempotent.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self) -> AsyncTask<CloseTask> {
        AsyncTask::new(CloseTask { session: self.session.clone() })
    }

    /// Counters since the export started; all zero once closed.
    #[napi]
    pub fn stats(&self) -> NativeStats {
        use blockfuse_core::protocol::abi::opcode;
        use std::sync::atomic::Ordering::Relaxed;
        let guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = NativeStats {
            requests: Default::default(),
            bytes_read: 0.0,
            bytes_written: 0.0,
            errors: 0.0,
            unsupported: 0.0,
            in_flight: Vec::new(),
            served: Vec::new(),
            lost_replies: 0.0,
        };
        if let Some(session) = guard.as_ref() {
            let st = &session.export().stats;
            for (op, count) in st.requests.iter().enumerate() {
                let n = count.load(Relaxed);
                if n > 0 {
                    *out.requests.entry(opcode::name(op as u32).to_string()).or_default() +=
                        n as f64;
                }
            }
            out.bytes_read = st.bytes_read.load(Relaxed) as f64;
            out.bytes_written = st.bytes_written.load(Relaxed) as f64;
            out.errors = st.errors.load(Relaxed) as f64;
            out.unsupported = st.unsupported.load(Relaxed) as f64;
            out.lost_replies = st.lost_replies.load(Relaxed) as f64;
            out.in_flight = session.in_flight().into_iter().map(|n| n as u32).collect();
            out.served = session.served().into_iter().map(|n| n as f64).collect();
        }
        out
    }

    /// The format served: 'raw', 'qcow2' or 'null' (what probing found for 'auto'); '' once
    /// closed.
    #[napi(getter)]
    pub fn format(&self) -> String {
        let guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|s| s.export().backend().format_name().to_string()).unwrap_or_default()
    }

    /// Whether requests come through FUSE-over-io_uring (false once closed).
    #[napi(getter)]
    pub fn io_uring(&self) -> bool {
        let guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().is_some_and(|s| s.io_uring())
    }

    /// With ioUring 'auto' served by read(2): why FUSE-over-io_uring was not used.
    #[napi(getter)]
    pub fn io_uring_fallback(&self) -> Option<String> {
        let guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().and_then(|s| s.io_uring_fallback().map(str::to_string))
    }

    /// Whether opens may go straight to the image (FUSE passthrough; false once closed).
    #[napi(getter)]
    pub fn passthrough(&self) -> bool {
        let guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().is_some_and(|s| s.passthrough())
    }

    /// With passthrough 'auto' not used: why.
    #[napi(getter)]
    pub fn passthrough_fallback(&self) -> Option<String> {
        let guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().and_then(|s| s.passthrough_fallback().map(str::to_string))
    }

    /// Current size of the exported image in bytes (0 once closed).
    #[napi(getter)]
    pub fn size(&self) -> f64 {
        let guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|s| s.export().backend().len() as f64).unwrap_or(0.0)
    }
}

#[napi]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

//! Connecting to an NBD server: the socket (TCP or Unix, with a connect timeout), the fixed
//! newstyle handshake, STARTTLS with rustls (the `ring` provider; CA, client certificate and key
//! from files; the server's name checked), structured replies, the `base:allocation` context and
//! NBD_OPT_GO with block sizes. Blocking, with socket timeouts: it runs at `create` and on the
//! reconnect thread, never on a queue thread.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::proto::{self, ExportInfo};
use super::uri::{Address, NbdUri};

/// Files for TLS (PEM). Without `ca`, the system's CA bundle is used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry; default: the URI's host (`localhost` for
    /// Unix sockets).
    pub server_name: Option<String>,
}

/// The system CA bundle (Debian's ca-certificates).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Largest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// Why a connection could not be made; each kind has its own error code.
#[derive(Debug)]
pub enum ConnectError {
    /// The server cannot be reached (refused, unreachable, timed out).
    Unreachable(String),
    /// The server does not have the export.
    UnknownExport(String),
    /// TLS could not be set up (bad files, refused certificate, the server requires TLS).
    Tls(String),
    /// The server broke or refused the handshake.
    Handshake(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable(m)
            | ConnectError::UnknownExport(m)
            | ConnectError::Tls(m)
            | ConnectError::Handshake(m) => f.write_str(m),
        }
    }
}

/// A connected socket.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Socket::Unix(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
        }
    }
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).read(buf),
            Socket::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).write(buf),
            Socket::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How to reach one export.
#[derive(Clone)]
pub struct Target {
    pub uri: NbdUri,
    pub tls: Option<Arc<ClientConfig>>,
    pub server_name: Option<ServerName<'static>>,
    pub timeout: Duration,
}

impl Target {
    /// Checks the URI's TLS needs and loads the TLS files once.
    pub fn new(uri: NbdUri, files: &TlsFiles, timeout: Duration) -> Result<Self, ConnectError> {
        let any_file = files.ca.is_some() || files.cert.is_some() || files.key.is_some();
        if !uri.tls {
            if any_file || files.server_name.is_some() {
                return Err(ConnectError::Tls(format!(
                    "TLS options given but {uri} does not use TLS (use nbds:// or nbds+unix://)"
                )));
            }
            return Ok(Target { uri, tls: None, server_name: None, timeout });
        }
        let name = match (&files.server_name, &uri.address) {
            (Some(n), _) => n.clone(),
            (None, Address::Tcp { host, .. }) => host.clone(),
            (None, Address::Unix(_)) => "localhost".to_string(),
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| ConnectError::Tls(format!("bad TLS server name {name:?}: {e}")))?;
        let config = client_config(files)?;
        Ok(Target { uri, tls: Some(Arc::new(config)), server_name: Some(server_name), timeout })
    }
}

fn tls_err(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Tls(format!("cannot read {what} {}: {e}", path.display()))
}

fn client_config(files: &TlsFiles) -> Result<ClientConfig, ConnectError> {
    let ca = files.ca.clone().unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&ca).map_err(|e| tls_err("the CA file", &ca, e))?;
    for cert in certs {
        let cert = cert.map_err(|e| tls_err("the CA file", &ca, e))?;
        roots.add(cert).map_err(|e| tls_err("a CA certificate in", &ca, e))?;
    }
    if roots.is_empty() {
        return Err(ConnectError::Tls(format!("no CA certificate in {}", ca.display())));
    }
    // The `ring` provider builds without a C toolchain (aws-lc-rs needs cmake); rustls 0.23.48
    // deprecates it only for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    match (&files.cert, &files.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_err("the client certificate", cert, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err("the client certificate", cert, e))?;
            if chain.is_empty() {
                return Err(ConnectError::Tls(format!("no certificate in {}", cert.display())));
            }
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err("the client key", key, e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ConnectError::Tls(format!("the client certificate and key: {e}")))
        }
        _ => Err(ConnectError::Tls(
            "a client certificate needs its key, and a key its certificate".into(),
        )),
    }
}

/// A connection after NBD_OPT_GO: ready for transmission.
pub struct Negotiated {
    pub socket: Socket,
    pub tls: Option<ClientConnection>,
    pub info: ExportInfo,
    pub structured: bool,
    /// The `base:allocation` context id, when the server has it.
    pub allocation: Option<u32>,
}

fn open_socket(target: &Target) -> Result<Socket, ConnectError> {
    let unreachable =
        |e: io::Error| ConnectError::Unreachable(format!("cannot connect to {}: {e}", target.uri));
    let socket = match &target.uri.address {
        Address::Unix(path) => Socket::Unix(UnixStream::connect(path).map_err(unreachable)?),
        Address::Tcp { host, port } => {
            let addrs = (host.as_str(), *port).to_socket_addrs().map_err(unreachable)?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            let mut found = None;
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, target.timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or_else(|| unreachable(last))?;
            let _ = s.set_nodelay(true);
            Socket::Tcp(s)
        }
    };
    socket.set_timeouts(Some(target.timeout)).map_err(unreachable)?;
    Ok(socket)
}

/// The handshake's byte stream: the socket, then TLS over it after STARTTLS.
struct Stream {
    socket: Socket,
    tls: Option<ClientConnection>,
}

impl Stream {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.tls {
            None => (&self.socket).read_exact(buf),
            Some(conn) => rustls::Stream::new(conn, &mut &self.socket).read_exact(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => (&self.socket).write_all(buf),
            Some(conn) => {
                let mut sock = &self.socket;
                let mut s = rustls::Stream::new(conn, &mut sock);
                s.write_all(buf)?;
                s.flush()
            }
        }
    }
}

fn handshake_err(uri: &NbdUri, e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Handshake(format!("NBD handshake with {uri} failed: {e}"))
}

/// A failed read or write during option haggling. Over TLS it is most likely TLS's doing: with
/// TLS 1.3 a server that refuses our certificate (or its absence) says so only after the
/// handshake, by an alert or by closing.
fn io_err(s: &Stream, uri: &NbdUri, e: io::Error) -> ConnectError {
    if s.tls.is_some() {
        ConnectError::Tls(format!(
            "{uri}: the TLS session failed after the handshake: {e} (does the server require a \
             client certificate?)"
        ))
    } else {
        handshake_err(uri, e)
    }
}

/// Reads one option reply for `option`: (reply type, payload).
fn option_reply(s: &mut Stream, option: u32, uri: &NbdUri) -> Result<(u32, Vec<u8>), ConnectError> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).map_err(|e| io_err(s, uri, e))?;
    let r = proto::option_reply(&head).map_err(|e| handshake_err(uri, e))?;
    if r.option != option {
        return Err(handshake_err(uri, "option reply for another option"));
    }
    if r.len > MAX_OPTION_REPLY {
        return Err(handshake_err(uri, "option reply too long"));
    }
    let mut data = vec![0u8; r.len as usize];
    s.read_exact(&mut data).map_err(|e| io_err(s, uri, e))?;
    Ok((r.reply, data))
}

fn send_option(s: &mut Stream, opt: u32, data: &[u8], uri: &NbdUri) -> Result<(), ConnectError> {
    s.write_all(&proto::option(opt, data)).map_err(|e| io_err(s, uri, e))
}

/// Connects, negotiates and enters transmission.
pub fn connect(target: &Target) -> Result<Negotiated, ConnectError> {
    let uri = &target.uri;
    let socket = open_socket(target)?;
    let mut s = Stream { socket, tls: None };
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ConnectError::Unreachable(format!("{uri}: no NBD greeting within {:?}", target.timeout))
        }
        _ => handshake_err(uri, e),
    })?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap_or_default());
    let opt = u64::from_be_bytes(greeting[8..16].try_into().unwrap_or_default());
    if magic != proto::NBDMAGIC {
        return Err(handshake_err(uri, "not an NBD server (no NBDMAGIC)"));
    }
    if opt != proto::IHAVEOPT {
        return Err(handshake_err(
            uri,
            "the server speaks the oldstyle protocol, which is not supported",
        ));
    }
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(handshake_err(uri, "the server does not speak fixed newstyle"));
    }
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if flags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).map_err(|e| handshake_err(uri, e))?;

    if let (Some(config), Some(name)) = (&target.tls, &target.server_name) {
        send_option(&mut s, proto::OPT_STARTTLS, &[], uri)?;
        let (reply, _) = option_reply(&mut s, proto::OPT_STARTTLS, uri)?;
        if reply != proto::REP_ACK {
            return Err(ConnectError::Tls(format!(
                "{uri}: the server refused STARTTLS ({})",
                proto::option_error_name(reply)
            )));
        }
        let mut conn = ClientConnection::new(config.clone(), name.clone())
            .map_err(|e| ConnectError::Tls(format!("{uri}: TLS setup: {e}")))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut &s.socket)
                .map_err(|e| ConnectError::Tls(format!("{uri}: TLS handshake failed: {e}")))?;
        }
        conn.set_buffer_limit(None);
        s.tls = Some(conn);
    }

    send_option(&mut s, proto::OPT_STRUCTURED_REPLY, &[], uri)?;
    let (reply, _) = option_reply(&mut s, proto::OPT_STRUCTURED_REPLY, uri)?;
    if reply == proto::REP_ERR_TLS_REQD {
        return Err(tls_required(uri));
    }
    let structured = reply == proto::REP_ACK;

    let mut allocation = None;
    if structured {
        let data = proto::set_meta_context_data(&uri.export, proto::BASE_ALLOCATION);
        send_option(&mut s, proto::OPT_SET_META_CONTEXT, &data, uri)?;
        loop {
            let (reply, data) = option_reply(&mut s, proto::OPT_SET_META_CONTEXT, uri)?;
            match reply {
                proto::REP_META_CONTEXT => {
                    if let Some(id) = proto::meta_context(&data, proto::BASE_ALLOCATION)
                        .map_err(|e| handshake_err(uri, e))?
                    {
                        allocation = Some(id);
                    }
                }
                proto::REP_ACK => break,
                proto::REP_ERR_UNKNOWN => return Err(unknown_export(uri, &data)),
                // Any other error: no contexts; the export still works without block status.
                e if e & proto::REP_FLAG_ERROR != 0 => break,
                _ => return Err(handshake_err(uri, "unexpected reply to SET_META_CONTEXT")),
            }
        }
    }

    send_option(&mut s, proto::OPT_GO, &proto::opt_go_data(&uri.export), uri)?;
    let mut info = ExportInfo::default();
    let mut have_export = false;
    loop {
        let (reply, data) = option_reply(&mut s, proto::OPT_GO, uri)?;
        match reply {
            proto::REP_INFO => {
                proto::apply_info(&mut info, &data).map_err(|e| handshake_err(uri, e))?;
                have_export |= data.get(..2) == Some(&[0, 0]);
            }
            proto::REP_ACK => break,
            proto::REP_ERR_UNKNOWN => return Err(unknown_export(uri, &data)),
            proto::REP_ERR_TLS_REQD => return Err(tls_required(uri)),
            e if e & proto::REP_FLAG_ERROR != 0 => {
                return Err(handshake_err(
                    uri,
                    format!("NBD_OPT_GO: {}{}", proto::option_error_name(e), message(&data)),
                ))
            }
            _ => return Err(handshake_err(uri, "unexpected reply to NBD_OPT_GO")),
        }
    }
    if !have_export {
        return Err(handshake_err(uri, "NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
    }
    if info.flags & proto::TFLAG_HAS_FLAGS == 0 {
        return Err(handshake_err(uri, "the transmission flags lack NBD_FLAG_HAS_FLAGS"));
    }
    if info.min_block == 0 {
        // Defaults of the spec for a server that states no constraints.
        info.min_block = 1;
        info.pref_block = 4096;
        info.max_block = 32 << 20;
    }
    Ok(Negotiated { socket: s.socket, tls: s.tls, info, structured, allocation })
}

fn message(data: &[u8]) -> String {
    match std::str::from_utf8(data) {
        Ok(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}

fn unknown_export(uri: &NbdUri, data: &[u8]) -> ConnectError {
    ConnectError::UnknownExport(format!(
        "the NBD server has no export {:?} ({uri}){}",
        uri.export,
        message(data)
    ))
}

fn tls_required(uri: &NbdUri) -> ConnectError {
    ConnectError::Tls(format!(
        "the NBD server at {uri} requires TLS: use nbds:// (or nbds+unix://)"
    ))
}

//! NBD URIs (the NBD URI standard, doc/uri.md of NetworkBlockDevice/nbd): `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, and their TLS forms `nbds://` and `nbds+unix://`. Pure.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    /// The export name (percent-decoded; may be empty: the server's default export).
    pub export: String,
    pub tls: bool,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            Address::Unix(p) => {
                write!(f, "nbd{s}+unix:///{}?socket={}", self.export, p.display())
            }
        }
    }
}

/// Whether `text` is meant as an NBD URI (its scheme starts with `nbd`).
pub fn is_nbd_uri(text: &str) -> bool {
    ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+tcp://", "nbds+tcp://"]
        .iter()
        .any(|p| text.starts_with(p))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            let v =
                u8::from_str_radix(hex, 16).map_err(|_| format!("bad percent escape in {s:?}"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Parses an NBD URI; the error says what is wrong.
pub fn parse(text: &str) -> Result<NbdUri, String> {
    let (scheme, rest) =
        text.split_once("://").ok_or_else(|| format!("{text:?} is not an NBD URI"))?;
    let (tls, unix) = match scheme {
        "nbd" | "nbd+tcp" => (false, false),
        "nbds" | "nbds+tcp" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        _ => {
            return Err(format!(
                "unknown scheme {scheme:?} (nbd, nbds, nbd+unix or nbds+unix expected)"
            ))
        }
    };
    if rest.contains('#') {
        return Err("an NBD URI has no fragment".into());
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path)?;
    if export.len() > 4096 {
        return Err("the export name is longer than 4096 bytes".into());
    }
    let mut socket = None;
    for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key {
            "socket" if unix => socket = Some(PathBuf::from(percent_decode(value)?)),
            "socket" => return Err("socket= is only for nbd+unix:// URIs".into()),
            // The standard's TLS query parameters name files; blockfuse takes them as options.
            _ => return Err(format!("unsupported query parameter {key:?}")),
        }
    }
    let address = if unix {
        if !authority.is_empty() {
            return Err(
                "an nbd+unix:// URI has no host (write nbd+unix:///export?socket=PATH)".into()
            );
        }
        match socket {
            Some(p) if !p.as_os_str().is_empty() => Address::Unix(p),
            _ => return Err("an nbd+unix:// URI needs ?socket=PATH".into()),
        }
    } else {
        if authority.contains('@') {
            return Err("an NBD URI has no user information".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) =
                v6.split_once(']').ok_or_else(|| format!("unclosed [ in {authority:?}"))?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or("junk after ]")?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{text:?} names no host"));
        }
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => {
                p.parse::<u16>().ok().filter(|&p| p != 0).ok_or(format!("bad port {p:?}"))?
            }
        };
        Address::Tcp { host: percent_decode(host)?, port }
    };
    Ok(NbdUri { address, export, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_standard_forms() {
        let u = parse("nbd://example.com/disk").unwrap();
        assert_eq!(u.address, Address::Tcp { host: "example.com".into(), port: 10809 });
        assert_eq!((u.export.as_str(), u.tls), ("disk", false));
        let u = parse("nbds://127.0.0.1:1234").unwrap();
        assert_eq!(u.address, Address::Tcp { host: "127.0.0.1".into(), port: 1234 });
        assert_eq!((u.export.as_str(), u.tls), ("", true));
        let u = parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(u.address, Address::Tcp { host: "::1".into(), port: 99 });
        assert_eq!(u.export, "a b");
        let u = parse("nbd+unix:///e?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "e");
        assert!(parse("nbds+unix://?socket=/x").unwrap().tls);
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for bad in [
            "http://x/y",
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:0/x",
            "nbd://h:70000/x",
            "nbd://h:port/x",
            "nbd://u@h/x",
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/s",
            "nbd://h/e?socket=/s",
            "nbd://h/e?tls-certificates=/x",
            "nbd://h/%zz",
            "nbd://[::1/x",
            "nbd://h/x#frag",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }
}

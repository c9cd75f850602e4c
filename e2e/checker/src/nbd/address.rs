//! NBD addresses as URIs, after the NBD URI convention: `nbd://host[:port][/export]` over TCP (port
//! 10809 by default) and `nbd+unix:///export?socket=/path/to.sock` over a unix socket.

use std::path::PathBuf;
use std::str::FromStr;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD export is served.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddress {
    /// Over TCP.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
        /// Export name (may be empty: the default export).
        export: String,
    },
    /// Over a unix socket.
    Unix {
        /// The socket's path.
        socket: PathBuf,
        /// Export name (may be empty: the default export).
        export: String,
    },
}

impl NbdAddress {
    /// The export name.
    pub fn export(&self) -> &str {
        match self {
            NbdAddress::Tcp { export, .. } | NbdAddress::Unix { export, .. } => export,
        }
    }
}

/// A URI that is not an NBD address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not an NBD address {uri:?}: {why} (expected nbd://host[:port][/export] or nbd+unix:///export?socket=PATH)"
)]
pub struct AddressError {
    uri: String,
    why: &'static str,
}

impl FromStr for NbdAddress {
    type Err = AddressError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = |why| AddressError {
            uri: uri.to_owned(),
            why,
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| err("missing ?socket="))?;
            if !(path.is_empty() || path.starts_with('/')) {
                return Err(err("a unix address has no host"));
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| err("missing socket="))?;
            let export = path.strip_prefix('/').unwrap_or(path).to_owned();
            return Ok(NbdAddress::Unix {
                socket: PathBuf::from(socket),
                export,
            });
        }
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| err("unknown scheme"))?;
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, e.to_owned()),
            None => (rest, String::new()),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| err("unclosed ["))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(err("junk after ]")),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| err("bad port"))?,
            None => DEFAULT_PORT,
        };
        Ok(NbdAddress::Tcp {
            host: host.to_owned(),
            port,
            export,
        })
    }
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Tcp { host, port, export } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddress::Tcp { host, port, export } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddress::Unix { socket, export } => {
                write!(f, "nbd+unix:///{export}?socket={}", socket.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() -> Result<(), AddressError> {
        assert_eq!(
            "nbd://127.0.0.1:10900/vol0".parse::<NbdAddress>()?,
            NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 10900,
                export: "vol0".into()
            }
        );
        assert_eq!(
            "nbd://h".parse::<NbdAddress>()?,
            NbdAddress::Tcp {
                host: "h".into(),
                port: DEFAULT_PORT,
                export: String::new()
            }
        );
        assert_eq!(
            "nbd://[::1]:99/x".parse::<NbdAddress>()?,
            NbdAddress::Tcp {
                host: "::1".into(),
                port: 99,
                export: "x".into()
            }
        );
        let u: NbdAddress = "nbd+unix:///v?socket=/tmp/a.sock".parse()?;
        assert_eq!(
            u,
            NbdAddress::Unix {
                socket: "/tmp/a.sock".into(),
                export: "v".into()
            }
        );
        assert_eq!(u.to_string().parse::<NbdAddress>()?, u);
        assert!("http://x".parse::<NbdAddress>().is_err());
        assert!("nbd://:1/x".parse::<NbdAddress>().is_err());
        assert!("nbd+unix:///v".parse::<NbdAddress>().is_err());
        Ok(())
    }
}

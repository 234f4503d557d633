//! The server's TLS: mutual authentication, TLS 1.3 only, and the client's role.
//!
//! `docs/wire.md` ("Transport") is the contract: every client presents a certificate signed
//! by the configured CA (no anonymous clients), the ALPN is [`ALPN`], and the role is the
//! one URI subject alternative name under [`ROLE_URI_PREFIX`]. The certificate chain and its
//! validity are checked by rustls during the handshake; [`role_of`] only reads the role of a
//! certificate rustls has already accepted, and the QUIC driver closes a connection whose
//! certificate names no role, or several, with `close::NO_ROLE`.
//!
//! 0-RTT is off (`max_early_data_size` 0): early data can be replayed, and a replayed
//! reserve would take stock twice. The crypto provider (ring) is named explicitly rather
//! than taken from a process-wide default, so that nothing depends on who installed what.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use stockplane_wire::transport::{ALPN, ROLE_URI_PREFIX};
use stockplane_wire::Role;
use x509_parser::extensions::GeneralName;

/// Builds the server's rustls configuration from PEM files: its certificate chain, its
/// private key, and the CA that signs client certificates.
///
/// Clients must present a certificate that chains to `client_ca_pem`; TLS 1.3 only, ALPN
/// [`ALPN`], no 0-RTT.
pub fn server_crypto(cert_pem: &Path, key_pem: &Path, client_ca_pem: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let read = |path: &Path| fs::read(path).with_context(|| format!("read {}", path.display()));
    server_crypto_from_pem(&read(cert_pem)?, &read(key_pem)?, &read(client_ca_pem)?)
}

/// Builds the server's rustls configuration from PEM bytes held in memory; see
/// [`server_crypto`], which reads the same three things from files.
pub fn server_crypto_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> anyhow::Result<rustls::ServerConfig> {
    let chain = certs_from_pem(cert_pem).context("read the server certificate")?;
    let key = key_from_pem(key_pem).context("read the server key")?;
    let mut roots = RootCertStore::empty();
    for ca in certs_from_pem(client_ca_pem).context("read the client CA")? {
        roots.add(ca).context("add the client CA to the trusted roots")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The builder's default refuses clients without a certificate; it is not relaxed here.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("build the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("select TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("use the server certificate and key")?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Wraps the server's rustls configuration for QUIC (quinn-proto), with quinn's default
/// transport parameters; the QUIC driver adjusts those it bounds.
pub fn quic_server_config(crypto: rustls::ServerConfig) -> anyhow::Result<quinn_proto::ServerConfig> {
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(crypto)
        .context("use the TLS configuration for QUIC (it needs TLS 1.3 and an AES-128-GCM suite)")?;
    Ok(quinn_proto::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// Every certificate in a PEM buffer, in order; at least one.
fn certs_from_pem(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<Vec<_>, _>>().context("parse PEM")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the PEM");
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM buffer.
fn key_from_pem(pem: &[u8]) -> anyhow::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..]).context("parse PEM")?.context("no private key in the PEM")
}

/// Why a client certificate gives no role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// The certificate has no URI subject alternative name under the role prefix.
    #[error("the certificate names no role")]
    NoRole,
    /// The certificate names more than one role (even the same one twice).
    #[error("the certificate names more than one role")]
    SeveralRoles,
    /// The certificate names a role this build does not know.
    #[error("the certificate names an unknown role {0:?}")]
    UnknownRole(String),
    /// The bytes are not one DER X.509 certificate with well-formed extensions.
    #[error("the certificate cannot be parsed")]
    Unparsable,
}

/// The role a client certificate names: its one URI subject alternative name that starts
/// with [`ROLE_URI_PREFIX`], `checkout` or `control`.
///
/// It does not check the certificate's signature or validity; rustls did that during the
/// handshake, and only a certificate it accepted should come here.
pub fn role_of(cert_der: &[u8]) -> Result<Role, RoleError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|_| RoleError::Unparsable)?;
    if !rest.is_empty() {
        return Err(RoleError::Unparsable);
    }
    let Some(names) = cert.subject_alternative_name().map_err(|_| RoleError::Unparsable)? else {
        return Err(RoleError::NoRole);
    };
    let mut roles = names.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) => uri.strip_prefix(ROLE_URI_PREFIX),
        _ => None,
    });
    let role = roles.next().ok_or(RoleError::NoRole)?;
    if roles.next().is_some() {
        return Err(RoleError::SeveralRoles);
    }
    match role {
        "checkout" => Ok(Role::Checkout),
        "control" => Ok(Role::Control),
        unknown => Err(RoleError::UnknownRole(unknown.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, SystemTime};

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, ServerConnection};

    use super::*;
    use crate::certs::{write_dev_certs, DevCa};

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// A client certificate signed by `ca` for `roles`, valid from yesterday for a year.
    fn client(ca: &DevCa, roles: &[&str]) -> (String, String) {
        let now = SystemTime::now();
        ca.client_cert(roles, now - DAY, now + 365 * DAY).unwrap()
    }

    /// The DER of the first certificate in a PEM string.
    fn der(pem: &str) -> Vec<u8> {
        certs_from_pem(pem.as_bytes()).unwrap().remove(0).to_vec()
    }

    /// A fresh directory under the system's temporary directory.
    fn temp_dir(name: &str) -> std::path::PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = format!("stockplane-{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(unique);
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn role_of_reads_the_one_role() {
        let ca = DevCa::new().unwrap();
        assert_eq!(role_of(&der(&client(&ca, &["checkout"]).0)), Ok(Role::Checkout));
        assert_eq!(role_of(&der(&client(&ca, &["control"]).0)), Ok(Role::Control));
    }

    #[test]
    fn role_of_refuses_none_several_unknown_and_garbage() {
        let ca = DevCa::new().unwrap();
        assert_eq!(role_of(&der(&client(&ca, &[]).0)), Err(RoleError::NoRole));
        assert_eq!(role_of(&der(&client(&ca, &["checkout", "control"]).0)), Err(RoleError::SeveralRoles));
        assert_eq!(role_of(&der(&client(&ca, &["checkout", "checkout"]).0)), Err(RoleError::SeveralRoles));
        assert_eq!(role_of(&der(&client(&ca, &["admin"]).0)), Err(RoleError::UnknownRole("admin".into())));
        // A server certificate has SANs, but none under the role prefix.
        assert_eq!(role_of(&der(&ca.server_cert(&["localhost"]).unwrap().0)), Err(RoleError::NoRole));
        assert_eq!(role_of(b"not a certificate"), Err(RoleError::Unparsable));
        let mut trailing = der(&client(&ca, &["checkout"]).0);
        trailing.push(0);
        assert_eq!(role_of(&trailing), Err(RoleError::Unparsable));
    }

    #[test]
    fn server_crypto_builds_from_the_dev_certs() {
        let dir = temp_dir("dev-certs");
        write_dev_certs(&dir).unwrap();
        let crypto = server_crypto(&dir.join("server.pem"), &dir.join("server.key"), &dir.join("ca.pem")).unwrap();
        assert_eq!(crypto.alpn_protocols, vec![ALPN.to_vec()]);
        assert_eq!(crypto.max_early_data_size, 0);
        quic_server_config(crypto).unwrap();
        for role in ["checkout", "control"] {
            let pem = fs::read_to_string(dir.join(format!("{role}.pem"))).unwrap();
            assert!(role_of(&der(&pem)).is_ok(), "{role}");
        }
        // The CA written to disk can sign more certificates that chain to it.
        let ca = DevCa::load(
            &fs::read_to_string(dir.join("ca.pem")).unwrap(),
            &fs::read_to_string(dir.join("ca.key")).unwrap(),
        )
        .unwrap();
        let server = server_crypto_from_pem(
            &fs::read(dir.join("server.pem")).unwrap(),
            &fs::read(dir.join("server.key")).unwrap(),
            ca.cert_pem().as_bytes(),
        )
        .unwrap();
        let (cert, key) = client(&ca, &["control"]);
        let outcome = handshake(server, client_config(&ca.cert_pem(), Some((&cert, &key)), ALPN));
        assert_eq!(outcome.unwrap(), Role::Control);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in ["ca.key", "server.key", "checkout.key", "control.key"] {
                let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// How an in-memory handshake ended badly.
    #[derive(Debug)]
    enum Failure {
        /// The server refused: what rustls said on its side.
        Server(rustls::Error),
        /// The client refused before the server did.
        Client(rustls::Error),
        /// The server accepted, but the certificate it saw gives no role.
        Role(RoleError),
    }

    /// A server configured with `ca` as the client CA and a server certificate it signed.
    fn server_config(ca: &DevCa) -> rustls::ServerConfig {
        let (cert, key) = ca.server_cert(&["localhost", "127.0.0.1", "::1"]).unwrap();
        server_crypto_from_pem(cert.as_bytes(), key.as_bytes(), ca.cert_pem().as_bytes()).unwrap()
    }

    /// A TLS 1.3 client that trusts `server_ca`, offers `alpn`, and presents `identity`.
    fn client_config(server_ca: &str, identity: Option<(&str, &str)>, alpn: &[u8]) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        for ca in certs_from_pem(server_ca.as_bytes()).unwrap() {
            roots.add(ca).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(certs_from_pem(cert.as_bytes()).unwrap(), key_from_pem(key.as_bytes()).unwrap())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        config
    }

    /// Runs a real TLS handshake between the two configurations over in-memory buffers
    /// and returns the role of the client certificate the server accepted.
    fn handshake(server: rustls::ServerConfig, client: ClientConfig) -> Result<Role, Failure> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(Arc::new(client), name).unwrap();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        let mut buffer = Vec::new();
        // A TLS 1.3 handshake with client authentication takes two round trips.
        for _ in 0..10 {
            while client.wants_write() {
                buffer.clear();
                client.write_tls(&mut buffer).unwrap();
                let mut bytes = &buffer[..];
                while !bytes.is_empty() {
                    server.read_tls(&mut bytes).unwrap();
                    server.process_new_packets().map_err(Failure::Server)?;
                }
            }
            while server.wants_write() {
                buffer.clear();
                server.write_tls(&mut buffer).unwrap();
                let mut bytes = &buffer[..];
                while !bytes.is_empty() {
                    client.read_tls(&mut bytes).unwrap();
                    client.process_new_packets().map_err(Failure::Client)?;
                }
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                assert_eq!(server.alpn_protocol(), Some(ALPN));
                let certs = server.peer_certificates().expect("client authentication is required");
                return role_of(&certs[0]).map_err(Failure::Role);
            }
        }
        panic!("the handshake made no progress");
    }

    #[test]
    fn handshake_accepts_a_client_of_the_ca_and_reads_its_role() {
        let ca = DevCa::new().unwrap();
        let (cert, key) = client(&ca, &["checkout"]);
        let outcome = handshake(server_config(&ca), client_config(&ca.cert_pem(), Some((&cert, &key)), ALPN));
        assert_eq!(outcome.unwrap(), Role::Checkout);
        // A certificate that names no role passes TLS; the driver closes it with NO_ROLE.
        let (cert, key) = client(&ca, &[]);
        let outcome = handshake(server_config(&ca), client_config(&ca.cert_pem(), Some((&cert, &key)), ALPN));
        assert!(matches!(outcome, Err(Failure::Role(RoleError::NoRole))), "{outcome:?}");
    }

    #[test]
    fn handshake_refuses_a_client_without_a_certificate() {
        let ca = DevCa::new().unwrap();
        let outcome = handshake(server_config(&ca), client_config(&ca.cert_pem(), None, ALPN));
        assert!(matches!(outcome, Err(Failure::Server(rustls::Error::NoCertificatesPresented))), "{outcome:?}");
    }

    #[test]
    fn handshake_refuses_a_client_of_another_ca() {
        let ca = DevCa::new().unwrap();
        let other = DevCa::new().unwrap();
        let (cert, key) = client(&other, &["checkout"]);
        let outcome = handshake(server_config(&ca), client_config(&ca.cert_pem(), Some((&cert, &key)), ALPN));
        assert!(
            matches!(
                outcome,
                Err(Failure::Server(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn handshake_refuses_an_expired_client_certificate() {
        let ca = DevCa::new().unwrap();
        let now = SystemTime::now();
        let (cert, key) = ca.client_cert(&["checkout"], now - 30 * DAY, now - DAY).unwrap();
        let outcome = handshake(server_config(&ca), client_config(&ca.cert_pem(), Some((&cert, &key)), ALPN));
        assert!(
            matches!(
                outcome,
                Err(Failure::Server(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
                )))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn handshake_fails_on_the_client_when_it_does_not_trust_the_server() {
        let ca = DevCa::new().unwrap();
        let other = DevCa::new().unwrap();
        let (cert, key) = client(&ca, &["checkout"]);
        let outcome = handshake(server_config(&ca), client_config(&other.cert_pem(), Some((&cert, &key)), ALPN));
        assert!(
            matches!(
                outcome,
                Err(Failure::Client(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn handshake_refuses_a_client_with_another_alpn() {
        let ca = DevCa::new().unwrap();
        let (cert, key) = client(&ca, &["checkout"]);
        let outcome = handshake(server_config(&ca), client_config(&ca.cert_pem(), Some((&cert, &key)), b"h3"));
        assert!(matches!(outcome, Err(Failure::Server(rustls::Error::NoApplicationProtocol))), "{outcome:?}");
    }
}

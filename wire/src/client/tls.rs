//! TLS for the client: rustls with the configured CA as the only root, the client's
//! certificate for mutual authentication, TLS 1.3 only and ALPN `stockplane/1`.
//!
//! Nothing global is installed: the ring provider is built here and handed to rustls,
//! so that a process embedding the client keeps whatever default it chose.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::ClientError;
use crate::transport;

/// How often an idle connection sends a keep-alive, well under the idle timeout.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// How long a connection (or a handshake) may hear nothing before it is given up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the rustls client configuration from PEM bytes: `ca_pem` holds the CA
/// certificate(s) to trust (and nothing else is trusted), `cert_pem` the client's
/// certificate chain, `key_pem` its private key. Public for tools that speak the
/// protocol below the client (the end-to-end driver, tests sending malformed frames).
pub fn tls_config(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tls_certs(ca_pem, "CA certificate")? {
        roots.add(cert).map_err(|error| ClientError::Tls(format!("add the CA certificate: {error}")))?;
    }
    let chain = tls_certs(cert_pem, "client certificate")?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|error| ClientError::Tls(format!("parse the client key PEM: {error}")))?
        .ok_or_else(|| ClientError::Tls("no private key in the client key PEM".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| ClientError::Tls(format!("choose TLS 1.3: {error}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|error| ClientError::Tls(format!("use the client certificate and key: {error}")))?;
    config.alpn_protocols = vec![transport::ALPN.to_vec()];
    Ok(config)
}

/// Wraps a rustls configuration for QUIC, with keep-alives so that an idle pooled
/// connection is not closed by the idle timeout.
pub(crate) fn tls_quic_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|error| ClientError::Tls(format!("use the TLS configuration for QUIC: {error}")))?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    let idle = quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
        .map_err(|error| ClientError::Tls(format!("set the idle timeout: {error}")))?;
    transport.max_idle_timeout(Some(idle));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Every certificate in `pem`; at least one, or an error naming `what`.
fn tls_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ClientError::Tls(format!("parse the {what} PEM: {error}")))?;
    if certs.is_empty() {
        return Err(ClientError::Tls(format!("no certificate in the {what} PEM")));
    }
    Ok(certs)
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    use super::*;

    /// PEMs of a fresh CA and of a client certificate it signed for `role`.
    pub(crate) struct TestPems {
        pub(crate) ca: Vec<u8>,
        pub(crate) cert: Vec<u8>,
        pub(crate) key: Vec<u8>,
    }

    pub(crate) fn test_pems(role: &str) -> TestPems {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(vec!["checkout.test".to_string()]).expect("client params");
        let uri = format!("{}{role}", transport::ROLE_URI_PREFIX);
        params.subject_alt_names.push(SanType::URI(uri.try_into().expect("URI SAN")));
        let cert = params.signed_by(&key, &ca, &ca_key).expect("client certificate");
        TestPems { ca: ca.pem().into_bytes(), cert: cert.pem().into_bytes(), key: key.serialize_pem().into_bytes() }
    }

    #[test]
    fn builds_a_tls13_mutual_auth_config_with_the_alpn() {
        let pems = test_pems("checkout");
        let config = tls_config(&pems.ca, &pems.cert, &pems.key).expect("TLS config");
        assert_eq!(config.alpn_protocols, vec![transport::ALPN.to_vec()]);
        assert!(config.client_auth_cert_resolver.has_certs());
        assert!(config.crypto_provider().cipher_suites.iter().any(|suite| suite.tls13().is_some()));
        tls_quic_config(config).expect("QUIC config");
    }

    #[test]
    fn refuses_missing_or_mismatched_material() {
        let pems = test_pems("control");
        let other = test_pems("control");
        let refused = |ca: &[u8], cert: &[u8], key: &[u8]| match tls_config(ca, cert, key) {
            Ok(_) => panic!("expected a TLS error"),
            Err(ClientError::Tls(message)) => message,
            Err(error) => panic!("expected a TLS error, got {error}"),
        };
        assert!(refused(b"", &pems.cert, &pems.key).contains("no certificate in the CA certificate PEM"));
        assert!(refused(&pems.ca, &pems.key, &pems.key).contains("no certificate in the client certificate"));
        assert!(refused(&pems.ca, &pems.cert, &pems.cert).contains("no private key"));
        assert!(refused(&pems.ca, &pems.cert, &other.key).contains("client certificate and key"));
    }
}

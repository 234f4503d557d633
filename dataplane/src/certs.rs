//! Development certificates: a CA, a server certificate and one client certificate per role.
//!
//! `make certs` writes them with [`write_dev_certs`]; tests use [`DevCa`] to make the
//! certificates a handshake must refuse (expired, no role, two roles). Keys are ECDSA P-256.
//! The role of a client rides in a URI subject alternative name under
//! [`ROLE_URI_PREFIX`], as `docs/wire.md` ("Transport") requires.
//!
//! These certificates are for development and tests only: the CA key is written next to the
//! certificates it signs, and nothing here revokes or rotates anything. It reads the system
//! clock (validity starts a day ago), which is fine here: this module is a tool, not the engine.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use stockplane_wire::transport::ROLE_URI_PREFIX;

/// The files [`write_dev_certs`] writes, in the order it writes them.
pub const DEV_CERT_FILES: [&str; 8] =
    ["ca.pem", "ca.key", "server.pem", "server.key", "checkout.pem", "checkout.key", "control.pem", "control.key"];

/// How far back a development certificate's validity starts, so that a clock slightly
/// behind the one that made it still accepts it.
const DEV_NOT_BEFORE_BACK: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a development certificate stays valid after it was made.
const DEV_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Writes a development CA, a server certificate for `localhost`, `127.0.0.1` and `::1`, and
/// one client certificate per role (`checkout`, `control`) into `dir`, creating it if needed.
///
/// The CA key (`ca.key`) is written too, so that tests and tools can sign more certificates
/// with [`DevCa::load`]. Key files get mode 0600. Existing files are overwritten.
pub fn write_dev_certs(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let ca = DevCa::new().context("make the development CA")?;
    let (not_before, not_after) = dev_validity();
    let (server_pem, server_key) =
        ca.server_cert(&["localhost", "127.0.0.1", "::1"]).context("make the server certificate")?;
    let (checkout_pem, checkout_key) =
        ca.client_cert(&["checkout"], not_before, not_after).context("make the checkout certificate")?;
    let (control_pem, control_key) =
        ca.client_cert(&["control"], not_before, not_after).context("make the control certificate")?;
    let contents =
        [ca.cert_pem(), ca.key_pem(), server_pem, server_key, checkout_pem, checkout_key, control_pem, control_key];
    for (name, content) in DEV_CERT_FILES.iter().zip(contents) {
        let path = dir.join(name);
        let secret = name.ends_with(".key");
        write_dev_certs_file(&path, content.as_bytes(), secret).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Writes one file; a `secret` one is created with mode 0600, and an existing one is
/// narrowed to 0600 before its content is replaced.
fn write_dev_certs_file(path: &Path, content: &[u8], secret: bool) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        if path.exists() {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        }
    }
    let mut file = options.open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

/// The validity of a development certificate: from a day ago to a year from now.
fn dev_validity() -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (now - DEV_NOT_BEFORE_BACK, now + DEV_VALIDITY)
}

/// A certificate authority for development and tests: its certificate and its key.
///
/// Tests make one with [`DevCa::new`] and sign whatever certificates a case needs; tools
/// read back the one `make certs` wrote with [`DevCa::load`].
pub struct DevCa {
    /// The CA certificate, as signed (its params are the issuer of what it signs).
    cert: rcgen::Certificate,
    /// The CA's key pair.
    key: KeyPair,
    /// The CA certificate as PEM, exactly as it was made or loaded.
    cert_pem: String,
}

impl DevCa {
    /// Makes a new self-signed CA with a fresh P-256 key, valid from a day ago for a year.
    pub fn new() -> anyhow::Result<DevCa> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate the CA key")?;
        let mut params = CertificateParams::default();
        // A name of its own, so that a certificate from another development CA is refused
        // as from an unknown issuer rather than as a bad signature from a same-named one.
        let key_id: String = key.public_key_raw().iter().skip(1).take(6).map(|byte| format!("{byte:02x}")).collect();
        params.distinguished_name = distinguished_name(&format!("stockplane development CA {key_id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (not_before, not_after) = dev_validity();
        set_validity(&mut params, not_before, not_after)?;
        let cert = params.self_signed(&key).context("sign the CA certificate")?;
        let cert_pem = cert.pem();
        Ok(DevCa { cert, key, cert_pem })
    }

    /// Loads a CA from its certificate and key in PEM (as `ca.pem` and `ca.key` hold them).
    pub fn load(cert_pem: &str, key_pem: &str) -> anyhow::Result<DevCa> {
        let key = KeyPair::from_pem(key_pem).context("parse the CA key")?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).context("parse the CA certificate")?;
        // Signing again only rebuilds rcgen's issuer (name, key identifier); what this CA
        // signs names the subject and key of the loaded certificate, so it chains to it.
        let cert = params.self_signed(&key).context("rebuild the CA certificate")?;
        Ok(DevCa { cert, key, cert_pem: cert_pem.to_owned() })
    }

    /// The CA certificate in PEM, for a server's client-CA file or a client's root store.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA key in PEM. Whoever holds it can sign certificates the server will trust.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs a server certificate for `names` (DNS names, or IP addresses written as text),
    /// with extended key usage serverAuth, valid from a day ago for a year.
    ///
    /// Returns the certificate and its key, both in PEM.
    pub fn server_cert(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(names.first().copied().unwrap_or("stockplane server"));
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().with_context(|| format!("DNS name {name:?}"))?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (not_before, not_after) = dev_validity();
        self.sign_leaf(params, not_before, not_after)
    }

    /// Signs a client certificate that names each of `roles` in a URI subject alternative
    /// name (`urn:stockplane:role:<role>`), with extended key usage clientAuth, valid from
    /// `not_before` to `not_after`.
    ///
    /// Any role name is written as given, and any number of them, so that tests can make the
    /// certificates the server must refuse: none, two, an unknown one, or an expired one.
    /// Returns the certificate and its key, both in PEM.
    pub fn client_cert(
        &self,
        roles: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::default();
        let common_name = if roles.is_empty() { "stockplane client".to_owned() } else { roles.join("+") };
        params.distinguished_name = distinguished_name(&common_name);
        for role in roles {
            let uri = format!("{ROLE_URI_PREFIX}{role}");
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into().with_context(|| format!("URI {uri:?}"))?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_leaf(params, not_before, not_after)
    }

    /// Signs a leaf certificate (not a CA, key usage digitalSignature) with a fresh P-256 key.
    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<(String, String)> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before, not_after)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate a key")?;
        let cert = params.signed_by(&key, &self.cert, &self.key).context("sign a certificate")?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A distinguished name with only a common name.
fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Sets a certificate's validity from two system times (rcgen takes `time` dates, which
/// this crate reaches through rcgen rather than depending on `time` itself).
fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) -> anyhow::Result<()> {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let since_epoch = |time: SystemTime| time.duration_since(UNIX_EPOCH).context("a certificate time before 1970");
    params.not_before = epoch + since_epoch(not_before)?;
    params.not_after = epoch + since_epoch(not_after)?;
    anyhow::ensure!(params.not_before < params.not_after, "a certificate's validity ends before it starts");
    Ok(())
}

//! TLS for the server: a rustls configuration on the ring provider, loaded from PEM files,
//! and the self-signed development certificate that `paygate dev-cert` (or a first start on
//! the default paths) writes.
//!
//! Only TLS 1.3 and TLS 1.2 with AEAD, forward-secret (ECDHE) suites are offered; ALPN
//! advertises `h2` and `http/1.1`. Certificate reloading on SIGHUP arrives with the process
//! model; this module only builds configurations.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::ring as ring_provider;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// How long a generated development certificate is valid.
pub const DEV_CERT_DAYS: i64 = 90;

/// A certificate or key that cannot be used; the message names the file and what to do.
#[derive(Debug)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// The ring provider restricted to AEAD suites with forward secrecy.
///
/// ring's defaults already contain only such suites; listing them pins that choice so a
/// future default change cannot widen it silently.
pub fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..ring_provider::default_provider()
    }
}

/// Reads the certificate chain and key from the PEM files and checks that they belong
/// together.
fn load_certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|iter| iter.collect())
        .map_err(|e| {
            TlsError(format!(
                "cannot read certificate {}: {e}",
                files.cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            files.cert.display()
        )));
    }
    // A private key others can read is no longer private: refuse it rather than serve with it.
    crate::secret_file::refuse_shared(&files.key, "the TLS private key").map_err(TlsError)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        TlsError(format!(
            "cannot read private key {}: {e}",
            files.key.display()
        ))
    })?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        TlsError(format!(
            "certificate {} and key {} do not form a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })
}

/// The server's certificate, replaceable while running: new handshakes use whatever
/// [`CertificateStore::reload`] last installed; established connections keep theirs.
#[derive(Debug)]
pub struct CertificateStore {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertificateStore {
    /// Re-reads the certificate and key files. On any error the certificate in use stays,
    /// and the error says what is wrong with the new files.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load_certified_key(&self.files, &provider())?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        Ok(())
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Builds the server configuration from the PEM files, and the store through which its
/// certificate can be replaced later (SIGHUP).
pub fn server_config(
    files: &TlsFiles,
) -> Result<(Arc<ServerConfig>, Arc<CertificateStore>), TlsError> {
    let provider = provider();
    let store = Arc::new(CertificateStore {
        current: RwLock::new(Arc::new(load_certified_key(files, &provider)?)),
        files: files.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError(format!("TLS provider rejected the protocol versions: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), store))
}

/// A generated self-signed certificate and its key, both PEM.
pub struct DevCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a self-signed ECDSA P-256 certificate for `localhost`, `127.0.0.1` and `::1`,
/// valid from today for [`DEV_CERT_DAYS`] days.
pub fn generate_dev_certificate() -> Result<DevCertificate, TlsError> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut params = rcgen::CertificateParams::new(names)
        .map_err(|e| TlsError(format!("invalid development certificate names: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "paygate development certificate");
    let today = crate::time::now_millis().div_euclid(86_400_000);
    let (y, m, d) = ymd(today)?;
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd(today + DEV_CERT_DAYS)?;
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let key = rcgen::KeyPair::generate()
        .map_err(|e| TlsError(format!("cannot generate a key pair: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError(format!("cannot sign the development certificate: {e}")))?;
    Ok(DevCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn ymd(days_since_epoch: i64) -> Result<(i32, u8, u8), TlsError> {
    let date = crate::time::civil_from_days(days_since_epoch);
    let year =
        i32::try_from(date.year).map_err(|_| TlsError("the system clock is far off".into()))?;
    Ok((year, date.month, date.day))
}

/// Writes a development certificate to `files`, the key with mode 0600. Each file is
/// written to a temporary name and renamed into place, so a crash never leaves half a key.
pub fn write_dev_certificate(files: &TlsFiles, overwrite: bool) -> Result<(), TlsError> {
    if !overwrite {
        for path in [&files.cert, &files.key] {
            if path.exists() {
                return Err(TlsError(format!(
                    "{} already exists; pass --force to replace it",
                    path.display()
                )));
            }
        }
    }
    let generated = generate_dev_certificate()?;
    write_atomically(&files.key, generated.key_pem.as_bytes(), 0o600)?;
    write_atomically(&files.cert, generated.cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// Makes sure a certificate exists before serving: on the default paths, a missing pair is
/// replaced by a generated development certificate (with a loud warning); explicit paths
/// must exist.
pub fn ensure_certificate(files: &TlsFiles) -> Result<(), TlsError> {
    let (cert_exists, key_exists) = (files.cert.exists(), files.key.exists());
    if cert_exists && key_exists {
        return Ok(());
    }
    if files.are_defaults && !cert_exists && !key_exists {
        write_dev_certificate(files, false)?;
        log::warn!(
            "GENERATED A SELF-SIGNED DEVELOPMENT CERTIFICATE at {} (key {}), valid {} days for \
             localhost and 127.0.0.1 only. Clients will not trust it; use a real certificate \
             (--tls-cert/--tls-key) in production.",
            files.cert.display(),
            files.key.display(),
            DEV_CERT_DAYS
        );
        return Ok(());
    }
    let missing: Vec<String> = [(&files.cert, cert_exists), (&files.key, key_exists)]
        .into_iter()
        .filter(|(_, exists)| !exists)
        .map(|(p, _)| p.display().to_string())
        .collect();
    Err(TlsError(format!(
        "TLS file not found: {}. Give existing --tls-cert and --tls-key files, or run \
         `paygate dev-cert` to create a development certificate",
        missing.join(", ")
    )))
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let fail = |e: std::io::Error| TlsError(format!("cannot write {}: {e}", path.display()));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(fail)?;
    }
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail)?;
    file.write_all(contents).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    fs::rename(&tmp, path).map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_loads_into_a_server_config() {
        let dir = std::env::temp_dir().join(format!("paygate-tls-{}", uuid::Uuid::new_v4()));
        let files = TlsFiles {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            are_defaults: false,
        };
        write_dev_certificate(&files, false).unwrap();
        let (config, store) = server_config(&files).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // Reloading the same files works; a mismatched pair is refused and changes nothing.
        store.reload().unwrap();
        let other = generate_dev_certificate().unwrap();
        fs::write(&files.key, other.key_pem).unwrap();
        let err = store.reload().unwrap_err();
        assert!(err.0.contains("do not form a usable pair"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            write_dev_certificate(&files, false).is_err(),
            "refuses to overwrite"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_aead_forward_secret_suites_are_offered() {
        for suite in provider().cipher_suites {
            let name = format!("{:?}", suite.suite());
            assert!(
                name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
                "{name}"
            );
            assert!(
                name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
                "{name}"
            );
        }
    }
}

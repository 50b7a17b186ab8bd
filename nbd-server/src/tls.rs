//! TLS for `NBD_OPT_STARTTLS`: loading x509 certificates and keys into a rustls server configuration.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// Whether the server offers or insists on TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// Clients may upgrade with `NBD_OPT_STARTTLS`, or stay in the clear.
    Optional,
    /// Nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is accepted before TLS: no export, and not even the export
    /// list, is served in the clear.
    Required,
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::TlsFile { path: path.to_path_buf(), reason: e.to_string() })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::TlsFile { path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(Error::TlsFile { path: path.to_path_buf(), reason: "no PEM certificate in file".into() });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_pem(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| Error::TlsFile { path: path.to_path_buf(), reason: e.to_string() })?
        .ok_or_else(|| Error::TlsFile { path: path.to_path_buf(), reason: "no PEM private key in file".into() })
}

/// Builds a rustls server configuration from PEM files: the server's certificate chain and private key and, when
/// given, the CA that client certificates must chain to (clients without one are then refused).
pub fn server_config(
    cert_chain: &Path,
    private_key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>> {
    server_config_from_der(certs(cert_chain)?, key(private_key)?, client_ca.map(certs).transpose()?)
}

/// As [`server_config`], from DER certificates and key already in memory.
pub fn server_config_from_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<Vec<CertificateDer<'static>>>,
) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca).map_err(|e| Error::Tls(format!("client CA: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| Error::Tls(format!("certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

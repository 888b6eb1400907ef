//! `tls_server_config` into a [`rustls::ServerConfig`] (ring provider).
//!
//! Owns: the certificate chain and key (PEM, from files or inline), the
//! client CA pool, the five client auth types of Go's `crypto/tls` and the
//! client certificate verifier each becomes, the protocol versions, the
//! TLS 1.2 cipher suites and key exchange groups by their Go names.
//!
//! Never: accepts a TLS version below 1.2 (rustls has none), or leaves a
//! setting it cannot honour unsaid (a warning or an error names it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, SupportedKxGroup, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite,
};
use serde::Deserialize;

/// `tls_server_config` as written (empty strings count as unset, as Go's
/// zero values do).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct TlsFile {
    cert: String,
    key: String,
    client_ca: String,
    cert_file: String,
    key_file: String,
    client_auth_type: String,
    client_ca_file: String,
    cipher_suites: Vec<String>,
    curve_preferences: Vec<String>,
    min_version: String,
    max_version: String,
    prefer_server_cipher_suites: Option<bool>,
    client_allowed_sans: Vec<String>,
}

impl TlsFile {
    /// The toolkit's `IsEnabled`: TLS is on when any certificate, key, client
    /// CA or client auth type is set; otherwise the file is for plain HTTP.
    pub(super) fn is_enabled(&self) -> bool {
        [
            &self.cert,
            &self.key,
            &self.client_ca,
            &self.cert_file,
            &self.key_file,
            &self.client_ca_file,
            &self.client_auth_type,
        ]
        .iter()
        .any(|s| !s.is_empty())
    }
}

/// The client auth types of Go's `crypto/tls`, as the toolkit names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientAuth {
    No,
    /// Asked for, not required, not verified against a CA.
    Request,
    /// Required, not verified against a CA.
    RequireAny,
    /// Verified against the client CAs when given.
    VerifyIfGiven,
    /// Required and verified against the client CAs.
    RequireAndVerify,
}

fn client_auth(name: &str) -> Result<ClientAuth, String> {
    Ok(match name {
        "" | "NoClientCert" => ClientAuth::No,
        "RequestClientCert" => ClientAuth::Request,
        "RequireAnyClientCert" | "RequireClientCert" => ClientAuth::RequireAny,
        "VerifyClientCertIfGiven" => ClientAuth::VerifyIfGiven,
        "RequireAndVerifyClientCert" => ClientAuth::RequireAndVerify,
        other => {
            return Err(format!(
                "tls_server_config.client_auth_type: invalid ClientAuth: {other:?} (NoClientCert, \
                 RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, \
                 RequireAndVerifyClientCert)"
            ))
        }
    })
}

/// TLS versions by the toolkit's names, as (major, minor) order.
fn version(key: &str, name: &str) -> Result<Option<u8>, String> {
    Ok(Some(match name {
        "" => return Ok(None),
        "TLS10" => 0,
        "TLS11" => 1,
        "TLS12" => 2,
        "TLS13" => 3,
        other => {
            return Err(format!(
                "tls_server_config.{key}: unknown TLS version: {other:?}"
            ))
        }
    }))
}

/// The cipher suites Go's `tls.CipherSuites()` lists (the ones the toolkit
/// accepts) that rustls does not implement: CBC with SHA-1.
const GO_ONLY_SUITES: [&str; 4] = [
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
];

/// Go's names of the TLS 1.3 suites, which Go's `CipherSuites` setting
/// does not govern.
const GO_TLS13_SUITES: [&str; 3] = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

fn suite_name(s: &SupportedCipherSuite) -> String {
    // rustls prints a suite by its IANA name, which is also Go's.
    format!("{:?}", s.suite())
}

/// Checks the names in `t` (client auth type, versions, suites, curves)
/// without building anything: for a file that does not turn TLS on.
pub(super) fn check_names(t: &TlsFile, warnings: &mut Vec<String>) -> Result<(), String> {
    client_auth(&t.client_auth_type)?;
    versions(t, warnings)?;
    provider(t, warnings)?;
    Ok(())
}

/// Builds the server configuration; `files` gets every file read, `warnings`
/// what is served differently from what the file says.
pub(super) fn server_config(
    t: &TlsFile,
    dir: &Path,
    files: &mut Vec<PathBuf>,
    warnings: &mut Vec<String>,
) -> Result<Arc<ServerConfig>, String> {
    if t.cert.is_empty() && t.cert_file.is_empty() {
        return Err("tls_server_config: missing one of cert or cert_file".into());
    }
    if t.key.is_empty() && t.key_file.is_empty() {
        return Err("tls_server_config: missing one of key or key_file".into());
    }
    if !t.client_allowed_sans.is_empty() {
        return Err(
            "tls_server_config.client_allowed_sans: not supported by conntrack-metrics yet; \
             remove it, or use a client CA that issues only the allowed clients"
                .into(),
        );
    }
    let cert_pem = read(dir, "cert_file", &t.cert_file, &t.cert, files)?;
    let key_pem = read(dir, "key_file", &t.key_file, &t.key, files)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_server_config: the certificate: {e}"))?;
    if certs.is_empty() {
        return Err("tls_server_config: the certificate file holds no PEM CERTIFICATE".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("tls_server_config: the key: {e}"))?;

    let auth = client_auth(&t.client_auth_type)?;
    let ca_pem = if t.client_ca_file.is_empty() && t.client_ca.is_empty() {
        None
    } else {
        Some(read(
            dir,
            "client_ca_file",
            &t.client_ca_file,
            &t.client_ca,
            files,
        )?)
    };
    if ca_pem.is_some() && auth == ClientAuth::No {
        return Err(
            "tls_server_config: client CA's have been configured without a Client Auth Policy \
             (set client_auth_type)"
                .into(),
        );
    }

    let provider = Arc::new(provider(t, warnings)?);
    let versions = versions(t, warnings)?;
    let verifier = verifier(auth, ca_pem.as_deref(), &provider)?;
    let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls_server_config: the certificate and key: {e}"))?;
    // Go's PreferServerCipherSuites, true unless the file says otherwise.
    config.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(true);
    Ok(Arc::new(config))
}

/// The PEM bytes of `file` (relative to `dir`) or, when it is unset, of
/// `inline`.
fn read(
    dir: &Path,
    key: &str,
    file: &str,
    inline: &str,
    files: &mut Vec<PathBuf>,
) -> Result<Vec<u8>, String> {
    if file.is_empty() {
        return Ok(inline.as_bytes().to_vec());
    }
    let path = dir.join(file);
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("tls_server_config.{key}: {}: {e}", path.display()))?;
    files.push(path);
    Ok(bytes)
}

/// The ring provider, its TLS 1.2 suites and key exchange groups narrowed
/// and ordered as the file says.
fn provider(t: &TlsFile, warnings: &mut Vec<String>) -> Result<CryptoProvider, String> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !t.cipher_suites.is_empty() {
        let all = provider.cipher_suites.clone();
        let tls13 = all.iter().filter(|s| s.tls13().is_some());
        let mut chosen: Vec<SupportedCipherSuite> = Vec::new();
        for name in &t.cipher_suites {
            let found = all
                .iter()
                .find(|s| s.tls13().is_none() && suite_name(s) == *name);
            match found {
                Some(s) => chosen.push(*s),
                None if GO_ONLY_SUITES.contains(&name.as_str()) => warnings.push(format!(
                    "tls_server_config.cipher_suites: {name} is not implemented by rustls (CBC); skipped"
                )),
                None if GO_TLS13_SUITES.contains(&name.as_str()) => warnings.push(format!(
                    "tls_server_config.cipher_suites: {name} is a TLS 1.3 suite; as in Go, the list \
                     applies to TLS 1.2 only"
                )),
                None => return Err(format!("tls_server_config.cipher_suites: unknown cipher: {name}")),
            }
        }
        if chosen.is_empty() {
            return Err(
                "tls_server_config.cipher_suites: none of the listed TLS 1.2 suites is implemented \
                 by rustls"
                    .into(),
            );
        }
        // As in Go, TLS 1.3 always offers its own three suites.
        chosen.extend(tls13.copied());
        provider.cipher_suites = chosen;
    }
    if !t.curve_preferences.is_empty() {
        let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
        for name in &t.curve_preferences {
            let group: &'static dyn SupportedKxGroup = match name.as_str() {
                "X25519" => rustls::crypto::ring::kx_group::X25519,
                "CurveP256" => rustls::crypto::ring::kx_group::SECP256R1,
                "CurveP384" => rustls::crypto::ring::kx_group::SECP384R1,
                "CurveP521" => {
                    warnings.push(
                        "tls_server_config.curve_preferences: CurveP521 is not implemented by \
                         rustls's ring provider; skipped"
                            .into(),
                    );
                    continue;
                }
                other => {
                    return Err(format!(
                        "tls_server_config.curve_preferences: unknown curve: {other}"
                    ))
                }
            };
            groups.push(group);
        }
        if groups.is_empty() {
            return Err("tls_server_config.curve_preferences: no curve rustls implements".into());
        }
        provider.kx_groups = groups;
    }
    Ok(provider)
}

/// TLS 1.2 and 1.3, narrowed by `min_version` and `max_version`.
fn versions(
    t: &TlsFile,
    warnings: &mut Vec<String>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let min = version("min_version", &t.min_version)?.unwrap_or(2);
    let max = version("max_version", &t.max_version)?.unwrap_or(3);
    if min < 2 {
        warnings.push(format!(
            "tls_server_config.min_version: TLS1{min} is below what rustls implements; TLS 1.2 is \
             the minimum served"
        ));
    }
    if max < 2 {
        return Err(format!(
            "tls_server_config.max_version: TLS1{max} is not implemented by rustls (TLS 1.2 and \
             1.3 are)"
        ));
    }
    if min > max {
        return Err("tls_server_config: min_version is above max_version".into());
    }
    let mut out = Vec::new();
    if min <= 3 && max >= 3 {
        out.push(&rustls::version::TLS13);
    }
    if min <= 2 {
        out.push(&rustls::version::TLS12);
    }
    Ok(out)
}

fn verifier(
    auth: ClientAuth,
    ca_pem: Option<&[u8]>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let roots = match ca_pem {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("tls_server_config: the client CA: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("tls_server_config: the client CA: {e}"))?;
            }
            if roots.is_empty() {
                return Err("tls_server_config: the client CA holds no PEM CERTIFICATE".into());
            }
            Some(Arc::new(roots))
        }
        None => None,
    };
    let verifying = |roots: Option<Arc<RootCertStore>>, optional: bool| {
        let Some(roots) = roots else {
            return Err(format!(
                "tls_server_config: client_auth_type {} needs client_ca_file or client_ca (there \
                 are no system roots to verify against)",
                if optional {
                    "VerifyClientCertIfGiven"
                } else {
                    "RequireAndVerifyClientCert"
                }
            ));
        };
        let builder = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(provider));
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        builder
            .build()
            .map_err(|e| format!("tls_server_config: the client CA: {e}"))
    };
    match auth {
        ClientAuth::No => Ok(WebPkiClientVerifier::no_client_auth()),
        ClientAuth::Request => Ok(Arc::new(AnyClientCert::new(provider, false))),
        ClientAuth::RequireAny => Ok(Arc::new(AnyClientCert::new(provider, true))),
        ClientAuth::VerifyIfGiven => verifying(roots, true),
        ClientAuth::RequireAndVerify => verifying(roots, false),
    }
}

/// Go's `RequestClientCert` and `RequireAnyClientCert`: a client certificate
/// is asked for (and required by the second) but not checked against any CA;
/// the client still proves it holds the certificate's key (the handshake
/// signature is verified).
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl AnyClientCert {
    fn new(provider: &CryptoProvider, mandatory: bool) -> AnyClientCert {
        AnyClientCert {
            algorithms: provider.signature_verification_algorithms,
            mandatory,
        }
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(f: impl FnOnce(&mut TlsFile)) -> TlsFile {
        let mut t = TlsFile::default();
        f(&mut t);
        t
    }

    #[test]
    fn versions_follow_min_and_max() {
        let mut w = Vec::new();
        let names = |t: &TlsFile, w: &mut Vec<String>| {
            versions(t, w).map(|v| v.iter().map(|v| v.version).collect::<Vec<_>>())
        };
        use rustls::ProtocolVersion::{TLSv1_2, TLSv1_3};
        assert_eq!(names(&file(|_| {}), &mut w), Ok(vec![TLSv1_3, TLSv1_2]));
        let t13 = file(|t| t.min_version = "TLS13".into());
        assert_eq!(names(&t13, &mut w), Ok(vec![TLSv1_3]));
        let t12 = file(|t| t.max_version = "TLS12".into());
        assert_eq!(names(&t12, &mut w), Ok(vec![TLSv1_2]));
        assert!(w.is_empty());
        let t10 = file(|t| t.min_version = "TLS10".into());
        assert_eq!(names(&t10, &mut w), Ok(vec![TLSv1_3, TLSv1_2]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(names(&file(|t| t.max_version = "TLS11".into()), &mut w).is_err());
        assert!(names(&file(|t| t.min_version = "SSL3".into()), &mut w).is_err());
    }

    #[test]
    fn cipher_suites_and_curves_by_go_name() {
        let mut w = Vec::new();
        let t = file(|t| {
            t.cipher_suites = vec![
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384".into(),
                "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA".into(),
            ];
            t.curve_preferences = vec!["CurveP384".into(), "CurveP521".into()];
        });
        let p = provider(&t, &mut w).unwrap();
        let suites: Vec<_> = p.cipher_suites.iter().map(suite_name).collect();
        assert_eq!(suites[0], "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384");
        assert_eq!(
            suites.iter().filter(|s| !s.starts_with("TLS13")).count(),
            1,
            "{suites:?}"
        );
        assert_eq!(p.kx_groups.len(), 1);
        assert_eq!(w.len(), 2, "{w:?}");
        let bad = file(|t| t.cipher_suites = vec!["TLS_RSA_WITH_RC4_128_SHA".into()]);
        assert!(provider(&bad, &mut w)
            .unwrap_err()
            .contains("unknown cipher"));
        let none = file(|t| t.cipher_suites = vec![GO_ONLY_SUITES[0].into()]);
        assert!(provider(&none, &mut w).is_err());
        let curve = file(|t| t.curve_preferences = vec!["P-256".into()]);
        assert!(provider(&curve, &mut w)
            .unwrap_err()
            .contains("unknown curve"));
    }

    #[test]
    fn client_auth_types() {
        assert_eq!(client_auth(""), Ok(ClientAuth::No));
        assert_eq!(client_auth("RequireClientCert"), Ok(ClientAuth::RequireAny));
        assert!(client_auth("Always").is_err());
        let p = Arc::new(rustls::crypto::ring::default_provider());
        let err = verifier(ClientAuth::RequireAndVerify, None, &p).unwrap_err();
        assert!(err.contains("client_ca_file"), "{err}");
        assert!(verifier(ClientAuth::RequireAny, None, &p).is_ok());
    }
}

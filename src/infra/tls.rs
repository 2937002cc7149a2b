//! TLS for every Postgres connection, driven by the URL as libpq's is:
//! `sslmode` (`disable`, `prefer` by default, `require`, `verify-ca`,
//! `verify-full`), `sslrootcert` (a CA file; `~/.postgresql/root.crt` if it
//! exists and none is named), `sslcert` and `sslkey` (a client certificate).
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` only and no file
//! parameters, so [`PostgresUrl::parse`] takes the TLS parameters out of the
//! URL and hands tokio-postgres the rest. Both kinds of connection use
//! rustls: the queries through `tokio-postgres-rustls` ([`Tls`]), the change
//! feed through pgwire-replication's own rustls ([`PostgresUrl::replication_tls`]),
//! so a certificate that passes for one passes for the other.
//!
//! As in libpq, a root certificate makes `prefer` and `require` verify the
//! server's chain too (as `verify-ca`); `verify-full` also checks that the
//! certificate names the host (its subjectAltName: rustls, unlike libpq,
//! does not fall back to the common name).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`, all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// The TLS parameters of a Postgres URL.
#[derive(Debug, Clone)]
pub struct TlsParams {
    pub mode: SslMode,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Why TLS cannot be set up as the URL asks: a file missing or unreadable,
/// or parameters that do not go together.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

/// A Postgres URL (or key=value string) split into what tokio-postgres reads
/// and the TLS parameters.
#[derive(Debug, Clone)]
pub struct PostgresUrl {
    pub config: tokio_postgres::Config,
    pub tls: TlsParams,
}

impl PostgresUrl {
    /// Parses `url`. Errors are tokio-postgres's (an unknown `sslmode`
    /// value is left for it to name).
    pub fn parse(url: &str) -> Result<PostgresUrl, tokio_postgres::Error> {
        let mut tls = TlsParams {
            mode: SslMode::Prefer,
            root_cert: None,
            cert: None,
            key: None,
        };
        let rest = take_tls_params(url, &mut tls);
        let mut config: tokio_postgres::Config = rest.parse()?;
        // Named in pg_stat_activity unless the URL names it otherwise.
        if config.get_application_name().is_none() {
            config.application_name("promo-fanout");
        }
        config.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(PostgresUrl { config, tls })
    }

    /// The connector for tokio-postgres.
    pub fn connector(&self) -> Tls {
        Tls(self.tls.clone())
    }

    /// The same TLS for the replication connection to `host`, verified as
    /// `server_name` (the URL's host when it connects to a `hostaddr`).
    pub fn replication_tls(
        &self,
        server_name: Option<&str>,
    ) -> Result<pgwire_replication::TlsConfig, TlsSetupError> {
        use pgwire_replication::TlsConfig;
        let t = &self.tls;
        let root = t.root_cert()?;
        let mut config = match (t.mode, root) {
            (SslMode::Disable, _) => return Ok(TlsConfig::disabled()),
            (SslMode::Prefer, None) => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::disabled()
            },
            (SslMode::Require, None) => TlsConfig::require(),
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, root) => {
                TlsConfig::verify_ca(root)
            }
            (SslMode::VerifyFull, root) => TlsConfig::verify_full(root),
        };
        if let Some(name) = server_name {
            config = config.with_sni_hostname(name);
        }
        if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
            config = config.with_client_cert(cert.clone(), key.clone());
        }
        Ok(config)
    }
}

/// Moves `sslmode`, `sslrootcert`, `sslcert` and `sslkey` from `url` into
/// `tls`, returning the rest; `url` itself when none is there.
fn take_tls_params(url: &str, tls: &mut TlsParams) -> String {
    let mut take = |key: &str, value: &str| -> bool {
        match key {
            "sslmode" => match SslMode::parse(value) {
                Some(mode) => tls.mode = mode,
                None => return false,
            },
            "sslrootcert" => tls.root_cert = Some(value.into()),
            "sslcert" => tls.cert = Some(value.into()),
            "sslkey" => tls.key = Some(value.into()),
            _ => return false,
        }
        true
    };
    let Some((scheme, rest)) = url
        .strip_prefix("postgres://")
        .map(|r| ("postgres://", r))
        .or_else(|| {
            url.strip_prefix("postgresql://")
                .map(|r| ("postgresql://", r))
        })
    else {
        // key=value pairs: those kept are copied as they were written.
        let Some(pairs) = key_values(url) else {
            return url.to_owned();
        };
        let kept: Vec<&str> = pairs
            .iter()
            .filter(|(k, v, _)| !take(k, v))
            .map(|(_, _, raw)| *raw)
            .collect();
        return if kept.len() == pairs.len() {
            url.to_owned()
        } else {
            kept.join(" ")
        };
    };
    let (base, Some(query)) = split_query(rest) else {
        return url.to_owned();
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let pairs: Vec<&str> = query.split('&').collect();
    let kept: Vec<&str> = pairs
        .iter()
        .copied()
        .filter(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            !take(&decode(k), &decode(v))
        })
        .collect();
    match kept.len() {
        n if n == pairs.len() => url.to_owned(),
        0 => format!("{scheme}{base}"),
        _ => format!("{scheme}{base}?{}", kept.join("&")),
    }
}

/// A URL's part after the scheme split at its query: the query starts at
/// the first `?` after the user info (a password may hold a `?`).
pub fn split_query(rest: &str) -> (&str, Option<&str>) {
    let from = rest.find('@').map_or(0, |at| at + 1);
    match rest[from..].find('?') {
        Some(q) => (&rest[..from + q], Some(&rest[from + q + 1..])),
        None => (rest, None),
    }
}

/// A libpq key=value string as (key, value unquoted, the pair as written),
/// or `None` if it does not parse (tokio-postgres then says why).
fn key_values(s: &str) -> Option<Vec<(String, String, &str)>> {
    let mut pairs = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Some(pairs);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|(_, c)| *c == '=')?;
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut end = s.len();
        loop {
            match chars.next() {
                None if quoted => return None,
                None => break,
                Some((_, '\\')) => value.push(chars.next()?.1),
                Some((i, '\'')) if quoted => {
                    end = i + 1;
                    break;
                }
                Some((i, c)) if c.is_whitespace() && !quoted => {
                    end = i;
                    break;
                }
                Some((_, c)) => value.push(c),
            }
        }
        pairs.push((key, value, &s[start..end]));
    }
}

impl TlsParams {
    /// The CA file: `sslrootcert`, else libpq's default if it exists.
    fn root_cert(&self) -> Result<Option<PathBuf>, TlsSetupError> {
        let root = self.root_cert.clone().or_else(default_root);
        if root.is_none() && matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(TlsSetupError(format!(
                "sslmode={} needs a CA: add sslrootcert=<file> to postgres-url (or put it in ~/.postgresql/root.crt)",
                if self.mode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" }
            )));
        }
        Ok(root)
    }

    /// The rustls configuration these parameters ask for. Reads the files
    /// named (none for `disable`): a missing or unreadable one is an error
    /// naming it.
    pub fn client_config(&self) -> Result<ClientConfig, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let root = match self.mode {
            SslMode::Disable => None,
            _ => self.root_cert()?,
        };
        let chain = match root {
            Some(path) => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(load_roots(&path)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsSetupError(format!("sslrootcert {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let verifier = Arc::new(Verifier {
            chain,
            hostname: self.mode == SslMode::VerifyFull,
            provider: provider.clone(),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        if self.mode == SslMode::Disable {
            return Ok(builder.with_no_client_auth());
        }
        match (&self.cert, &self.key) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => {
                let certs = read_certs("sslcert", cert)?;
                let key_der =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("sslkey", key, e))?;
                builder
                    .with_client_auth_cert(certs, key_der)
                    .map_err(|e| TlsSetupError(format!("sslcert/sslkey: {e}")))
            }
            _ => Err(TlsSetupError(
                "sslcert and sslkey go together: name both, or neither".into(),
            )),
        }
    }
}

/// libpq's default CA file, `~/.postgresql/root.crt`, if it exists.
fn default_root() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".postgresql/root.crt"))
        .filter(|p| p.exists())
}

fn file_error(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError(format!("{what} {}: {e}", path.display()))
}

/// Every certificate of the PEM file `path` (the URL's parameter `what`).
fn read_certs(
    what: &str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(what, path, e))
}

fn load_roots(path: &std::path::Path) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(read_certs("sslrootcert", path)?);
    if added == 0 {
        return Err(file_error("sslrootcert", path, "no certificate in it"));
    }
    Ok(roots)
}

/// The server certificate check of each mode: none without a CA; the chain
/// with one; the chain and the host name for `verify-full`. The handshake's
/// signatures are always checked.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    hostname: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.hostname => Ok(ServerCertVerified::assertion()),
            outcome => outcome,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// tokio-postgres's TLS connector: rustls configured by the URL's TLS
/// parameters. The files are read at each connection, so a failure names
/// them in the connection's error.
#[derive(Debug, Clone)]
pub struct Tls(TlsParams);

impl<S> MakeTlsConnect<S> for Tls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        // tokio-postgres asks for a connector even where it will not use
        // one (sslmode=disable, a Unix socket, a `hostaddr` without `host`:
        // no name, and no TLS without one).
        let domain = if domain.is_empty() {
            "localhost"
        } else {
            domain
        };
        let mut inner = MakeRustlsConnect::new(self.0.client_config()?);
        MakeTlsConnect::<S>::make_tls_connect(&mut inner, domain).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_a_url() {
        let url = PostgresUrl::parse(
            "postgres://app:pw@db:6432/de?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem\
             &application_name=x&sslcert=/c.pem&sslkey=/c.key",
        )
        .unwrap();
        assert_eq!(url.tls.mode, SslMode::VerifyFull);
        assert_eq!(url.tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(url.tls.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(url.tls.key, Some(PathBuf::from("/c.key")));
        assert_eq!(url.config.get_application_name(), Some("x"));
        assert_eq!(url.config.get_dbname(), Some("de"));
        assert_eq!(
            url.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn key_value_strings_work_too_and_prefer_is_the_default() {
        let url =
            PostgresUrl::parse("host=db user=app sslmode=verify-ca sslrootcert=/ca.pem").unwrap();
        assert_eq!(url.tls.mode, SslMode::VerifyCa);
        assert_eq!(url.tls.root_cert, Some(PathBuf::from("/ca.pem")));
        let plain = PostgresUrl::parse("postgres://app@db/de").unwrap();
        assert_eq!(plain.tls.mode, SslMode::Prefer);
    }

    #[test]
    fn key_value_strings_keep_what_is_not_tls_as_written() {
        let mut tls = TlsParams {
            mode: SslMode::Prefer,
            root_cert: None,
            cert: None,
            key: None,
        };
        let s = "host=db password='a  b\\'c' sslrootcert = '/x y/ca.pem' user=app";
        assert_eq!(
            take_tls_params(s, &mut tls),
            "host=db password='a  b\\'c' user=app"
        );
        assert_eq!(tls.root_cert, Some(PathBuf::from("/x y/ca.pem")));
        let untouched = "host=db   password='a  b'";
        assert_eq!(take_tls_params(untouched, &mut tls), untouched);
    }

    #[test]
    fn a_question_mark_in_the_password_is_not_the_query() {
        let url =
            PostgresUrl::parse("postgres://u:p?x@db/de?sslmode=verify-ca&sslrootcert=/ca.pem")
                .unwrap();
        assert_eq!(url.tls.mode, SslMode::VerifyCa);
        assert_eq!(url.config.get_password(), Some(&b"p?x"[..]));
        assert_eq!(url.config.get_dbname(), Some("de"));
    }

    #[test]
    fn an_unknown_sslmode_is_named_by_tokio_postgres() {
        let e = PostgresUrl::parse("postgres://db/de?sslmode=verify_full").unwrap_err();
        let text = crate::infra::retry::postgres_text(&e);
        assert!(text.contains("sslmode"), "{text}");
    }

    #[test]
    fn verify_full_without_a_ca_or_with_a_missing_file_says_what_to_do() {
        let mut url = PostgresUrl::parse("postgres://db/de?sslmode=verify-full").unwrap();
        if default_root().is_none() {
            let e = url.tls.client_config().unwrap_err().to_string();
            assert!(e.contains("sslrootcert"), "{e}");
        }
        url.tls.root_cert = Some("/nonexistent/ca.pem".into());
        let e = url.tls.client_config().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}

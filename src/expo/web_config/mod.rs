//! The web configuration file (`--web.config.file`): TLS, basic
//! authentication and response headers for the HTTP endpoint, in the format
//! of the Prometheus exporter-toolkit, so the file a user already has for
//! node_exporter works here unchanged.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: tls.crt          # or `cert:` inline; relative to this file
//!   key_file: tls.key           # or `key:` inline
//!   client_auth_type: RequireAndVerifyClientCert
//!   client_ca_file: ca.crt      # or `client_ca:` inline
//!   min_version: TLS12          # TLS12 (default) or TLS13
//!   max_version: TLS13
//!   cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # TLS 1.2 only, as in Go
//!   curve_preferences: [X25519, CurveP256]
//!   prefer_server_cipher_suites: true
//! http_server_config:
//!   http2: true                 # accepted; the endpoint speaks HTTP/1.1
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! basic_auth_users:
//!   prometheus: $2y$10$...      # bcrypt: htpasswd -nBC 10 prometheus
//! rate_limit:
//!   burst: 10
//!   interval: 100ms
//! ```
//!
//! Owns: reading and checking the file strictly (an unknown key is an
//! error, as the toolkit's `UnmarshalStrict` makes it), reading the files
//! it names (relative to its folder), turning it into a
//! [`rustls::ServerConfig`] ([`tls`]), the users and their bcrypt hashes,
//! the headers, the request rate limit, and the fingerprint of every byte it
//! read, by which a changed file is told apart from an unchanged one.
//!
//! Differences from the toolkit, each an error or a warning, never silent:
//! TLS 1.0 and 1.1 do not exist in rustls (a `min_version` below TLS12 is
//! raised to TLS12 with a warning; a `max_version` below TLS12 is an error);
//! the four CBC suites Go knows and rustls does not are skipped with a
//! warning (an error if no TLS 1.2 suite is left); `CurveP521` likewise;
//! `client_allowed_sans` is an error (not supported yet: ignoring it would
//! let in clients the file means to keep out); `http2: true` is accepted and
//! HTTP/1.1 served.
//!
//! Never: serves, logs (warnings are returned to the caller), keeps a
//! password, or runs on a reader thread.

pub mod tls;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// A loaded, checked web configuration.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// TLS, when the file configures it (any of the certificate, key, client
    /// CA or client auth type set, as in the toolkit); `None` is plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Users and their bcrypt hashes; empty means no authentication.
    pub users: Arc<BTreeMap<String, String>>,
    /// `http_server_config.headers`, rendered as `Name: value\r\n` lines.
    pub headers: Arc<[u8]>,
    /// Requests allowed in a burst and the interval of one more, when
    /// `rate_limit.interval` is set.
    pub rate_limit: Option<RateLimit>,
    /// What the file asks for that is served differently (see the module
    /// comment), for the caller to log.
    pub warnings: Vec<String>,
    /// Every file read: the configuration file, then the files it names.
    pub files: Vec<PathBuf>,
    /// SHA-256 of the contents of `files`, in order.
    pub fingerprint: Fingerprint,
}

/// The toolkit's global request rate limit: `burst` requests at once, then
/// one per `interval`; beyond it, 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed at once (at least 1).
    pub burst: u32,
    /// Time that earns one more request.
    pub interval: Duration,
}

/// SHA-256 of the bytes of a configuration and the files it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `files` as they are now; `None` if one cannot be
    /// read (a rotation half done: try again later).
    pub fn of(files: &[PathBuf]) -> Option<Fingerprint> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for f in files {
            let bytes = std::fs::read(f).ok()?;
            ctx.update(&(bytes.len() as u64).to_le_bytes());
            ctx.update(&bytes);
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Some(Fingerprint(out))
    }
}

impl WebConfig {
    /// Whether requests need credentials.
    pub fn needs_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Reads and checks the file at `path` and the files it names. The
    /// error says what is wrong, with the key or file it is about.
    pub fn load(path: &Path) -> Result<WebConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files = vec![path.to_path_buf()];
        let file = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut warnings = Vec::new();
        let tls = match file.tls_server_config {
            Some(t) if t.is_enabled() => {
                Some(tls::server_config(&t, dir, &mut files, &mut warnings)?)
            }
            // Not TLS, but a misspelt name is still an error, as in the
            // toolkit (which checks names as it reads the file).
            Some(t) => {
                tls::check_names(&t, &mut warnings)?;
                None
            }
            None => None,
        };
        for (user, hash) in &file.basic_auth_users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(format!(
                    "basic_auth_users: the hash of user {user:?} is not a bcrypt hash ($2a$, $2b$ or $2y$); \
                     make one with: htpasswd -nBC 10 {user}"
                ));
            }
        }
        let headers = render_headers(&file.http_server_config.headers)?;
        let rate_limit = file.rate_limit.checked()?;
        let fingerprint = Fingerprint::of(&files)
            .ok_or_else(|| "a file changed while it was read; try again".to_string())?;
        Ok(WebConfig {
            tls,
            users: Arc::new(file.basic_auth_users),
            headers: headers.into_bytes().into(),
            rate_limit,
            warnings,
            files,
            fingerprint,
        })
    }
}

/// The file as written. Every struct denies unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct File {
    tls_server_config: Option<tls::TlsFile>,
    http_server_config: HttpFile,
    basic_auth_users: BTreeMap<String, String>,
    rate_limit: RateLimitFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HttpFile {
    /// Accepted for compatibility; HTTP/1.1 is what the endpoint speaks.
    #[allow(dead_code)]
    http2: Option<bool>,
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RateLimitFile {
    burst: u32,
    interval: Option<GoDuration>,
}

/// A Go `time.Duration` in YAML: a string such as `100ms` or `1m30s`, or a
/// number of nanoseconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum GoDuration {
    Nanos(u64),
    Text(String),
}

impl RateLimitFile {
    fn checked(&self) -> Result<Option<RateLimit>, String> {
        let interval = match &self.interval {
            None => return Ok(None),
            Some(GoDuration::Nanos(n)) => Duration::from_nanos(*n),
            Some(GoDuration::Text(t)) => parse_go_duration(t).ok_or_else(|| {
                format!("rate_limit.interval: {t:?} is not a duration (like 100ms, 1s, 1m30s)")
            })?,
        };
        if interval.is_zero() {
            return Ok(None);
        }
        if self.burst == 0 {
            return Err("rate_limit.burst: must be at least 1 when interval is set (0 refuses every request)".into());
        }
        Ok(Some(RateLimit {
            burst: self.burst,
            interval,
        }))
    }
}

/// Parses the file; an empty file (or one of comments only) is the default:
/// no TLS, no users.
fn parse(text: &str) -> Result<File, String> {
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank {
        return Ok(File::default());
    }
    serde_norway::from_str(text).map_err(|e| e.to_string())
}

/// The headers the toolkit lets a file set, and the values it allows
/// (`None`: any value).
const ALLOWED_HEADERS: [(&str, Option<&[&str]>); 5] = [
    ("Strict-Transport-Security", None),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-XSS-Protection", None),
    ("Content-Security-Policy", None),
];

fn render_headers(headers: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    for (name, value) in headers {
        let Some((_, allowed)) = ALLOWED_HEADERS.iter().find(|(n, _)| n == name) else {
            return Err(format!(
                "http_server_config.headers: {name:?} can not be configured (only {})",
                ALLOWED_HEADERS.map(|(n, _)| n).join(", ")
            ));
        };
        if let Some(allowed) = allowed {
            if !allowed.contains(&value.as_str()) {
                return Err(format!(
                    "http_server_config.headers: invalid value for {name}: {value:?} (one of {allowed:?})"
                ));
            }
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!(
                "http_server_config.headers: the value of {name} holds a line break"
            ));
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    Ok(out)
}

/// A Go duration (`time.ParseDuration`): a sequence of decimal numbers, each
/// with a unit (ns, us, µs, ms, s, m, h); "0" alone is zero.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ctm-webcfg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn empty_and_comment_only_files_are_plain_http_without_users() {
        let d = tempdir("empty");
        for text in ["", "# nothing\n\n", "{}\n"] {
            let c = WebConfig::load(&write(&d, "w.yml", text)).unwrap();
            assert!(c.tls.is_none() && !c.needs_auth() && c.headers.is_empty());
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn unknown_keys_bad_hashes_and_headers_are_errors_naming_them() {
        let d = tempdir("bad");
        let cases = [
            ("tls_server_config:\n  cert_fil: x\n", "cert_fil"),
            ("basic_auth_user:\n  a: b\n", "basic_auth_user"),
            ("basic_auth_users:\n  alice: plaintext\n", "alice"),
            ("http_server_config:\n  headers:\n    X-Foo: bar\n", "X-Foo"),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                "X-Frame-Options",
            ),
            ("rate_limit:\n  burst: 0\n  interval: 1s\n", "burst"),
            (
                "rate_limit:\n  burst: 1\n  interval: 1 second\n",
                "interval",
            ),
            (
                "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n",
                "nope.crt",
            ),
            ("tls_server_config:\n  key_file: k\n", "cert"),
            (": : :\n", "w.yml"),
        ];
        for (text, needle) in cases {
            let err = WebConfig::load(&write(&d, "w.yml", text)).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let err = WebConfig::load(&d.join("missing.yml")).unwrap_err();
        assert!(err.contains("missing.yml"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn users_headers_and_rate_limit_are_read() {
        let d = tempdir("users");
        let text = "basic_auth_users:\n  \
             a: $2y$04$OXPOcTr5TGpHvQ4vS4sHDe9U7N5dX2cU8mD.qg1lbtuv3hj8C08f6\n  \
             b: $2b$04$OXPOcTr5TGpHvQ4vS4sHDe9U7N5dX2cU8mD.qg1lbtuv3hj8C08f6\n\
             http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    \
             Strict-Transport-Security: max-age=60\n\
             rate_limit:\n  burst: 3\n  interval: 1m30s\n";
        let c = WebConfig::load(&write(&d, "w.yml", text)).unwrap();
        assert_eq!(c.users.len(), 2);
        assert_eq!(
            &*c.headers,
            b"Strict-Transport-Security: max-age=60\r\nX-Frame-Options: deny\r\n"
        );
        assert_eq!(
            c.rate_limit,
            Some(RateLimit {
                burst: 3,
                interval: Duration::from_secs(90)
            })
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        for bad in ["", "1", "s", "1x", "-1s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_fingerprint_follows_the_contents() {
        let d = tempdir("fp");
        let f = write(&d, "a", "one");
        let files = vec![f.clone()];
        let before = Fingerprint::of(&files).unwrap();
        assert_eq!(Fingerprint::of(&files), Some(before));
        std::fs::write(&f, "two").unwrap();
        assert_ne!(Fingerprint::of(&files), Some(before));
        std::fs::remove_file(&f).unwrap();
        assert_eq!(Fingerprint::of(&files), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}

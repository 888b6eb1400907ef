//! Line writers of the Prometheus text format 0.0.4 and OpenMetrics 1.0, and
//! Go's float formatting.
//!
//! Owns: escaping, number formatting and the layout of HELP, TYPE and sample
//! lines. Never: decides what is rendered (that is [`super::scrape`]).
//!
//! Numbers are written the way the original Go exporter writes them
//! (`strconv.FormatFloat(v, 'g', -1, 64)`): bucket bounds are label values,
//! and during a rolling migration series from both exporters only merge in
//! `sum by (le)` when the `le` strings are identical.

use std::io::Write;

/// Writes `v` exactly as Go's `strconv.FormatFloat(v, 'g', -1, 64)`:
/// the shortest digits that read back as `v`, in `%e` form (`1e-05`,
/// `1.5e+07`, exponent at least two digits) when the decimal exponent is
/// below -4 or at least 6 (Go's rule for the shortest form), else in `%f`
/// form (`0.0001`, `119.99`, `100000`). NaN is `NaN`, infinities `+Inf` and
/// `-Inf`, as in the exposition formats.
pub fn write_go_float(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if v.is_infinite() {
        out.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" });
        return;
    }
    if v == 0.0 {
        out.extend_from_slice(if v.is_sign_negative() { b"-0" } else { b"0" });
        return;
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "d.ddde[-]x".
    let mut buf = [0u8; 40];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 40 bytes hold any f64 in `{:e}` (at most 17 digits, sign, point, exponent).
    let _ = write!(cursor, "{:e}", v.abs());
    let len = cursor.position() as usize;
    let text = &buf[..len];
    let e_at = text.iter().position(|&c| c == b'e').unwrap_or(len);
    let digits: [u8; 24] = {
        let mut d = [0u8; 24];
        let mut n = 0;
        for &c in &text[..e_at] {
            if c.is_ascii_digit() && n < d.len() {
                d[n] = c;
                n += 1;
            }
        }
        d
    };
    let nd = digits.iter().position(|&c| c == 0).unwrap_or(digits.len());
    let digits = &digits[..nd];
    let exp: i32 = std::str::from_utf8(&text[(e_at + 1).min(len)..])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if v < 0.0 {
        out.push(b'-');
    }
    if !(-4..6).contains(&exp) {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push(b'0');
        }
        let _ = write!(out, "{e}");
    } else if exp < 0 {
        out.extend_from_slice(b"0.");
        for _ in 0..(-exp - 1) {
            out.push(b'0');
        }
        out.extend_from_slice(digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.extend_from_slice(digits);
            out.resize(out.len() + int_len - digits.len(), b'0');
        } else {
            out.extend_from_slice(&digits[..int_len]);
            out.push(b'.');
            out.extend_from_slice(&digits[int_len..]);
        }
    }
}

/// A sample value: counts are written as integers, everything else as Go
/// floats.
#[derive(Clone, Copy, Debug)]
pub enum Value {
    /// An exact count.
    Count(u64),
    /// A measured quantity (seconds, a quantile, a sum in base units).
    Float(f64),
}

/// `text` with `\\` and newline escaped, and `"` too when `quote` (label
/// values; HELP text leaves quotes as they are).
fn write_escaped(out: &mut Vec<u8>, text: &str, quote: bool) {
    for c in text.bytes() {
        match c {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'"' if quote => out.extend_from_slice(b"\\\""),
            c => out.push(c),
        }
    }
}

/// `# HELP name text` with the text escaped (`\\` and newline).
pub fn write_help(out: &mut Vec<u8>, name: &str, help: &str) {
    out.extend_from_slice(b"# HELP ");
    out.extend_from_slice(name.as_bytes());
    out.push(b' ');
    write_escaped(out, help, false);
    out.push(b'\n');
}

/// `# TYPE name kind`.
pub fn write_type(out: &mut Vec<u8>, name: &str, kind: &str) {
    out.extend_from_slice(b"# TYPE ");
    out.extend_from_slice(name.as_bytes());
    out.push(b' ');
    out.extend_from_slice(kind.as_bytes());
    out.push(b'\n');
}

/// HELP and TYPE of a counter whose samples are `{base}_total`: the
/// Prometheus text names the family `{base}_total`, OpenMetrics `{base}`.
pub fn write_counter_meta(out: &mut Vec<u8>, openmetrics: bool, base: &str, help: &str) {
    let family = if openmetrics {
        std::borrow::Cow::Borrowed(base)
    } else {
        std::borrow::Cow::Owned(format!("{base}_total"))
    };
    write_help(out, &family, help);
    write_type(out, &family, "counter");
}

/// `name{k="v",...} value`: labels in the order given, values escaped
/// (`\\`, `"`, newline).
pub fn write_sample(
    out: &mut Vec<u8>,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    value: Value,
) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    if !labels.is_empty() {
        out.push(b'{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"=\"");
            write_escaped(out, v, true);
            out.push(b'"');
        }
        out.push(b'}');
    }
    out.push(b' ');
    match value {
        Value::Count(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Float(f) => write_go_float(out, f),
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(v: f64) -> String {
        let mut out = Vec::new();
        write_go_float(&mut out, v);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn floats_as_go_writes_them() {
        // Bucket bounds of the original families, and values from its scrape.
        let cases: &[(f64, &str)] = &[
            (0.0, "0"),
            (1e-5, "1e-05"),
            (5e-5, "5e-05"),
            (1e-4, "0.0001"),
            (2.5e-4, "0.00025"),
            (7.5e-4, "0.00075"),
            (0.001, "0.001"),
            (0.0075, "0.0075"),
            (1.0, "1"),
            (2.5, "2.5"),
            (119.99, "119.99"),
            (120.015, "120.015"),
            (100.0, "100"),
            (100000.0, "100000"),
            (500000.0, "500000"),
            (1e7, "1e+07"),
            (1e8, "1e+08"),
            (1.6906184713487864e9, "1.6906184713487864e+09"),
            (22619.074546517317, "22619.074546517317"),
            (5.326715607380564e6, "5.326715607380564e+06"),
            (123456.5, "123456.5"),
            (1e21, "1e+21"),
            (1.5e-300, "1.5e-300"),
            (-2.5, "-2.5"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
        ];
        for &(v, want) in cases {
            assert_eq!(go(v), want, "{v:e}");
        }
    }

    #[test]
    fn go_floats_read_back_exactly() {
        let mut x = 1.234_567_890_123e-12_f64;
        while x < 1e20 {
            let s = go(x);
            assert_eq!(s.parse::<f64>().unwrap(), x, "{s}");
            x *= 3.7;
        }
    }

    #[test]
    fn samples_escape_label_values_and_help() {
        let mut out = Vec::new();
        write_help(&mut out, "m", "a \\ b\nc");
        write_type(&mut out, "m", "counter");
        write_sample(
            &mut out,
            "m",
            "_total",
            &[("node", "n\"1\\\n")],
            Value::Count(7),
        );
        write_sample(&mut out, "m", "", &[], Value::Float(0.5));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "# HELP m a \\\\ b\\nc\n# TYPE m counter\nm_total{node=\"n\\\"1\\\\\\n\"} 7\nm 0.5\n"
        );
    }
}

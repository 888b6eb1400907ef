//! The Go exporter's spelling of our flags (`-svc-subnet=10.96.0.0/16`,
//! `-svc-subnet 10.96.0.0/16`, `-print-events=false`), so its DaemonSet
//! arguments work unchanged.
//!
//! Owns: rewriting a single-dash long flag of ours to clap's `--` form before
//! clap sees the words, and the message for an unknown single-dash word
//! (clap would name only its first letter).
//! Never: rewrites a value, a word after `--` or the program name, and never
//! judges a flag or a value: clap does, after the rewrite.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use std::collections::HashMap;
use std::ffi::OsString;

/// Rewrites the Go `flag` package's spelling of OUR long flags to clap's:
/// `-name=value` -> `--name=value` and `-name` -> `--name`, for `name` one of
/// our long flags (`help` and `version` included).
///
/// - Boolean flags need nothing more: they take an optional `=value` (Go's
///   `-print-events=false` becomes `--print-events=false`, an explicit false
///   that beats the environment variable, as any command-line value does).
/// - Values are never rewritten: the word after a value-taking flag given
///   without `=` (`-node-name -x`) is passed on as it is, and so is every
///   word after `--`.
/// - A single-dash word that is not one of our long flags (`-h`, `-V`,
///   `-no-such-flag`) is left for clap to judge.
pub fn go_spelling(cmd: &clap::Command, args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    // Long name -> whether a value follows as the next word when not given
    // with `=`.
    let longs: HashMap<&str, bool> = cmd
        .get_arguments()
        .filter_map(|a| {
            let value_next = a.get_action().takes_values() && !a.is_require_equals_set();
            Some((a.get_long()?, value_next))
        })
        .chain([("help", false), ("version", false)])
        .collect();

    let mut args = args.into_iter();
    let mut out: Vec<OsString> = args.next().into_iter().collect(); // program name
    let mut value_next = false;
    let mut rest_verbatim = false;
    for arg in args {
        if rest_verbatim || value_next {
            value_next = false;
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest_verbatim = true;
            out.push(arg);
            continue;
        }
        let (dashes, body) = match s.strip_prefix("--") {
            Some(b) => (2, b),
            None => match s.strip_prefix('-') {
                Some(b) if !b.is_empty() => (1, b),
                _ => {
                    out.push(arg);
                    continue;
                }
            },
        };
        let (name, has_value) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        match longs.get(name) {
            Some(&takes_next) => {
                value_next = takes_next && !has_value;
                if dashes == 1 {
                    out.push(format!("--{body}").into());
                } else {
                    out.push(arg);
                }
            }
            None => out.push(arg),
        }
    }
    out
}

/// clap reads an unknown single-dash word (`-no-such-flag`) as a cluster of
/// short flags and reports only its first letter (`'-n'`); name the whole
/// word instead.
pub(super) fn name_unknown_single_dash(
    err: clap::Error,
    args: &[OsString],
    cmd: &mut clap::Command,
) -> clap::Error {
    if err.kind() != ErrorKind::UnknownArgument {
        return err;
    }
    let Some(ContextValue::String(invalid)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    if invalid.len() != 2 || invalid.starts_with("--") {
        return err;
    }
    let word = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| a.len() > 2 && !a.starts_with("--") && a.starts_with(invalid.as_str()));
    match word {
        Some(word) => cmd.error(
            ErrorKind::UnknownArgument,
            format!("unexpected argument '{word}' found (not a flag of this program)"),
        ),
        None => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{defaults_config, parse, subnets};
    use crate::config::Config;

    #[test]
    fn the_go_exporters_daemonset_arguments_work_unchanged() {
        let c = parse(&[
            "-svc-subnet=10.96.0.0/16",
            "-exclude-subnet=10.96.0.0/24",
            "-node-name=worker-1",
            "-summary-timeout=5",
            "-metrics-bind-address=0.0.0.0:9000",
            "-print-events",
        ])
        .unwrap();
        assert_eq!(
            c,
            Config {
                exclude_subnets: subnets(&["10.96.0.0/24"]),
                node_name: "worker-1".into(),
                summary_timeout: 5,
                print_events: true,
                ..defaults_config()
            }
        );
    }

    #[test]
    fn go_spelling_with_separate_values() {
        let c = parse(&[
            "-svc-subnet",
            "10.0.0.0/8",
            "-exclude-subnet",
            "10.0.0.0/24",
            "-node-name",
            "n2",
            "-summary-timeout",
            "7",
            "-metrics-bind-address",
            "127.0.0.1:9001",
            "-max-flows",
            "4096",
            "-no-sysctl",
        ])
        .unwrap();
        assert_eq!(
            c,
            Config {
                svc_subnets: subnets(&["10.0.0.0/8"]),
                exclude_subnets: subnets(&["10.0.0.0/24"]),
                node_name: "n2".into(),
                summary_timeout: 7,
                metrics_bind_address: "127.0.0.1:9001".parse().unwrap(),
                max_flows: 4096,
                no_sysctl: true,
                ..defaults_config()
            }
        );
    }

    #[test]
    fn go_bool_values() {
        for (arg, want) in [
            ("-print-events=true", true),
            ("-print-events=false", false),
            ("-print-events=1", true),
            ("-print-events=0", false),
            ("-print-events=T", true),
            ("-print-events=F", false),
            ("-print-events=True", true),
            ("-print-events=FALSE", false),
            ("--print-events=true", true),
            ("--print-events=false", false),
            ("-print-events", true),
        ] {
            assert_eq!(parse(&[arg]).unwrap().print_events, want, "{arg}");
        }
        let c = parse(&["-print-events=false", "-no-sysctl=true", "-legacy-names=0"]).unwrap();
        assert_eq!(
            (c.print_events, c.no_sysctl, c.legacy_names),
            (false, true, false)
        );
        let err = parse(&["-print-events=maybe"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--print-events"), "{err}");
    }

    #[test]
    fn go_spelling_pre_pass_leaves_values_unknown_names_and_shorts_alone() {
        let cmd = Config::command();
        let rewrite = |args: &[&str]| -> Vec<String> {
            go_spelling(&cmd, args.iter().map(OsString::from))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect()
        };
        assert_eq!(
            rewrite(&[
                "prog",
                "-node-name",
                "-print-events",
                "-svc-subnet=1.0.0.0/8"
            ]),
            [
                "prog",
                "--node-name",
                "-print-events",
                "--svc-subnet=1.0.0.0/8"
            ]
        );
        assert_eq!(
            rewrite(&["prog", "--node-name", "-max-flows", "-max-flows", "2048"]),
            ["prog", "--node-name", "-max-flows", "--max-flows", "2048"]
        );
        assert_eq!(
            rewrite(&[
                "prog",
                "-no-such-flag=1",
                "-h",
                "-V",
                "-",
                "-help",
                "-version"
            ]),
            [
                "prog",
                "-no-such-flag=1",
                "-h",
                "-V",
                "-",
                "--help",
                "--version"
            ]
        );
        assert_eq!(
            rewrite(&["prog", "--", "-print-events", "-node-name=x"]),
            ["prog", "--", "-print-events", "-node-name=x"]
        );
        // The program name is never touched, even if it looks like a flag.
        assert_eq!(rewrite(&["-print-events"]), ["-print-events"]);
        // A value that looks like a Go flag stays a value (clap then sees it
        // as the node name, since it follows `=`).
        assert_eq!(
            parse(&["-node-name=-print-events"]).unwrap().node_name,
            "-print-events"
        );
        // An unknown single-dash name reaches clap, which rejects it; the
        // message names the whole word, not just its first letter.
        for (args, word) in [
            (&["-no-such-flag=1"][..], "'-no-such-flag=1'"),
            (&["-print-events", "-nope"], "'-nope'"),
            (&["-x"], "'-x'"),
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert_eq!(err.kind(), ErrorKind::UnknownArgument);
            assert!(err.to_string().contains(word), "{args:?}: {err}");
        }
    }
}

//! The flags' environment variables: `CONNTRACK_METRICS_<FLAG>`, one per
//! flag; the command line wins.
//!
//! Owns: the variables' prefix, and the message for a bad value that came
//! from a variable rather than the command line (it names the variable).
//! Never: reads a value for a flag (clap does, from the `env` each flag
//! declares) or sets a variable.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use std::error::Error as _;
use std::ffi::OsString;

/// The prefix of every flag's environment variable.
pub const ENV_PREFIX: &str = "CONNTRACK_METRICS_";

/// A bad value that came from an environment variable, not the command
/// line: say so, or the user hunts for a flag they never typed.
pub(super) fn name_env_source(
    err: clap::Error,
    args: &[OsString],
    cmd: &mut clap::Command,
) -> clap::Error {
    if err.kind() != ErrorKind::ValueValidation {
        return err;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        err.get(ContextKind::InvalidArg),
        err.get(ContextKind::InvalidValue),
    ) else {
        return err;
    };
    // `arg` is rendered as `--max-flows <N>` or `--print-events[=<BOOL>]`.
    let long = arg
        .strip_prefix("--")
        .and_then(|a| a.split([' ', '[', '=']).next())
        .unwrap_or_default();
    let Some(env) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .and_then(|e| e.to_str())
    else {
        return err;
    };
    let flag = format!("--{long}");
    let on_command_line = args.iter().skip(1).filter_map(|a| a.to_str()).any(|a| {
        a.strip_prefix(flag.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    });
    if on_command_line || std::env::var_os(env).is_none() {
        return err;
    }
    let why = err.source().map(|s| format!(": {s}")).unwrap_or_default();
    let (arg, value) = (arg.clone(), value.clone());
    cmd.error(
        ErrorKind::ValueValidation,
        format!("invalid value '{value}' for '{arg}' from environment variable {env}{why}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{defaults_config, env_lock, subnets};
    use crate::config::Config;

    #[test]
    fn every_flag_has_its_variable_named_after_it() {
        let cmd = Config::command();
        let mut flags = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            if matches!(long, "help" | "version") {
                continue;
            }
            let want = format!(
                "{ENV_PREFIX}{}",
                long.to_uppercase().replace(['-', '.'], "_")
            );
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long}"
            );
            flags += 1;
        }
        assert!(flags > 0);
    }

    #[test]
    fn environment_variables_and_the_command_line_beats_them() {
        let _g = env_lock();
        let vars = [
            ("CONNTRACK_METRICS_SVC_SUBNET", "10.0.0.0/8,fd00::/64"),
            ("CONNTRACK_METRICS_EXCLUDE_SUBNET", "10.0.0.0/24"),
            ("CONNTRACK_METRICS_PRINT_EVENTS", "1"),
            ("CONNTRACK_METRICS_RCVBUF_BYTES", "8192"),
            ("CONNTRACK_METRICS_RECV_BATCH", "16"),
            ("CONNTRACK_METRICS_MAX_FLOWS", "2048"),
            ("CONNTRACK_METRICS_METRICS_BIND_ADDRESS", "127.0.0.1:9999"),
            ("CONNTRACK_METRICS_NODE_NAME", "from-env"),
            ("CONNTRACK_METRICS_SUMMARY_TIMEOUT", "3"),
            ("CONNTRACK_METRICS_STATS_SHARDS", "4"),
            ("CONNTRACK_METRICS_NO_SYSCTL", "true"),
            ("CONNTRACK_METRICS_LEGACY_NAMES", "0"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let from_env = Config::from_args(["x"]);
        let cmd_line_wins = Config::from_args([
            "x",
            "-svc-subnet=10.96.0.0/16",
            "--node-name",
            "from-flag",
            "-summary-timeout=5",
            "--legacy-names",
            "-print-events=false", // explicit false beats the variable's 1
        ]);
        std::env::set_var("CONNTRACK_METRICS_PRINT_EVENTS", "false");
        std::env::set_var("CONNTRACK_METRICS_NO_SYSCTL", "no");
        let false_bools = Config::from_args(["x"]);
        std::env::set_var("CONNTRACK_METRICS_MAX_FLOWS", "12");
        let bad = Config::from_args(["x"]);
        let bad_but_overridden = Config::from_args(["x", "-max-flows=4096"]);
        let bad_on_cmd_line = Config::from_args(["x", "-max-flows", "13"]);
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let cpu_env = {
            std::env::set_var("CONNTRACK_METRICS_READER_CPU", "100000");
            let r = Config::from_args(["x"]);
            std::env::remove_var("CONNTRACK_METRICS_READER_CPU");
            r
        };

        let env_config = Config {
            svc_subnets: subnets(&["10.0.0.0/8", "fd00::/64"]),
            exclude_subnets: subnets(&["10.0.0.0/24"]),
            print_events: true,
            rcvbuf_bytes: 8192,
            recv_batch: 16,
            max_flows: 2048,
            metrics_bind_address: "127.0.0.1:9999".parse().unwrap(),
            node_name: "from-env".into(),
            summary_timeout: 3,
            stats_shards: 4,
            no_sysctl: true,
            // What no variable set: the defaults.
            ..defaults_config()
        };
        assert_eq!(from_env.unwrap(), env_config);
        assert_eq!(
            cmd_line_wins.unwrap(),
            Config {
                svc_subnets: subnets(&["10.96.0.0/16"]),
                node_name: "from-flag".into(),
                summary_timeout: 5,
                legacy_names: true,
                print_events: false,
                ..env_config.clone()
            }
        );
        let c = false_bools.unwrap();
        assert_eq!((c.print_events, c.no_sysctl), (false, false));
        let err = bad.unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("'12' for '--max-flows <N>' from environment variable CONNTRACK_METRICS_MAX_FLOWS: 12 is not in 1024..=16777216"),
            "{msg}"
        );
        assert!(bad_but_overridden.is_ok(), "{bad_but_overridden:?}");
        let msg = bad_on_cmd_line.unwrap_err().to_string();
        assert!(
            msg.contains("'13' for '--max-flows <N>'") && !msg.contains("environment"),
            "{msg}"
        );
        let msg = cpu_env.unwrap_err().to_string();
        assert!(
            msg.contains("--reader-cpu") && msg.contains("CONNTRACK_METRICS_READER_CPU"),
            "{msg}"
        );
    }
}

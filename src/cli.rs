//! Command line compatible with virtproxyd(8).

use std::ffi::OsString;
use std::path::PathBuf;

/// Parsed command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cli {
    pub daemon: bool,
    pub config: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    /// Exit after this many seconds with no client connected (0 = never).
    pub timeout: u32,
    pub verbose: bool,
    /// `--handover-check` (not in the usage text: a restart's internal question).
    pub handover_check: bool,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Cli),
    Help,
    Version,
    /// `--handover-check`: whether this binary can take over a running one's connections
    /// (asked by that one before a restart; prints the hand-over format it reads).
    HandoverCheck(Cli),
}

/// libvirt's usage text shape, with our binary's name.
pub fn usage(argv0: &str) -> String {
    format!(
        "\n\
Usage:\n  {argv0} [options]\n\n\
Options:\n\
  -h | --help            Display program help\n\
  -v | --verbose         Verbose messages\n\
  -d | --daemon          Run as a daemon & write PID file\n\
  -t | --timeout <secs>  Exit after timeout period\n\
  -f | --config <file>   Configuration file\n\
  -V | --version         Display version information\n\
  -p | --pid-file <file> Change name of PID file\n\n\
libvirt management daemon proxy:\n\n\
  Default paths:\n\n\
    Configuration file (unless overridden by -f):\n\
      /etc/libvirt/virtproxyd.conf (root) or $XDG_CONFIG_HOME/libvirt/virtproxyd.conf\n\n\
    Sockets:\n\
      /run/libvirt/libvirt-sock, /run/libvirt/libvirt-sock-ro (root)\n\
      $XDG_RUNTIME_DIR/libvirt/libvirt-sock (non-root)\n\n\
    PID file (unless overridden by -p):\n\
      /run/virtproxyd.pid (root) or $XDG_RUNTIME_DIR/libvirt/virtproxyd.pid\n\n"
    )
}

/// Parses arguments (without argv0).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut cli = Cli::default();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("handover-check") => cli.handover_check = true,
            Short('d') | Long("daemon") => cli.daemon = true,
            Short('v') | Long("verbose") => cli.verbose = true,
            Short('f') | Long("config") => {
                cli.config = Some(p.value().map_err(|e| e.to_string())?.into())
            }
            Short('p') | Long("pid-file") => {
                cli.pid_file = Some(p.value().map_err(|e| e.to_string())?.into())
            }
            Short('t') | Long("timeout") => {
                let v = p.value().map_err(|e| e.to_string())?;
                let s = v.to_string_lossy();
                // libvirt bounds the timeout to INT_MAX/1000 seconds.
                cli.timeout = s
                    .parse::<u32>()
                    .ok()
                    .filter(|t| *t <= i32::MAX as u32 / 1000)
                    .ok_or_else(|| format!("Invalid value for timeout: '{s}'"))?;
            }
            Value(v) => return Err(format!("unexpected argument '{}'", v.to_string_lossy())),
            other => return Err(other.unexpected().to_string()),
        }
    }
    if cli.handover_check {
        return Ok(Command::HandoverCheck(cli));
    }
    Ok(Command::Run(cli))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn accepts_virtproxyd_flags_in_both_spellings() {
        let Command::Run(c) =
            run(&["-d", "-f", "/x.conf", "--pid-file=/p", "-t", "120", "-v"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            c,
            Cli {
                daemon: true,
                config: Some("/x.conf".into()),
                pid_file: Some("/p".into()),
                timeout: 120,
                verbose: true,
                handover_check: false,
            }
        );
        assert_eq!(
            run(&["--timeout=5"]).unwrap(),
            Command::Run(Cli {
                timeout: 5,
                ..Cli::default()
            })
        );
        assert_eq!(run(&["-h"]).unwrap(), Command::Help);
        assert_eq!(run(&["--version"]).unwrap(), Command::Version);
    }

    #[test]
    fn man_page_describes_every_option() {
        let man = include_str!("../doc/virtproxyd.8").replace("\\-", "-");
        let usage = usage("virtproxyd");
        // The option lines of the usage text: "  -h | --help   Display program help".
        let options = usage
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .flat_map(|l| l.split_whitespace().filter(|w| w.starts_with('-')))
            .chain(["--handover-check"]);
        for opt in options {
            assert!(man.contains(opt), "{opt} missing from doc/virtproxyd.8");
        }
    }

    #[test]
    fn rejects_bad_options_and_stray_arguments() {
        assert!(run(&["--listen"]).is_err());
        assert!(run(&["stray"]).is_err());
        assert!(run(&["-t", "abc"]).is_err());
        assert!(run(&["-t", "99999999"]).is_err());
    }
}

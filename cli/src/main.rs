//! `thaw`: the operator's command line for a thaw host. `thaw templates`
//! manages the template store the shim restores sandboxes from; `thaw
//! doctor` checks that the host can run thaw. Both read thaw's config
//! (`/etc/thaw/config.toml`, `$THAW_CONFIG` or `--config`), the file the
//! shim runs on.
//!
//! Exit status: 0 done; 1 a command failed (or `doctor` found a FAIL);
//! 64 a bad command line.

mod doctor;
mod error;
mod templates;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use thaw_config::Config;
use thaw_snapshots::template::TemplateKey;

use crate::error::Error;

/// The exit status of a bad command line (sysexits' EX_USAGE), as thaw-vmm.
const EXIT_USAGE: u8 = 64;

/// Manage a thaw host: its VM templates, and a check of the install.
#[derive(Debug, Parser)]
#[command(name = "thaw", version)]
struct Cli {
    /// thaw's config file [default: $THAW_CONFIG, else /etc/thaw/config.toml].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// VM templates: booted, snapshotted VMs that sandboxes start from.
    #[command(subcommand)]
    Templates(TemplatesCommand),
    /// Check this host: KVM, containerd, thaw's kernel, root image and VMM,
    /// CNI plugins, mkfs.erofs. Exits 1 if any check FAILs.
    Doctor {
        /// containerd's config file.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/etc/containerd/config.toml"
        )]
        containerd_config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TemplatesCommand {
    /// One line per template in the configured store (vm.template_store).
    List,
    /// Build the template for the configured VM shape ahead of the first
    /// start (runs thaw-vmm template build as the shim would).
    Build(templates::Shape),
    /// Remove one template.
    Rm {
        #[arg(value_name = "KEY", value_parser = parse_key)]
        key: TemplateKey,
    },
    /// Remove templates whose kernel, root image or thaw version changed
    /// since they were built, then the least recently used unused ones
    /// past vm.template_store_max_mib.
    Gc,
}

fn parse_key(value: &str) -> Result<TemplateKey, String> {
    TemplateKey::parse(value).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Nothing useful is left to do if the terminal is gone.
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    let loaded = Config::load(cli.config.as_deref());
    let result = match cli.command {
        Command::Doctor { containerd_config } => {
            let host = doctor::Host::this(containerd_config);
            let checks = doctor::run(&host, &loaded);
            for c in &checks {
                println!("{c}");
            }
            let count = |s| checks.iter().filter(|c| c.status == s).count();
            let (fails, warns) = (count(doctor::Status::Fail), count(doctor::Status::Warn));
            println!(
                "{fails} failed, {warns} warnings, {} ok",
                checks.len() - fails - warns
            );
            return if fails > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
        Command::Templates(t) => templates(t, loaded),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thaw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn templates(cmd: TemplatesCommand, loaded: doctor::LoadedConfig) -> Result<(), Error> {
    let (config, path) = loaded?;
    match cmd {
        TemplatesCommand::List => templates::list(&config),
        TemplatesCommand::Build(shape) => templates::build(&config, &path, &shape),
        TemplatesCommand::Rm { key } => templates::remove(&config, &key),
        TemplatesCommand::Gc => templates::gc(&config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_each_command() {
        let p = |s: &str| Cli::try_parse_from(s.split_whitespace());
        let c = p("thaw --config /c templates build --vcpus 2").unwrap();
        assert_eq!(c.config, Some(PathBuf::from("/c")));
        match c.command {
            Command::Templates(TemplatesCommand::Build(s)) => {
                assert_eq!((s.vcpus, s.memory_mib), (Some(2), None))
            }
            other => panic!("{other:?}"),
        }
        // --config is global: it may follow the subcommand.
        let c = p("thaw doctor --config /c").unwrap();
        assert_eq!(c.config, Some(PathBuf::from("/c")));
        assert!(matches!(
            c.command,
            Command::Doctor { containerd_config } if containerd_config == Path::new("/etc/containerd/config.toml")
        ));
        let e = p("thaw templates rm nope").unwrap_err();
        assert!(e.to_string().contains("not a template key"), "{e}");
        assert_eq!(
            p("thaw templates").unwrap_err().kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
    }
}

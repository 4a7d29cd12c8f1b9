//! The flag and environment reference (`docs/reference.md`), generated from the same clap
//! definitions `--help` prints, so the two cannot drift: a test compares the file with what
//! [`markdown`] renders now, and `MESHLET_BLESS=1 cargo test -p meshlet reference` rewrites it.

use std::fmt::Write as _;

use clap::{Arg, Command, CommandFactory as _};

use super::Cli;

/// The reference: one section per command, one table row per flag.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Flag and environment reference\n\n\
         Generated from the command line definitions (`meshlet <command> --help` prints the \
         same); do not edit by hand: `MESHLET_BLESS=1 cargo test -p meshlet reference` \
         rewrites it. Every flag with an environment variable can be set either way; the flag \
         wins. List-valued variables take comma-separated values.\n",
    );
    let cli = Cli::command();
    for command in commands(&cli, "meshlet") {
        section(&mut out, &command.0, command.1);
    }
    out
}

/// Every command with arguments, depth first, with its full name.
fn commands<'a>(command: &'a Command, name: &str) -> Vec<(String, &'a Command)> {
    let mut found = Vec::new();
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let full = format!("{name} {}", sub.get_name());
        if sub.get_arguments().any(visible) {
            found.push((full.clone(), sub));
        }
        found.extend(commands(sub, &full));
    }
    found
}

fn visible(arg: &Arg) -> bool {
    !arg.is_hide_set()
        && arg.get_long().is_some()
        && !matches!(arg.get_id().as_str(), "help" | "version")
}

fn section(out: &mut String, name: &str, command: &Command) {
    let about = command
        .get_about()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = write!(out, "\n## `{name}`\n\n{about}\n\n");
    out.push_str("| flag | environment | default | meaning |\n|---|---|---|---|\n");
    for arg in command.get_arguments().filter(|a| visible(a)) {
        let long = arg.get_long().expect("visible args are long");
        let short = arg
            .get_short()
            .map(|c| format!("-{c}, "))
            .unwrap_or_default();
        // As --help names the value: its value name, or the id in capitals.
        let value = match arg.get_action().takes_values() {
            true => {
                let name = arg
                    .get_value_names()
                    .and_then(|names| names.first())
                    .map(|name| name.to_string())
                    .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
                format!(" <{name}>")
            }
            false => String::new(),
        };
        let choices: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        let env = arg
            .get_env()
            .map(|env| format!("`{}`", env.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = match defaults.is_empty() {
            true => String::new(),
            false => format!("`{}`", defaults.join(",")),
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string().replace('\n', " ").replace('|', "\\|"))
            .unwrap_or_default();
        let help = match choices.is_empty() {
            true => help,
            false => format!("{help} (one of {})", choices.join(", ")),
        };
        let _ = writeln!(
            out,
            "| `{short}--{long}{value}` | {env} | {default} | {help} |"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reference.md");

    #[test]
    fn the_reference_in_docs_is_what_the_flags_say() {
        let now = markdown();
        if std::env::var_os("MESHLET_BLESS").is_some() {
            std::fs::write(PATH, &now).unwrap();
        }
        let written = std::fs::read_to_string(PATH).unwrap_or_default();
        assert!(
            written == now,
            "docs/reference.md is out of date with the flags: regenerate it with \
             `MESHLET_BLESS=1 cargo test -p meshlet reference`"
        );
    }

    #[test]
    fn every_flag_in_help_is_in_the_reference() {
        let reference = markdown();
        let mut cli = Cli::command();
        cli.build();
        for (name, command) in commands(&cli, "meshlet") {
            let help = command.clone().render_long_help().to_string();
            for line in help.lines().map(str::trim_start) {
                let Some(flag) = line.strip_prefix("--").or_else(|| {
                    line.strip_prefix('-')
                        .and_then(|l| l.split_once(", --").map(|(_, long)| long))
                }) else {
                    continue;
                };
                let flag = flag.split([' ', '=']).next().unwrap_or_default();
                if matches!(flag, "help" | "version") {
                    continue;
                }
                assert!(
                    reference.contains(&format!("--{flag}")),
                    "{name} --help lists --{flag}, the reference does not"
                );
            }
            for arg in command.get_arguments().filter(|a| visible(a)) {
                if let Some(env) = arg.get_env() {
                    assert!(
                        help.contains(&format!("[env: {}", env.to_string_lossy())),
                        "{name}: {} not in --help",
                        env.to_string_lossy()
                    );
                }
            }
        }
    }
}

//! `--help` and the README's table of settings, both made from the one
//! declaration of each setting: its flag's doc comment in [`SettingsArgs`]
//! and its value in [`Settings::default`].

use std::collections::BTreeMap;

use clap::{Arg, Args, Command};

use super::{Settings, SettingsArgs};

/// Defaults that are not one fixed value.
const DERIVED_DEFAULTS: &[(&str, &str)] = &[
    ("instance-id", "the host name"),
    ("cdc-slot", "promo_fanout_<group-id>_<instance-id>"),
];

/// The flag that names the settings file rather than being a setting.
const CONFIG_FLAG: &str = "config";

/// Each setting's default as shown, by flag name.
fn defaults() -> BTreeMap<String, String> {
    let value = serde_json::to_value(Settings::default()).expect("the defaults serialize");
    let mut shown: BTreeMap<String, String> = value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                // `kafka`: no property by default.
                _ => return None,
            };
            Some((name.clone(), text))
        })
        .collect();
    for (name, text) in DERIVED_DEFAULTS {
        shown.insert((*name).into(), (*text).into());
    }
    shown
}

/// `cmd` with each setting's help as plain text and its default added: what
/// `--help` shows for every command (the settings' flags are global).
pub fn with_defaults(cmd: Command) -> Command {
    let defaults = defaults();
    cmd.mut_args(|arg| {
        let Some(help) = arg.get_help().map(ToString::to_string) else {
            return arg;
        };
        let help = help.replace('`', "");
        match arg.get_long().and_then(|long| defaults.get(long)) {
            Some(default) => arg.help(format!("{help} [default: {default}]")),
            None => arg.help(help),
        }
    })
}

/// The README's table of settings: name, default and meaning, one row per
/// setting's flag.
pub fn settings_table() -> String {
    let defaults = defaults();
    let cmd = SettingsArgs::augment_args(Command::new("promo-fanout"));
    let mut table = String::from("| setting | default | meaning |\n|---|---|---|\n");
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long().filter(|&l| l != CONFIG_FLAG) else {
            continue;
        };
        let default = match defaults.get(long) {
            Some(d) if d.contains(' ') => d.clone(),
            Some(d) => format!("`{d}`"),
            None => String::new(),
        };
        let name = if long == "kafka" {
            "kafka.<prop>"
        } else {
            long
        };
        table += &format!("| `{name}` | {default} | {} |\n", meaning(arg));
    }
    table
}

/// A flag's help, with its possible values and what each means.
fn meaning(arg: &Arg) -> String {
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .map(|v| match v.get_help() {
            Some(h) => format!("`{}`: {h}", v.get_name()),
            None => format!("`{}`", v.get_name()),
        })
        .collect();
    if values.is_empty() {
        help
    } else {
        format!("{help}: {}", values.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: &str =
        "<!-- the settings table: made from src/config.rs by `cargo test readme_settings` -->\n";
    const END: &str = "<!-- end of the settings table -->\n";

    /// The README's table is the flags' help: it cannot drift from
    /// `--help`. `PF_WRITE_README=1 cargo test readme_settings` rewrites it.
    #[test]
    fn readme_settings_table_is_the_flags_help() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let (head, rest) = readme.split_once(START).expect("the table's start marker");
        let (table, tail) = rest.split_once(END).expect("the table's end marker");
        let expected = settings_table();
        if table == expected {
            return;
        }
        if std::env::var_os("PF_WRITE_README").is_some() {
            std::fs::write(path, format!("{head}{START}{expected}{END}{tail}")).unwrap();
        } else {
            panic!(
                "README.md's settings table is not the flags' help; \
                 PF_WRITE_README=1 cargo test readme_settings rewrites it as:\n{expected}"
            );
        }
    }

    /// Every setting has a flag with a meaning, and every flag is a setting.
    #[test]
    fn every_setting_is_a_flag_with_a_meaning() {
        let cmd = SettingsArgs::augment_args(Command::new("promo-fanout"));
        let flags: Vec<&str> = cmd
            .get_arguments()
            .filter_map(Arg::get_long)
            .filter(|&l| l != CONFIG_FLAG)
            .collect();
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(!help.is_empty(), "--{:?} has no help", arg.get_long());
        }
        let mut settings: Vec<String> = defaults().into_keys().collect();
        settings.push("kafka".into());
        settings.sort();
        let mut flags: Vec<String> = flags.into_iter().map(String::from).collect();
        flags.sort();
        assert_eq!(settings, flags);
    }

    #[test]
    fn help_shows_each_default() {
        let mut cmd = with_defaults(SettingsArgs::augment_args(Command::new("promo-fanout")));
        let help = cmd.render_long_help().to_string();
        assert!(
            help.contains("Kafka bootstrap servers [default: localhost:9092]"),
            "{help}"
        );
        assert!(help.contains("[default: the host name]"), "{help}");
        assert!(!help.contains('`'), "{help}");
    }
}

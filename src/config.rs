//! Settings: each one a flag `--name`, an environment variable
//! `PROMO_FANOUT_NAME` and a key of the optional TOML file, in that precedence,
//! over the defaults of SPEC §4.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::error::Actual;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

pub mod help;

/// How the subscription mirror is kept current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorMode {
    /// cdc when the server allows it, else refresh, with a log line naming
    /// what is missing
    Auto,
    /// a snapshot, then Postgres logical replication (needs
    /// wal_level=logical, the REPLICATION attribute and the publication
    /// migrate creates)
    Cdc,
    /// a snapshot, then a re-read of the table every refresh-interval
    Refresh,
}

/// What `run` does with a stored input position the topic no longer holds
/// (older than its retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OutOfRange {
    /// stop, naming the partition and how many messages were lost
    Fail,
    /// resume at the oldest message still held (the gap is lost)
    Earliest,
    /// resume at the end of the partition (everything unread is skipped)
    Latest,
}

impl OutOfRange {
    /// The librdkafka `auto.offset.reset` that applies the same policy to a
    /// position that falls out of range while running.
    pub fn auto_offset_reset(self) -> &'static str {
        match self {
            OutOfRange::Fail => "error",
            OutOfRange::Earliest => "earliest",
            OutOfRange::Latest => "latest",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting of the service, resolved.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Kafka bootstrap servers.
    #[serde(deserialize_with = "lenient_string")]
    pub brokers: String,
    /// Where `subscribers_restaurants` is read and `subscribers_feedback` written.
    #[serde(deserialize_with = "lenient_string")]
    pub postgres_url: String,
    /// The RocksDB state store's directory.
    pub state_dir: PathBuf,
    #[serde(deserialize_with = "lenient_string")]
    pub input_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    pub output_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    pub dlq_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    pub group_id: String,
    /// This instance's name in the group (default: the host name): the
    /// holder recorded for the partitions it takes.
    #[serde(deserialize_with = "lenient_string")]
    pub instance_id: String,
    /// A campaign stops being eligible this long before its end.
    #[serde(with = "humantime_serde")]
    pub expiry_margin: Duration,
    pub mirror_mode: MirrorMode,
    /// `cdc` mode: the logical replication slot (default: `promo_fanout_`,
    /// the group id, `_` and the instance id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdc_slot: Option<String>,
    /// `cdc` mode: the publication of `subscribers_restaurants`.
    #[serde(deserialize_with = "lenient_string")]
    pub cdc_publication: String,
    /// `cdc` mode: how often the durable position is reported to Postgres
    /// (and an idle feed's position moved, so that no WAL is kept for it).
    #[serde(with = "humantime_serde")]
    pub cdc_status_interval: Duration,
    /// No longer used (the change feed is pushed, not polled): accepted so
    /// that older configuration files still load, with a warning at start.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cdc_poll_interval: Option<Duration>,
    /// `refresh` mode: how often the table is re-read.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Prometheus metrics, `/healthz` and `/readyz`.
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    /// Input messages read per batch at most.
    pub batch_size: usize,
    /// Notifications produced per batch at most: the bound on a batch's memory
    /// and on what a crash can make the push topic repeat.
    pub chunk_size: usize,
    /// Batches whose sink writes may be in flight at once; their store
    /// commits still happen one at a time, in order.
    pub pipeline_depth: usize,
    /// How long a batch waits for more input once nothing more is queued
    /// (0: not at all; what is queued is always taken, up to `batch-size`).
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Input values over this many bytes are bad input.
    pub max_message_bytes: usize,
    /// How long after a campaign's end its sent set is kept (and a repeat of
    /// the campaign is still recognised) before it is dropped from the store.
    #[serde(with = "humantime_serde")]
    pub sent_retention: Duration,
    /// A stored input position older than the topic's retention: `fail`,
    /// `earliest` or `latest`.
    pub position_out_of_range: OutOfRange,
    /// How long `run` tries to reach Postgres and the brokers at start before
    /// it gives up with an error. Outages after start are waited out.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Kafka client properties passed through to librdkafka, e.g.
    /// `sasl.mechanism`.
    #[serde(deserialize_with = "flat_properties")]
    pub kafka: BTreeMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            brokers: "localhost:9092".into(),
            postgres_url: "postgres://postgres@localhost:5432/postgres".into(),
            state_dir: PathBuf::from("promo-fanout-state"),
            input_topic: "restaurant_actions".into(),
            output_topic: "push_message".into(),
            dlq_topic: "restaurant_actions.dlq".into(),
            group_id: "promo-fanout".into(),
            instance_id: default_instance_id(),
            expiry_margin: Duration::from_secs(600),
            mirror_mode: MirrorMode::Auto,
            cdc_slot: None,
            cdc_publication: "promo_fanout".into(),
            cdc_status_interval: Duration::from_secs(10),
            cdc_poll_interval: None,
            refresh_interval: Duration::from_secs(30),
            metrics_addr: "127.0.0.1:9898".parse().expect("valid address"),
            log_format: LogFormat::Text,
            batch_size: 1000,
            chunk_size: 5000,
            pipeline_depth: 3,
            batch_linger: Duration::ZERO,
            max_message_bytes: 256 * 1024,
            sent_retention: Duration::from_secs(24 * 3600),
            position_out_of_range: OutOfRange::Fail,
            startup_timeout: Duration::from_secs(60),
            kafka: BTreeMap::new(),
        }
    }
}

/// `name` in the characters a slot name allows: `[a-z0-9_]`.
fn slot_chars(name: &str) -> String {
    name.chars()
        .map(|ch| match ch.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect()
}

/// The host name, else `promo-fanout`.
fn default_instance_id() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "promo-fanout".into())
}

// The settings given as flags: only those present override the layers below.
//
// Each field's doc comment is the one place its setting's meaning is
// declared: `--help` shows it with the default taken from
// `Settings::default` (`help::with_defaults`), and the README's table of
// settings is made from both (`help::settings_table`). (Plain comments here:
// clap would make a doc comment the description of every command.)
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
#[serde(rename_all = "kebab-case")]
pub struct SettingsArgs {
    /// TOML file with settings, keys as the flag names
    #[arg(long, global = true, env = "PROMO_FANOUT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brokers: Option<String>,
    /// Source and sink database (its password is never logged)
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_url: Option<String>,
    /// The RocksDB state store's directory, one per instance
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Actions in
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_topic: Option<String>,
    /// Push drafts out, keyed by `client_id`
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_topic: Option<String>,
    /// Bad input, bytes unchanged, with an `error` header
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dlq_topic: Option<String>,
    /// Consumer group: its instances split the input topic's partitions (offsets shown there;
    /// Postgres and the store hold the truth)
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// This instance's name in the group, recorded as the holder of the partitions it takes
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// A campaign stops being eligible this long before its end
    #[arg(long, global = true, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_margin: Option<String>,
    /// How the subscription mirror is kept current
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror_mode: Option<MirrorMode>,
    /// The logical replication slot `cdc` reads (created and owned by `run`)
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdc_slot: Option<String>,
    /// The publication of `subscribers_restaurants` (`migrate` creates it)
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdc_publication: Option<String>,
    /// How often `cdc` reports its durable position to Postgres, and moves an idle feed's
    /// position (at most `30s`: half of Postgres's default `wal_sender_timeout`)
    #[arg(long, global = true, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdc_status_interval: Option<String>,
    /// How often `refresh` re-reads `subscribers_restaurants`
    #[arg(long, global = true, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Log lines on stderr as text or JSON (`RUST_LOG` filters)
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Input messages per batch at most
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Notifications per batch at most: bounds memory and what a crash can repeat on the push
    /// topic
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<usize>,
    /// Batches whose sink writes may be in flight at once (one Postgres connection each); they
    /// are recorded in order
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline_depth: Option<usize>,
    /// How long a batch waits for more input once nothing more is queued (what is queued is
    /// always taken, up to `batch-size`; an action that arrives alone is processed at once)
    #[arg(long, global = true, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_linger: Option<String>,
    /// Larger input values are bad input
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// How long after a campaign's end its sent set is kept (and a repeat of the campaign still
    /// recognised)
    #[arg(long, global = true, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_retention: Option<String>,
    /// What to do with a stored input position older than the topic's retention
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position_out_of_range: Option<OutOfRange>,
    /// How long `run` tries to reach Postgres and the brokers at start before it exits 1 saying
    /// which it could not reach
    #[arg(long, global = true, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<String>,
    /// A librdkafka property, `PROP=VALUE` (repeatable), e.g. `security.protocol=SASL_SSL` for
    /// a managed cluster
    #[arg(long = "kafka", global = true, value_name = "PROP=VALUE", value_parser = parse_property)]
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "properties_as_map"
    )]
    pub kafka: Vec<(String, String)>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected PROP=VALUE, got {s:?}")),
    }
}

fn properties_as_map<S: serde::Serializer>(
    props: &[(String, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    // Dots would nest the keys; `flat_properties` joins them back either way.
    s.collect_map(props.iter().map(|(k, v)| (k, v)))
}

/// The longest `cdc-status-interval`: half of Postgres's default
/// `wal_sender_timeout`.
const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(30);

/// Resolution failed: the message says which setting and where it came from.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(String);

impl Settings {
    /// Resolves flags > environment > TOML file > defaults.
    pub fn load(args: &SettingsArgs) -> Result<Settings, SettingsError> {
        let settings: Settings = Self::figment(args)?
            .extract()
            .map_err(|e| SettingsError(describe(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// What the types alone cannot check.
    fn validate(&self) -> Result<(), SettingsError> {
        let postgres = crate::infra::tls::PostgresUrl::parse(&self.postgres_url).map_err(|e| {
            SettingsError(format!(
                "postgres-url {:?}: {}",
                self.postgres_url_redacted(),
                crate::infra::retry::postgres_text(&e)
            ))
        })?;
        // The files the URL names are read now: a missing CA stops the
        // program at once, naming it.
        if let Err(e) = postgres.tls.client_config() {
            return Err(SettingsError(format!("postgres-url: {e}")));
        }
        for (name, value) in [
            ("brokers", &self.brokers),
            ("input-topic", &self.input_topic),
            ("output-topic", &self.output_topic),
            ("dlq-topic", &self.dlq_topic),
            ("group-id", &self.group_id),
            ("instance-id", &self.instance_id),
        ] {
            if value.trim().is_empty() {
                return Err(SettingsError(format!("{name} is empty")));
            }
        }
        if let Some(slot) = &self.cdc_slot {
            let ok = !slot.is_empty()
                && slot.len() <= 63
                && slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(SettingsError(format!(
                    "cdc-slot {slot:?}: a slot name is 1 to 63 of a-z, 0-9 and _"
                )));
            }
        }
        for (name, value) in [
            ("refresh-interval", self.refresh_interval),
            ("cdc-status-interval", self.cdc_status_interval),
        ] {
            if value.is_zero() {
                return Err(SettingsError(format!("{name} must be more than 0s")));
            }
        }
        if self.cdc_status_interval > MAX_STATUS_INTERVAL {
            return Err(SettingsError(format!(
                "cdc-status-interval {:?}: at most {MAX_STATUS_INTERVAL:?}, half of Postgres's default \
                 wal_sender_timeout, or the server may drop the change feed as unresponsive",
                self.cdc_status_interval
            )));
        }
        for (name, value) in [
            ("batch-size", self.batch_size),
            ("chunk-size", self.chunk_size),
            ("pipeline-depth", self.pipeline_depth),
        ] {
            if value == 0 {
                return Err(SettingsError(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }

    fn figment(args: &SettingsArgs) -> Result<Figment, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = &args.config {
            if !path.exists() {
                return Err(SettingsError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = Env::prefixed("PROMO_FANOUT_")
            .ignore(&["config", "failpoints"])
            .map(|key| env_key(key.as_str()).into());
        Ok(figment.merge(env).merge(Serialized::defaults(args.clone())))
    }

    /// Settings that are accepted but no longer do anything, each with what
    /// to do instead: logged at start.
    pub fn deprecations(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.cdc_poll_interval.is_some() {
            out.push(
                "cdc-poll-interval is no longer used (the change feed is pushed by the server); \
                 remove it (cdc-status-interval sets how often the position is reported)",
            );
        }
        out
    }

    /// The Postgres URL with any password masked, for logs.
    pub fn postgres_url_redacted(&self) -> String {
        redact_url(&self.postgres_url)
    }

    /// The replication slot `cdc` mode uses: `cdc-slot`, or one named after
    /// the group and the instance, each instance having its own mirror (slot
    /// names allow `[a-z0-9_]`, 63 bytes: a longer name is cut and ends with
    /// a hash of the whole).
    pub fn cdc_slot(&self) -> String {
        if let Some(slot) = &self.cdc_slot {
            return slot.clone();
        }
        let whole = format!("promo_fanout_{}_{}", self.group_id, self.instance_id);
        let mut name = slot_chars(&whole);
        if name.len() > 63 {
            use sha2::Digest;
            let hash = sha2::Sha256::digest(whole.as_bytes());
            let suffix: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
            name.truncate(54);
            name.push('_');
            name.push_str(&suffix);
        }
        name
    }

    /// What every default slot name of the group starts with (a name cut
    /// to 63 bytes may not show it).
    pub fn group_slot_prefix(&self) -> String {
        slot_chars(&format!("promo_fanout_{}_", self.group_id))
    }

    /// The state dir as a path.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Kafka properties safe to log: secrets masked.
    pub fn kafka_redacted(&self) -> BTreeMap<String, String> {
        self.kafka
            .iter()
            .map(|(k, v)| {
                let secret = ["password", "secret", "sasl.jaas", "key.pem", "token"]
                    .iter()
                    .any(|s| k.contains(s));
                (k.clone(), if secret { "***".into() } else { v.clone() })
            })
            .collect()
    }
}

/// The environment variable that sets `key`: [`env_key`] backwards.
fn env_var(key: &str) -> String {
    format!(
        "PROMO_FANOUT_{}",
        key.to_ascii_uppercase().replace(['-', '.'], "_")
    )
}

/// `postgres_url` → `postgres-url`; `kafka_sasl_mechanism` → `kafka.sasl.mechanism`.
fn env_key(key: &str) -> String {
    let key = key.to_ascii_lowercase();
    match key.strip_prefix("kafka_") {
        Some(prop) => format!("kafka.{}", prop.replace('_', ".")),
        None => key.replace('_', "-"),
    }
}

/// One line per setting that failed: where the value came from (the flag,
/// the environment variable or the file, with its key) and what is wrong.
fn describe(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            format!("{}: {}", origin(e.metadata.as_ref(), &key), e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How the user wrote `key`, from the metadata of the provider it came from
/// (see [`Settings::figment`]).
fn origin(metadata: Option<&figment::Metadata>, key: &str) -> String {
    let Some(metadata) = metadata else {
        return key.to_owned();
    };
    match &metadata.source {
        Some(figment::Source::File(path)) => format!("{key} in {}", path.display()),
        _ if metadata.name.contains("environment") => env_var(key),
        _ if metadata.name.ends_with("SettingsArgs") => format!("--{key}"),
        _ => key.to_owned(),
    }
}

/// Masks the password of a `postgres://user:password@host/db` URL or a
/// `password=...` key/value pair.
pub fn redact_url(url: &str) -> String {
    // Parameters whose value is a secret, or the path to one.
    const SECRET: [&str; 3] = ["password", "sslkey", "sslpassword"];
    let mask = |kv: &str| match kv.split_once('=') {
        Some((k, _)) if SECRET.contains(&k) => format!("{k}=***"),
        _ => kv.to_owned(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url
            .split_whitespace()
            .map(mask)
            .collect::<Vec<_>>()
            .join(" ");
    };
    let (rest, query) = crate::infra::tls::split_query(rest);
    let rest = match rest.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => rest.to_owned(),
        },
        None => rest.to_owned(),
    };
    match query {
        Some(q) => {
            let q: Vec<String> = q.split('&').map(mask).collect();
            format!("{scheme}://{rest}?{}", q.join("&"))
        }
        None => format!("{scheme}://{rest}"),
    }
}

/// Environment values arrive parsed (`123` as a number): take any scalar as text.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = <Value as Deserialize>::deserialize(d)?;
    scalar_text(&v).ok_or_else(|| serde::de::Error::custom(format!("expected a string, got {v:?}")))
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(_, s) => Some(s.clone()),
        Value::Char(_, c) => Some(c.to_string()),
        Value::Bool(_, b) => Some(b.to_string()),
        Value::Num(_, n) => Some(match n.to_actual() {
            Actual::Unsigned(u) => u.to_string(),
            Actual::Signed(i) => i.to_string(),
            Actual::Float(f) => f.to_string(),
            other => other.to_string(),
        }),
        _ => None,
    }
}

/// `kafka.sasl.mechanism` nests as `{kafka: {sasl: {mechanism: ..}}}` in TOML and
/// in the environment; librdkafka wants it flat again.
fn flat_properties<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    fn walk(prefix: &str, dict: &Dict, out: &mut BTreeMap<String, String>) -> Result<(), String> {
        for (k, v) in dict {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Dict(_, inner) => walk(&key, inner, out)?,
                other => {
                    let text = scalar_text(other)
                        .ok_or_else(|| format!("kafka.{key}: expected a scalar value"))?;
                    out.insert(key, text);
                }
            }
        }
        Ok(())
    }
    let dict = Dict::deserialize(d)?;
    let mut out = BTreeMap::new();
    walk("", &dict, &mut out).map_err(serde::de::Error::custom)?;
    Ok(out)
}

#[cfg(test)]
// figment's `Jail` closures return its own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn an_environment_variable_name_is_derived_back_from_its_key() {
        for key in ["postgres-url", "batch-size", "kafka.sasl.mechanism"] {
            let var = env_var(key);
            let unprefixed = var.strip_prefix("PROMO_FANOUT_").unwrap();
            assert_eq!(env_key(unprefixed), key, "{var}");
        }
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "pf.toml",
                r#"
                group-id = "from-file"
                input-topic = "file-topic"
                output-topic = "file-out"
                expiry-margin = "5m"
                kafka.security.protocol = "SASL_SSL"
                kafka."sasl.mechanism" = "SCRAM-SHA-512"
                "#,
            )?;
            jail.set_env("PROMO_FANOUT_INPUT_TOPIC", "env-topic");
            jail.set_env("PROMO_FANOUT_OUTPUT_TOPIC", "env-out");
            jail.set_env("PROMO_FANOUT_GROUP_ID", "123");
            jail.set_env("PROMO_FANOUT_KAFKA_LINGER_MS", "7");
            let args = SettingsArgs {
                config: Some("pf.toml".into()),
                output_topic: Some("flag-out".into()),
                kafka: vec![("client.id".into(), "x".into())],
                ..Default::default()
            };
            let s = Settings::load(&args).map_err(|e| e.to_string())?;
            assert_eq!(s.output_topic, "flag-out");
            assert_eq!(s.input_topic, "env-topic");
            assert_eq!(s.group_id, "123");
            assert_eq!(s.expiry_margin, Duration::from_secs(300));
            assert_eq!(s.dlq_topic, "restaurant_actions.dlq");
            assert_eq!(s.kafka["security.protocol"], "SASL_SSL");
            assert_eq!(s.kafka["sasl.mechanism"], "SCRAM-SHA-512");
            assert_eq!(s.kafka["linger.ms"], "7");
            assert_eq!(s.kafka["client.id"], "x");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        Jail::expect_with(|jail| {
            jail.create_file("pf.toml", "brokerz = \"x\"\n")?;
            let args = SettingsArgs {
                config: Some("pf.toml".into()),
                ..Default::default()
            };
            let e = Settings::load(&args).unwrap_err().to_string();
            assert!(e.contains("brokerz") && e.contains("pf.toml"), "{e}");

            jail.create_file("pf.toml", "expiry-margin = \"ten minutes\"\n")?;
            let e = Settings::load(&args).unwrap_err().to_string();
            assert!(e.contains("expiry-margin"), "{e}");

            jail.create_file("pf.toml", "brokers = [\n")?;
            let e = Settings::load(&args).unwrap_err().to_string();
            assert!(e.contains("pf.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact_url("host=db password=s3cret user=u sslkey=/k.pem"),
            "host=db password=*** user=u sslkey=***"
        );
        assert_eq!(
            redact_url("postgres://app:p?w@db/x"),
            "postgres://app:***@db/x"
        );
        assert_eq!(
            redact_url("postgres://app:pw@db/x?sslmode=verify-full&sslkey=/etc/k.pem&password=p"),
            "postgres://app:***@db/x?sslmode=verify-full&sslkey=***&password=***"
        );
        let s = Settings {
            kafka: [("sasl.password".to_owned(), "p".to_owned())].into(),
            ..Default::default()
        };
        assert_eq!(s.kafka_redacted()["sasl.password"], "***");
    }
}

//! The `promo-fanout` binary: parses the command line, resolves the settings
//! and hands over to the library. Errors meet the user here, as one line.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use promo_fanout::config::{Settings, SettingsArgs};

#[derive(Parser)]
#[command(
    name = "promo-fanout",
    version,
    about = "Fans restaurant promotions out to their subscribers, crash-safe"
)]
struct Cli {
    #[command(flatten)]
    settings: SettingsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run,
    /// Apply migrations/ to Postgres.
    Migrate,
    /// The consumer group as Postgres sees it: who holds each input
    /// partition, and each instance's replication slot with the WAL it keeps.
    Group,
    /// Inspect or rebuild the state store.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// The whole pipeline on an embedded setup (a mock Kafka cluster and a
    /// scratch Postgres database), showing what it does.
    Demo,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print the store as JSON lines, one object per entry with a `table` field.
    Dump {
        /// Only this table: subscriptions, campaigns, sent, positions or meta.
        #[arg(long)]
        table: Option<String>,
    },
    /// Rebuild the store from Postgres: the mirror from a snapshot, the sent
    /// set from subscribers_feedback.
    Rebuild,
    /// Move an input partition's recorded position deliberately, with every
    /// instance stopped: the next message read from it, by whichever
    /// instance takes it, will be OFFSET.
    SetPosition {
        /// The input topic's partition.
        #[arg(long)]
        partition: i32,
        /// The next offset to read.
        #[arg(long)]
        offset: i64,
    },
}

/// The command line, with each setting's default in `--help`.
fn parse() -> Cli {
    let cmd = promo_fanout::config::help::with_defaults(Cli::command());
    Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse();
    let settings = match Settings::load(&cli.settings) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("promo-fanout: {e}");
            return ExitCode::from(2);
        }
    };
    // The demo prints its own account; its logs would interleave with it.
    let default_level = if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info,rdkafka=warn"
    };
    promo_fanout::infra::process::init_logging(settings.log_format, default_level);
    for deprecated in settings.deprecations() {
        tracing::warn!("{deprecated}");
    }
    if let Err(e) = promo_fanout::infra::failpoint::setup() {
        eprintln!("promo-fanout: {e}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match runtime.block_on(dispatch(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, on stderr where the logs go too: said once.
            eprintln!("promo-fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Run => {
            let shutdown = promo_fanout::infra::process::shutdown_on_signal();
            promo_fanout::pipeline::run(settings, shutdown).await?;
        }
        Command::Migrate => {
            let applied = promo_fanout::commands::migrate::migrate(&settings.postgres_url).await?;
            if applied.is_empty() {
                println!("migrations: up to date");
            }
            for m in applied {
                println!("migrations: applied {m}");
            }
        }
        Command::State {
            command: StateCommand::Dump { table },
        } => {
            let stdout = std::io::stdout();
            promo_fanout::commands::dump::dump(
                &settings.state_dir,
                table.as_deref(),
                &mut stdout.lock(),
            )?;
        }
        Command::State {
            command: StateCommand::Rebuild,
        } => {
            let report = promo_fanout::commands::rebuild::rebuild(&settings).await?;
            println!("{report}");
        }
        Command::State {
            command: StateCommand::SetPosition { partition, offset },
        } => {
            let moved =
                promo_fanout::commands::set_position::set_position(&settings, partition, offset)
                    .await?;
            println!("{moved}");
        }
        Command::Group => {
            let report = promo_fanout::commands::group::group(&settings).await?;
            print!("{report}");
        }
        Command::Demo => promo_fanout::commands::demo::demo(settings).await?,
    }
    Ok(())
}

//! The `framematch` binary: parses the command line, validates configuration before any runtime
//! starts (bad config exits 64), and dispatches to the server or a client command. `serve`
//! installs telemetry (logs, OTLP when `OTEL_*` say so) and flushes it before exiting.

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use framematch::api::ServeConfig;
use framematch::cli::serve::ServeArgs;
use framematch::cli::{self, Cli, Command, EXIT_CONFIG, EXIT_ERROR, EXIT_MATCHED};
use framematch::telemetry::{OtlpConfig, Tracing};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Hash(args) => cli::hash_files(&args),
        Command::VpdqMatch(args) => match cli::vpdq_match(&args) {
            Ok(true) => ExitCode::from(EXIT_MATCHED),
            Ok(false) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("framematch: {error}");
                ExitCode::from(EXIT_ERROR)
            }
        },
        Command::Scan(args) => match runtime() {
            Ok(runtime) => runtime.block_on(cli::scan(&args, &cli.client)),
            Err(code) => code,
        },
        Command::Bank { command } => client(cli::bank(command, &cli.client)),
        Command::Ref { command } => client(cli::reference(command, &cli.client)),
        Command::Stats => client(cli::stats(&cli.client)),
        Command::Org { command } => client(cli::org(command, &cli.client)),
        Command::Key { command } => client(cli::key(command, &cli.client)),
        Command::Audit { bank, after, limit } => {
            client(cli::audit(bank, after, limit, &cli.client))
        }
        Command::Export(args) => client(cli::transfer::export(args, &cli.client)),
        Command::Import(args) => client(cli::transfer::import(args, &cli.client)),
        Command::Bench(args) => client(cli::bench(args, &cli.client)),
        Command::Match {
            banks,
            max_distance,
            dihedral,
            files,
        } => {
            let runtime = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match runtime.block_on(cli::match_files(
                &files,
                banks,
                max_distance,
                dihedral,
                &cli.client,
            )) {
                Ok(true) => ExitCode::from(EXIT_MATCHED),
                Ok(false) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("framematch: {error}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("framematch: cannot start the async runtime: {error}");
            ExitCode::from(EXIT_ERROR)
        })
}

fn client(command: impl std::future::Future<Output = Result<(), cli::Error>>) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("framematch: {error}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let mut config = match ServeConfig::try_from(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("framematch: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The standard OTEL_* variables decide whether traces and metrics leave over OTLP.
    let otlp = OtlpConfig::from_env();
    config.otlp = otlp.clone();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // Inside the runtime: the OTLP exporter's channel spawns its worker there.
    let tracing = {
        let _entered = runtime.enter();
        match Tracing::try_init(config.log_format, &otlp) {
            Ok(tracing) => tracing,
            Err(error) => {
                eprintln!("framematch: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
        let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen for metrics on {}: {e}", args.metrics_listen)
            })?;
        let address = listener.local_addr()?;
        let metrics_address = metrics_listener.local_addr()?;
        // The first line of output is the bound address (port 0 picks one), the second the
        // metrics endpoint's: scripts and tests read them. One write for both lines: a reader
        // that closes the pipe after the first line (`| head -n1`) must not make the second
        // write fail and stop the server.
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(
            format!("listening on {address}\nmetrics on {metrics_address}\n").as_bytes(),
        )?;
        stdout.flush()?;
        drop(stdout);
        tracing::info!(%address, %metrics_address, "listening");
        framematch::server::serve_with_metrics(
            listener,
            metrics_listener,
            config,
            shutdown_signal(),
        )
        .await?;
        Ok(())
    });
    // Flush the spans still queued while the runtime that carries the export is alive.
    let flushed =
        runtime.block_on(async { tokio::task::spawn_blocking(move || tracing.shutdown()).await });
    if let Err(error) = flushed {
        eprintln!("framematch: flushing traces failed: {error}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("framematch: {error:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Completes on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

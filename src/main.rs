//! The `shardproxy` binary: parse flags, set up logging, run, map errors to exit codes
//! (0 success, 1 runtime failure, 2 bad flags or configuration).

use std::process::ExitCode;

use clap::Parser;
use shardproxy::cli::{self, Cli, Command};
use shardproxy::proxy::sockopt::raise_fd_limit;
use shardproxy::Workers;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse(); // bad flags: clap prints the fix and exits 2
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(match cli.command {
                Command::Run(_) | Command::Backend(_) => "info",
                _ => "warn",
            })
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = raise_fd_limit() {
        warn!(error = %e, "could not raise the fd limit");
    }
    // `run` serves on its own worker threads (one runtime each); this runtime only handles
    // signals and the admin listener. The other subcommands use a normal runtime.
    let mut rt = match cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shardproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run(args) => run(args).await,
        Command::Route(args) => route(args),
        Command::Demo(args) => {
            let opts = shardproxy::demo::DemoOptions {
                keys: args.keys,
                ..Default::default()
            };
            match shardproxy::demo::run(opts).await {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("shardproxy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Backend(args) => backend(args).await,
        Command::Client(args) => client(args).await,
    }
}

async fn run(args: cli::RunArgs) -> ExitCode {
    let workers = args.workers.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let proxy = match shardproxy::start_with(args.config(), Workers::Threads(workers)).await {
        Ok(p) => p,
        Err(shardproxy::Error::Config(e)) => {
            eprintln!("shardproxy: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("shardproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A machine-readable ready line: tests and scripts read the bound addresses from it.
    match proxy.admin_addr() {
        Some(admin) => println!("listening on {} admin {}", proxy.local_addr(), admin),
        None => println!("listening on {}", proxy.local_addr()),
    }
    wait_for_signal().await;
    info!("shutting down: no new connections");
    let cut = proxy.shutdown().await;
    info!(cut, "stopped");
    ExitCode::SUCCESS
}

fn route(args: cli::RouteArgs) -> ExitCode {
    let router =
        match shardproxy::Router::new(args.backends.iter().map(|b| (b.name.as_str(), b.weight))) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("shardproxy: invalid backend set: {e}");
                return ExitCode::from(2);
            }
        };
    for text in &args.keys {
        match cli::decode_key(text, args.hex) {
            Ok(key) => println!("{text}\t{}", router.rank_names(&key).join(" ")),
            Err(e) => {
                eprintln!("shardproxy: {e}");
                return ExitCode::from(2);
            }
        }
    }
    ExitCode::SUCCESS
}

async fn backend(args: cli::BackendArgs) -> ExitCode {
    match shardproxy::echo::EchoBackend::start(args.listen, &args.name).await {
        Ok(b) => {
            println!("backend {} listening on {}", b.name(), b.local_addr());
            wait_for_signal().await;
            b.stop().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shardproxy: cannot listen on {}: {e}", args.listen);
            ExitCode::FAILURE
        }
    }
}

async fn client(args: cli::ClientArgs) -> ExitCode {
    let fmt = args.header.format();
    let payload: Vec<u8> = (0..args.payload).map(|i| (i % 251) as u8).collect();
    let mut failed = false;
    for text in &args.keys {
        match shardproxy::client::round_trip(args.connect, &fmt, text.as_bytes(), &payload).await {
            Ok(reply) => println!(
                "{text}\t{}\t{} bytes verified",
                reply.backend, reply.verified
            ),
            Err(e) => {
                eprintln!("{text}\terror: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stopping");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

//! The `shardproxy` binary: parse flags, set up logging, run, map errors to exit codes
//! (0 success, 1 runtime failure, 2 bad flags or configuration).
//!
//! `run` drains on the first SIGTERM/SIGINT, or once a successor took its listeners over
//! (`--upgrade-socket`): stop accepting, let connections finish up to `--drain-timeout`, exit
//! 0; a signal during the drain exits at once with 1, cutting what is left.

mod demo;

use std::process::ExitCode;

use clap::CommandFactory;
use shardproxy::cli::{self, Cli, Command};
use shardproxy::dsr::agent::AgentError;
use shardproxy::proxy::sockopt::raise_fd_limit;
use shardproxy::Workers;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Bad flags: clap prints the fix and exits 2. Through ArgMatches so that `run` knows
    // which flags were given explicitly (they override the --config file).
    let cli = match Cli::from_matches(&Cli::command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.format(&mut Cli::command()).exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(match cli.command {
                Command::Run(_)
                | Command::Backend(_)
                | Command::Agent(_)
                | Command::Register(_) => "info",
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
    let code = rt.block_on(dispatch(cli.command));
    // Do not wait for tasks still running (after a second signal, connections being
    // drained): the process exits now and the kernel closes their sockets.
    rt.shutdown_background();
    code
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run(args) => run(args).await,
        Command::Route(args) => route(args),
        Command::Check(args) => check(&args),
        Command::Demo(args) => {
            let opts = demo::DemoOptions {
                keys: args.keys,
                ..Default::default()
            };
            match demo::run(opts).await {
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
        Command::Agent(args) => agent(args).await,
        Command::Register(args) => register(args).await,
    }
}

async fn run(args: cli::RunArgs) -> ExitCode {
    // Before the ready line, so that a signal sent as soon as it is read is not missed.
    let Some(mut signals) = Signals::install() else {
        return ExitCode::FAILURE;
    };
    let (config, workers) = match args.resolve() {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("shardproxy: {e}");
            return ExitCode::from(2);
        }
    };
    let workers = workers.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let proxy = match shardproxy::start_with(config, Workers::Threads(workers)).await {
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
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler: no config reloads");
            None
        }
    };
    let handed_over = proxy.handed_over();
    loop {
        tokio::select! {
            () = signals.recv() => {
                info!("shutting down: no new connections (a second SIGTERM/SIGINT exits at once)");
                break;
            }
            () = handed_over.cancelled() => {
                info!("a successor took over the listeners: draining (a SIGTERM/SIGINT exits at once)");
                break;
            }
            Some(()) = async { hangups.as_mut()?.recv().await } => reload(&args, &proxy),
        }
    }
    tokio::select! {
        cut = proxy.shutdown() => {
            info!(cut, "stopped");
            ExitCode::SUCCESS
        }
        () = signals.recv() => {
            warn!("second signal during the drain: exiting now, cutting open connections");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: re-reads `--config` (flags given on the command line still win) and applies it
/// live; an invalid file is logged with the reason and counted, and the old table stays.
fn reload(args: &cli::RunArgs, proxy: &shardproxy::ProxyHandle) {
    let Some(path) = &args.config_file else {
        warn!("SIGHUP without --config: nothing to re-read; nothing changed");
        return;
    };
    info!(file = %path.display(), "SIGHUP: re-reading the configuration");
    let control = proxy.control();
    let result = shardproxy::config_file::load(path)
        .map_err(|e| e.to_string())
        .and_then(|file| args.config_with_file(file).map_err(|e| e.to_string()))
        .and_then(|config| control.reload(config).map_err(|e| e.to_string()));
    control.record_reload(result.is_ok());
    match result {
        Ok(reloaded) => {
            info!(generation = reloaded.generation, "configuration reloaded");
            for key in reloaded.needs_restart {
                warn!(key, "changed in the file but only applied by a restart or an upgrade; the running value stays");
            }
        }
        Err(e) => {
            error!(error = %e, "configuration reload failed: the old table and settings stay")
        }
    }
}

/// `check FILE`: the one-line summary and 0, or the error (file:line:col: key: fix) and 2.
fn check(args: &cli::CheckArgs) -> ExitCode {
    match shardproxy::config_file::load(&args.file) {
        Ok(file) => {
            println!("{}: {}", args.file.display(), file.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shardproxy: {e}");
            ExitCode::from(2)
        }
    }
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
    let Some(mut signals) = Signals::install() else {
        return ExitCode::FAILURE;
    };
    use shardproxy::fixtures::echo::EchoBackend;
    let started = match &args.handoff_socket {
        None => EchoBackend::start(args.listen, &args.name).await,
        Some(path) => EchoBackend::start_with_handoff(args.listen, &args.name, path).await,
    };
    match started {
        Ok(b) => {
            match &args.handoff_socket {
                None => println!("backend {} listening on {}", b.name(), b.local_addr()),
                Some(path) => println!(
                    "backend {} listening on {} handoff-socket {}",
                    b.name(),
                    b.local_addr(),
                    path.display()
                ),
            }
            signals.recv().await;
            b.stop().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            match &args.handoff_socket {
                None => eprintln!("shardproxy: cannot listen on {}: {e}", args.listen),
                Some(path) => eprintln!(
                    "shardproxy: cannot listen on {} and hand-off socket {}: {e}",
                    args.listen,
                    path.display()
                ),
            }
            ExitCode::FAILURE
        }
    }
}

async fn agent(args: cli::AgentArgs) -> ExitCode {
    let Some(mut signals) = Signals::install() else {
        return ExitCode::FAILURE;
    };
    let agent = match shardproxy::dsr::agent::start(args.config()).await {
        Ok(a) => a,
        Err(e @ (AgentError::Secret(_) | AgentError::Invalid(_))) => {
            eprintln!("shardproxy: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("shardproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    match agent.admin_addr() {
        Some(admin) => println!("agent control on {} admin {}", agent.control_addr(), admin),
        None => println!("agent control on {}", agent.control_addr()),
    }
    signals.recv().await;
    agent.shutdown().await;
    ExitCode::SUCCESS
}

/// `register`: keeps the backend's key in etcd until SIGTERM/SIGINT, then removes it.
async fn register(args: cli::RegisterArgs) -> ExitCode {
    let Some(mut signals) = Signals::install() else {
        return ExitCode::FAILURE;
    };
    let security = args.etcd.security();
    if let Err(e) = security.check() {
        eprintln!("shardproxy: {e}");
        return ExitCode::from(2);
    }
    if let Some(w) = security.warning() {
        warn!("{w}");
    }
    let config = shardproxy::membership::register::RegisterConfig {
        url: args.membership,
        security,
        name: args.name,
        check: args.check.unwrap_or_else(|| args.addr.clone()),
        addr: args.addr,
        weight: args.weight,
        ttl: args.ttl,
        check_interval: args.check_interval,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let sidecar = shardproxy::membership::register::run(config, stop.clone());
    tokio::pin!(sidecar);
    tokio::select! {
        () = &mut sidecar => return ExitCode::SUCCESS,
        () = signals.recv() => {
            info!("stopping: removing the key and revoking the lease");
            stop.cancel();
        }
    }
    sidecar.await;
    ExitCode::SUCCESS
}

async fn client(args: cli::ClientArgs) -> ExitCode {
    let fmt = args.header.format();
    let payload: Vec<u8> = (0..args.payload).map(|i| (i % 251) as u8).collect();
    let mut failed = false;
    for text in &args.keys {
        match shardproxy::fixtures::client::round_trip(
            args.connect,
            &fmt,
            text.as_bytes(),
            &payload,
        )
        .await
        {
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

/// SIGTERM and SIGINT, installed once so that no signal is missed between two waits.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; logs and returns `None` if that fails.
    fn install() -> Option<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some(Signals { term, int }),
            (Err(e), _) | (_, Err(e)) => {
                error!(error = %e, "cannot install signal handlers; stopping");
                None
            }
        }
    }

    /// Waits for the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

//! `cryo`: the runc-compatible command line.

mod cgroups;
mod cli;
mod commands;
mod console;
mod context;
mod logging;
mod mounts;
mod run_bundle;
mod stdio_owner;
mod workload;

use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command};
use crate::context::Context;

fn main() {
    let argv = normalize_args(std::env::args().collect());
    let cli = match Cli::command().try_get_matches_from(&argv) {
        Ok(m) => match Cli::from_arg_matches(&m) {
            Ok(c) => c,
            Err(e) => e.exit(),
        },
        Err(e) => exit_on_parse_error(e, &argv),
    };
    logging::init(cli.log.as_deref(), cli.log_format, cli.debug);
    if cli.version {
        println!("cryo version {}", env!("CARGO_PKG_VERSION"));
        println!("spec: 1.2.0");
        println!("libcontainer: 0.7");
        return;
    }
    if cli.systemd_cgroup {
        logging::log(
            "debug",
            "--systemd-cgroup given, but this runtime drives cgroupfs; ignoring",
        );
    }
    let Some(command) = cli.command else {
        let _ = Cli::command().print_help();
        std::process::exit(1);
    };
    let ctx = Context {
        store: cryo_oci::StateStore::new(&cli.root),
        root: cli.root.clone(),
        criu: cli.criu.clone().unwrap_or_else(|| "criu".into()),
        log: cli.log.clone(),
        log_format: cli.log_format,
        gpu: cryo_checkpoint::gpu::GpuLookup::system(
            cli.cuda_checkpoint.clone(),
            cli.criu_plugin_dir.clone(),
        ),
    };
    // runc's rule: exec's own failures exit 255, apart from any status of the process.
    let failure_code = if matches!(command, Command::Exec(_)) {
        255
    } else {
        1
    };
    let result = match command {
        Command::Create(a) => commands::lifecycle::create(&ctx, &a),
        Command::Start(a) => commands::lifecycle::start(&ctx, &a.container_id),
        Command::Run(a) => commands::lifecycle::run(&ctx, &a),
        Command::State(a) => commands::info::state(&ctx, &a.container_id),
        Command::List(a) => commands::info::list(&ctx, &a),
        Command::Kill(a) => commands::lifecycle::kill(&ctx, &a),
        Command::Delete(a) => commands::lifecycle::delete(&ctx, &a),
        Command::Exec(a) => commands::exec::exec(&ctx, &a),
        Command::Ps(a) => commands::info::ps(&ctx, &a),
        Command::Pause(a) => commands::lifecycle::pause(&ctx, &a.container_id),
        Command::Resume(a) => commands::lifecycle::resume(&ctx, &a.container_id),
        Command::Events(a) => commands::info::events(&ctx, &a),
        Command::Update(a) => commands::info::update(&ctx, &a),
        Command::Features => commands::info::features(&ctx),
        Command::Spec(a) => commands::spec::spec(&a),
        Command::Checkpoint(a) => commands::checkpoint::checkpoint(&ctx, &a),
        Command::Restore(a) => commands::restore::restore(&ctx, &a),
        Command::Verify(a) => commands::verify::verify(&a),
        Command::Store(c) => commands::store::store(c),
        Command::Guardian => commands::guardian::run(&ctx),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            logging::fatal(&format!("{e:#}"));
            std::process::exit(failure_code);
        }
    }
}

/// go-runc and conmon pass long flags with one dash (`-no-subreaper`): give every known long
/// flag its second dash, leave short flags and values alone.
fn normalize_args(argv: Vec<String>) -> Vec<String> {
    let mut longs = std::collections::HashSet::new();
    collect_longs(&Cli::command(), &mut longs);
    let mut out = Vec::with_capacity(argv.len());
    let mut rest_is_positional = false;
    for (i, a) in argv.into_iter().enumerate() {
        if i > 0 && !rest_is_positional && a.starts_with('-') && !a.starts_with("--") && a.len() > 2
        {
            let name = a[1..].split('=').next().unwrap_or("");
            if longs.contains(name) {
                out.push(format!("-{a}"));
                continue;
            }
        }
        if a == "--" {
            rest_is_positional = true;
        }
        out.push(a);
    }
    out
}

fn collect_longs(cmd: &clap::Command, into: &mut std::collections::HashSet<String>) {
    for a in cmd.get_arguments() {
        if let Some(l) = a.get_long() {
            into.insert(l.to_string());
        }
    }
    for s in cmd.get_subcommands() {
        collect_longs(s, into);
    }
}

/// podman probes `restore --lsm-mount-context` without a value and greps for runc's wording.
fn exit_on_parse_error(e: clap::Error, argv: &[String]) -> ! {
    use clap::error::ErrorKind;
    let missing_value =
        e.kind() == ErrorKind::InvalidValue && e.to_string().contains("a value is required");
    if missing_value {
        let flag = argv
            .iter()
            .rev()
            .find(|a| a.starts_with('-'))
            .map(|a| a.trim_start_matches('-').to_string())
            .unwrap_or_default();
        eprintln!("flag needs an argument: -{flag}");
        std::process::exit(1);
    }
    e.exit()
}

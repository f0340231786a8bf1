//! `vae`: train, evaluate and look at variational autoencoders. See `vae --help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc.h, v2 and v3
/// alike; libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Freed memory stays with the process instead of going back to the OS. A training step
    // frees and allocates the same scratch every time (the `gemm` crate's packing buffers,
    // rayon's per-task vectors): when mimalloc purged it between steps, as it did whenever
    // the machine was busy, each step faulted the pages in again and the kernel zeroed them:
    // about 90 faults of 2 MB pages per conv step. The step's peak memory is held anyway.
    // SAFETY: sets an integer option; mimalloc reads options at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // A bug must still end in one line on stderr, never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        // A GPU error raised inside a backend method (out of memory, a failed launch) is the
        // user's to read as it is.
        if let Some(e) = vaecuda::backend::cuda::GpuError::from_panic(info.payload()) {
            eprintln!("error: {}", e.to_string().replace('\n', " "));
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {}", msg.replace('\n', " "));
    }));
    // `vae train --recipe NAME` is its flags in front of the user's (see cli::recipes).
    let argv = match cli::recipes::expand(std::env::args_os().collect()) {
        Ok(cli::recipes::Expanded::Args(argv)) => argv,
        Ok(cli::recipes::Expanded::List) => {
            print!("{}", cli::recipes::list());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let args = match cli::Cli::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(2)
                }
                _ => {
                    let text = e.render().to_string();
                    let first = text.lines().next().unwrap_or("error: invalid arguments");
                    eprintln!("{first} (see vae --help)");
                    ExitCode::from(2)
                }
            };
        }
    };
    // The whole command runs on rayon's worker threads. Started from the main thread, every
    // parallel op would hand its work to the pool and sleep until it is done: a wake-up per
    // op, which perf put at a tenth of an MLP training step. On a worker, the op's first
    // half runs right there and the other worker steals the rest.
    // (8 MiB stacks, as the main thread has, rather than rayon's default.)
    let result = std::panic::catch_unwind(|| match rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build() {
        Ok(pool) => pool.install(|| cli::run(args)),
        Err(_) => cli::run(args),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) if e.downcast_ref::<cli::Interrupted>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Ok(Err(e)) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
        // The hook has printed the one line.
        Err(_) => ExitCode::FAILURE,
    }
}

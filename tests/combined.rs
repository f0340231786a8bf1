//! Most integration tests, compiled into one test executable. Each `tests/*.rs` file named
//! below is a module here, and its tests run as `<file>::<test>`
//! (`cargo test --test combined kill_resume -- --nocapture`).
//!
//! Why one executable: the library is generic over its backend and element type, so every
//! test executable compiled its own copy of the trainer, the ops and the backends at
//! `opt-level = 2`, and linked it: that was most of CI's test build (each of these files took
//! 1–28 s of compiling alone, about 100 s in all on two cores). Together they share one copy,
//! and their tests run side by side (as one executable's tests do) instead of one file at a
//! time. Cargo runs test executables in the order of their names, so this one runs first:
//! its `emulated_device` and `gpu_model` compile every kernel, and `gpu_vs_cpu` and
//! `nvrtc_compile` then find them in the kernel cache.
//!
//! Apart, each for a reason (Cargo.toml lists them): `gpu_vs_cpu`, `gradcheck` and
//! `nvrtc_compile` are the executables `scripts/build-dist.sh` carries to a GPU machine;
//! `fuzz_parsers` installs its own global allocator; `emulated_primitives` reruns single
//! tests of its own executable in child processes.

mod cli_common;
mod common;
mod faces;

mod bench_cases;
mod cli;
mod data_folders;
mod emulated_device;
mod f32_vs_f64;
mod gpu_model;
mod kill_resume;
mod recipes;
mod tape;

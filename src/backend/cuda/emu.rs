//! The emulated CUDA device: the kernels of `kernels/` run on the CPU, reached through exactly
//! the code that drives a GPU (the same `Cuda` backend, kernel table, argument structs, launch
//! geometry, memory pool and NVRTC compile step).
//!
//! How: cudarc loads the CUDA driver (`libcuda.so`) at run time, one symbol at a time. [`install`]
//! builds a stand-in driver library from `kernels/emu/driver.cpp` with the system C++ compiler
//! and loads it under the name `libcuda.so` before cudarc looks, so every driver call lands in
//! it. Device memory is host memory (each allocation between guard pages, filled with NaN), the
//! stream runs each call before returning, events read the clock. The CUBIN that NVRTC compiled
//! is parsed for its kernel names, and each name resolves to a host build of the same program
//! text NVRTC saw (`compile::program_source`: contract, common.cuh, declarations, the file;
//! built when the backend first loads that file), compiled with `kernels/emu/runtime.h` in
//! front, which maps `threadIdx`, `__shared__`, `__syncthreads` and friends onto fibers: a
//! block's threads run one after another on one CPU thread, each until its next barrier, in
//! an order the tests choose (forward, reverse or shuffled), so a missing barrier changes the
//! result. Blocks run in parallel on the CPU's cores. An access outside an allocation hits a guard page and the launch fails with the
//! kernel's name, block and thread. See `kernels/README.md` for what it cannot show.
//!
//! The built libraries are cached under the kernel cache folder (`compile::cache_dir`), keyed
//! by their sources and the compiler, like the CUBINs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::compile::{self, KernelFile};
use super::error::GpuError;
use super::kernels;

/// The stand-in driver: the CUDA driver API functions cudarc calls, on host memory
/// (`driver.cpp`, which includes the other driver files).
const DRIVER_SOURCE: &str = include_str!("../../../kernels/emu/driver.cpp");
/// Every header of the emulator (driver parts and runtime parts): each build gets all of them,
/// and their text is part of every build's cache key.
const HEADERS: &[(&str, &str)] = &[
    ("abi.h", include_str!("../../../kernels/emu/abi.h")),
    ("memory.h", include_str!("../../../kernels/emu/memory.h")),
    ("modules.h", include_str!("../../../kernels/emu/modules.h")),
    ("launch.h", include_str!("../../../kernels/emu/launch.h")),
    ("graphs.h", include_str!("../../../kernels/emu/graphs.h")),
    ("runtime.h", include_str!("../../../kernels/emu/runtime.h")),
    ("threads.h", include_str!("../../../kernels/emu/threads.h")),
    ("warps.h", include_str!("../../../kernels/emu/warps.h")),
    ("block.h", include_str!("../../../kernels/emu/block.h")),
    ("checks.h", include_str!("../../../kernels/emu/checks.h")),
    ("tensor.h", include_str!("../../../kernels/emu/tensor.h")),
    ("async.h", include_str!("../../../kernels/emu/async.h")),
];

/// The order in which a block's threads run between two barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadOrder {
    /// Thread 0 first.
    Forward,
    /// The last thread first.
    Reverse,
    /// A new random order for every block and barrier, from this seed.
    Shuffled(u64),
}

/// The loaded stand-in driver, kept for the life of the process (cudarc holds its functions).
static DRIVER: OnceLock<Result<libloading::Library, GpuError>> = OnceLock::new();
/// Serializes `install` (two tests may ask at once).
static INSTALLING: Mutex<()> = Mutex::new(());

/// Builds (or finds in the cache) the emulated driver and loads it as this process's
/// `libcuda.so`. Call it before anything opens a GPU; afterwards `cuda::open(0)` opens the
/// emulated device, and each kernel file's host build is made when the backend first loads
/// that file ([`load_kernel_file`]). Fails with `GpuError::Unavailable` when no C++ compiler
/// is found; a kernel file that does not compile for the host fails its first load with
/// `GpuError::Compile`.
pub fn install() -> Result<(), GpuError> {
    let _guard = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    DRIVER.get_or_init(load).as_ref().map(|_| ()).map_err(Clone::clone)
}

/// Whether this process's CUDA driver is the emulated one.
pub fn is_installed() -> bool {
    DRIVER.get().is_some_and(|d| d.is_ok())
}

fn load() -> Result<libloading::Library, GpuError> {
    let cxx = compiler()?;
    let dir = compile::cache_dir().unwrap_or_else(std::env::temp_dir).join("emu");
    std::fs::create_dir_all(&dir)
        .map_err(|e| GpuError::Unavailable(format!("cannot create the emulator cache {}: {e}", dir.display())))?;
    // Only the driver: each kernel file's host build is made when the backend first loads that
    // file (`load_kernel_file`).
    let driver = build(&cxx, &dir, "libcuda", "driver.cpp", DRIVER_SOURCE, &[], &["-Wl,-soname,libcuda.so", "-ldl"])?;
    // SAFETY: loading our own library runs no initialization code beyond static
    // constructors of plain data. RTLD_GLOBAL | RTLD_NOW: its symbols are bound now, and a
    // later dlopen("libcuda.so") by cudarc finds this library by its soname.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(&driver),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    }
    .map_err(|e| GpuError::Unavailable(format!("cannot load the emulated driver {}: {e}", driver.display())))?;
    let lib = libloading::Library::from(lib);
    // The name cudarc asks for must now resolve to this library, not to a real driver that
    // was loaded first.
    // SAFETY: only opens a library that is already loaded.
    let found = unsafe { libloading::Library::new("libcuda.so") }
        .ok()
        .is_some_and(|l| unsafe { l.get::<unsafe extern "C" fn() -> i32>(b"vaecuda_emu_version\0") }.is_ok());
    if !found {
        return Err(GpuError::Unavailable(
            "a real CUDA driver is already loaded in this process; choose the emulated device before opening a GPU"
                .into(),
        ));
    }
    Ok(lib)
}

/// The kernel files whose host builds are registered with the driver (each once a process).
static REGISTERED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Builds (or finds in the cache) the host build of kernel file `file` and registers its
/// kernels with the installed emulated driver, once a process: the CUDA backend calls this
/// before it loads the file's CUBIN, which the driver binds to these host kernels by name.
pub fn load_kernel_file(file: &'static KernelFile) -> Result<(), GpuError> {
    let lib = match DRIVER.get() {
        Some(Ok(lib)) => lib,
        _ => return Err(GpuError::Unavailable("the emulated device is not installed".into())),
    };
    let registered = || REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if registered().contains(&file.name) {
        return Ok(());
    }
    // Built without holding the list, so `load_all_kernels` builds files side by side; two
    // threads that need the same file meet at its cache entry's lock and build it once.
    let dir = compile::cache_dir().unwrap_or_else(std::env::temp_dir).join("emu");
    let module = build_module(&compiler()?, &dir, file)?;
    let mut list = registered();
    if !list.contains(&file.name) {
        register(lib, &[module])?;
        list.push(file.name);
    }
    Ok(())
}

/// Loads host modules into the driver and registers their kernels by name.
fn register(lib: &libloading::Library, modules: &[PathBuf]) -> Result<(), GpuError> {
    let list = modules.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>().join("\n");
    let list = std::ffi::CString::new(list).map_err(|_| GpuError::Unavailable("a NUL byte in a path".into()))?;
    // SAFETY: the symbol is defined by driver.cpp with this signature.
    unsafe {
        let register: libloading::Symbol<unsafe extern "C" fn(*const std::ffi::c_char) -> i32> =
            lib.get(b"vaecuda_emu_register_modules\0").map_err(|e| GpuError::Unavailable(e.to_string()))?;
        if register(list.as_ptr()) != 0 {
            return Err(GpuError::Unavailable("the emulated driver could not load the kernel modules".into()));
        }
    }
    Ok(())
}

/// Builds the host version of a program that is not one of the kernel files (the emulator's
/// own test kernels): `text` is the whole program NVRTC compiles, named `name` in messages,
/// and `kernels` its `extern "C"` kernel names. Registers them with the installed emulated
/// driver, so a CUBIN NVRTC made from the same text loads and runs. Call [`install`] first.
pub fn load_program(name: &str, text: &str, kernels: &[&str]) -> Result<(), GpuError> {
    load_program_with(name, text, kernels, &[])
}

/// [`load_program`] with `flags` for the host compiler after the usual ones (include folders
/// for a program that includes CUDA's own headers, as NVRTC gets them through `-I`).
pub fn load_program_with(name: &str, text: &str, kernels: &[&str], flags: &[&str]) -> Result<(), GpuError> {
    let lib = match DRIVER.get() {
        Some(Ok(lib)) => lib,
        _ => return Err(GpuError::Unavailable("the emulated device is not installed".into())),
    };
    let cxx = compiler()?;
    let dir = compile::cache_dir().unwrap_or_else(std::env::temp_dir).join("emu");
    let stem: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let text = format!("#line 1 \"{name}\"\n{text}");
    let compile_flags: Vec<&str> = sanitizers().into_iter().chain(flags.iter().copied()).collect();
    let module = build(&cxx, &dir, &stem, name, &host_program(&text, kernels), &compile_flags, &[])?;
    register(lib, &[module])
}

/// Forgets the emulated device's sticky error, for tests that check many failing launches in
/// one process (on a GPU a failed launch leaves the context dead).
pub fn clear_error() -> Result<(), GpuError> {
    call(b"vaecuda_emu_clear_error\0", |f: unsafe extern "C" fn()| unsafe { f() })
}

/// Sets the order of a block's threads between barriers for every later launch.
pub fn set_thread_order(order: ThreadOrder) -> Result<(), GpuError> {
    let (mode, seed) = match order {
        ThreadOrder::Forward => (0, 0),
        ThreadOrder::Reverse => (1, 0),
        ThreadOrder::Shuffled(seed) => (2, seed),
    };
    call(b"vaecuda_emu_set_order\0", |f: unsafe extern "C" fn(i32, u64)| unsafe { f(mode, seed) })
}

/// Caps the emulated device's memory (`None`: the default, `VAECUDA_EMU_MEMORY` or 8 GiB), so
/// the out-of-memory path can be tested.
pub fn set_memory_limit(bytes: Option<u64>) -> Result<(), GpuError> {
    call(b"vaecuda_emu_set_memory_limit\0", |f: unsafe extern "C" fn(u64)| unsafe { f(bytes.unwrap_or(0)) })
}

/// Kernel launches the emulated device has run.
pub fn launches() -> Result<u64, GpuError> {
    call(b"vaecuda_emu_launches\0", |f: unsafe extern "C" fn() -> u64| unsafe { f() })
}

fn call<F: Copy, R>(name: &[u8], f: impl FnOnce(F) -> R) -> Result<R, GpuError> {
    let lib = match DRIVER.get() {
        Some(Ok(lib)) => lib,
        _ => return Err(GpuError::Unavailable("the emulated device is not installed".into())),
    };
    // SAFETY: the caller names a symbol driver.cpp defines with the signature F.
    let sym = unsafe { lib.get::<F>(name) }.map_err(|e| GpuError::Unavailable(e.to_string()))?;
    Ok(f(*sym))
}

/// The C++ compiler: `$CXX`, else the first of c++, g++, clang++ that runs.
fn compiler() -> Result<String, GpuError> {
    let candidates: Vec<String> = std::env::var("CXX")
        .ok()
        .filter(|c| !c.is_empty())
        .into_iter()
        .chain(["c++", "g++", "clang++"].map(String::from))
        .collect();
    candidates
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| {
            GpuError::Unavailable(
                "the emulated device needs a C++ compiler (g++ or clang++; set CXX to choose one): \
                 install one, e.g. `apt-get install g++`"
                    .into(),
            )
        })
}

/// Compiler flags: optimized, or (`VAECUDA_EMU_DEBUG=1`) for a debugger: no optimization and
/// debug information, so gdb can stop inside a kernel at `kernels/<file>.cu:<line>`.
fn flags() -> Vec<&'static str> {
    let debug = std::env::var("VAECUDA_EMU_DEBUG").is_ok_and(|v| v == "1");
    let mut f = vec!["-std=c++17", "-fPIC", "-pthread", "-fvisibility=hidden", "-Wno-unknown-pragmas"];
    f.extend(if debug { ["-O0", "-g"] } else { ["-O2", "-g0"] });
    f
}

/// What the kernels' host builds check on top (runtime.h's checks.h has the handlers, so no
/// sanitizer library is linked): an index past an array (shared or local), a misaligned
/// access (a float4 at an address that is not a multiple of 16), signed integer overflow; and
/// locals that nobody initialized start as a pattern, not zero.
/// `VAECUDA_EMU_CHECKS=0` leaves them out (to measure what they cost, or for speed when
/// only results matter).
fn sanitizers() -> Vec<&'static str> {
    if std::env::var("VAECUDA_EMU_CHECKS").is_ok_and(|v| v == "0") {
        return vec![];
    }
    vec![
        "-fsanitize=bounds,alignment,signed-integer-overflow",
        "-fno-sanitize-recover=all",
        "-ftrivial-auto-var-init=pattern",
    ]
}

/// CUDA's own headers a program may include (found through `-I`, see `load_program_with`).
const CUDA_HEADERS: [&str; 2] = ["cuda_fp16.h", "cuda_bf16.h"];

/// The host build's text of a program: the runtime, the program (each `extern __shared__`
/// declaration rewritten into a pointer to the block's dynamic shared memory, on the same
/// line), and the table of its kernels.
fn host_program(text: &str, kernels: &[impl AsRef<str>]) -> String {
    // CUDA's half and bfloat16 headers go in front of the runtime: they define CUDA's vector
    // types and keywords for a host compiler, which the runtime then takes over (its own
    // definitions give way: checks.h, runtime.h). Their lines stay, blank, so lines keep
    // their numbers.
    let is_cuda_header = |l: &str| CUDA_HEADERS.iter().any(|h| l.trim() == format!("#include <{h}>"));
    let mut out = String::new();
    for line in text.lines().filter(|l| is_cuda_header(l)) {
        out.push_str(line.trim());
        out.push('\n');
    }
    out.push_str("#include \"runtime.h\"\n");
    for line in text.lines() {
        if !is_cuda_header(line) {
            out.push_str(&rewrite_extern_shared(line));
        }
        out.push('\n');
    }
    out.push_str("\n#line 1 \"kernel table (generated)\"\nEMU_MODULE_BEGIN\n");
    for symbol in kernels {
        out.push_str(&format!("EMU_KERNEL({})\n", symbol.as_ref()));
    }
    out.push_str("EMU_MODULE_END\n");
    out
}

/// `extern __shared__ float4 tile[];` (optionally with `__align__(n)`) becomes
/// `EMU_DYNAMIC_SHARED(float4, tile);`, a pointer into the block's dynamic shared memory.
/// Other lines are returned unchanged.
fn rewrite_extern_shared(line: &str) -> std::borrow::Cow<'_, str> {
    let Some(at) = line.find("extern __shared__") else { return line.into() };
    let rest = &line[at + "extern __shared__".len()..];
    let Some(end) = rest.find("[];") else { return line.into() };
    let decl = rest[..end].replace("__align__", " __align__");
    let words: Vec<&str> = decl.split_whitespace().filter(|w| !w.starts_with("__align__")).collect();
    let Some((name, ty)) = words.split_last() else { return line.into() };
    if ty.is_empty() {
        return line.into();
    }
    let after = &rest[end + 3..];
    format!("{}EMU_DYNAMIC_SHARED({}, {name});{after}", &line[..at], ty.join(" ")).into()
}

/// The host build of one kernel file: the runtime, the exact program text NVRTC compiles, and
/// the table of its kernels.
///
/// `VAECUDA_FAST_BUILD=1` ([`compile::FAST_BUILD_ENV`]) builds it at `-O1` (the last `-O`
/// flag wins): a third less compile time for kernels that then run a little slower.
fn build_module(cxx: &str, dir: &Path, file: &KernelFile) -> Result<PathBuf, GpuError> {
    let text = host_program(&compile::program_source(file)?, &kernels::symbols_in(file.name));
    let mut checks = sanitizers();
    if compile::fast_build() {
        checks.push("-O1");
    }
    build(cxx, dir, file.name.trim_end_matches(".cu"), file.name, &text, &checks, &[])
}

/// Compiles `source` (named `name` in messages) to `dir/<stem>-<key>.so` unless that exists;
/// the key hashes the source, the headers, the compiler's version and the flags. `checks` are
/// flags for compiling only (the sanitizers), `link` flags for linking only.
fn build(
    cxx: &str,
    dir: &Path,
    stem: &str,
    name: &str,
    source: &str,
    checks: &[&str],
    link: &[&str],
) -> Result<PathBuf, GpuError> {
    let version = Command::new(cxx).arg("--version").output().map(|o| o.stdout).unwrap_or_default();
    let mut h = Sha256::new();
    let parts = [source.as_bytes(), &version].into_iter().chain(HEADERS.iter().map(|(_, text)| text.as_bytes()));
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for f in flags().iter().chain(checks).chain(link) {
        h.update(f.as_bytes());
    }
    let key: String = h.finalize().iter().take(10).map(|b| format!("{b:02x}")).collect();
    let out = dir.join(format!("{stem}-{key}.so"));
    if out.is_file() {
        return Ok(out);
    }
    // Another process (or thread) building the same library: wait for it and take its build.
    let _lock = compile::CompileLock::take(&out);
    if out.is_file() {
        return Ok(out);
    }
    // Sources and headers go to a private folder; the library is renamed into place whole.
    let work = dir.join(format!(".build-{stem}-{key}-{}", std::process::id()));
    let io = |e: std::io::Error| GpuError::Unavailable(format!("emulator build folder {}: {e}", work.display()));
    std::fs::create_dir_all(&work).map_err(io)?;
    for (file, text) in HEADERS.iter().copied().chain([("source.cpp", source)]) {
        std::fs::write(work.join(file), text).map_err(io)?;
    }
    // Compiled and linked apart: the sanitizer flags must not link the sanitizer runtime.
    let object = work.join("out.o");
    let tmp = work.join("out.so");
    let run = |cmd: &mut Command| {
        cmd.output().map_err(|e| GpuError::Unavailable(format!("cannot run the C++ compiler {cxx}: {e}")))
    };
    let mut result = run(Command::new(cxx)
        .args(flags())
        .args(checks)
        .arg("-I")
        .arg(&work)
        .arg("-c")
        .arg("-o")
        .arg(&object)
        .arg(work.join("source.cpp")))?;
    if result.status.success() {
        result = run(Command::new(cxx).args(flags()).arg("-shared").arg("-o").arg(&tmp).arg(&object).args(link))?;
    }
    let outcome = if result.status.success() {
        std::fs::rename(&tmp, &out).map_err(io).map(|_| out)
    } else {
        let log = String::from_utf8_lossy(&result.stderr).trim().to_string();
        Err(GpuError::Compile { file: format!("{name} (host build for the emulated device)"), log })
    };
    let _ = std::fs::remove_dir_all(&work);
    outcome
}

/// The first GPU when one opens, else the emulated device: what the examples use to show a
/// kernel running on any machine. The flag says whether it is the emulated one.
pub fn gpu_or_emulated<E: super::CudaFloat>() -> Result<(super::Cuda<E>, bool), GpuError> {
    if !is_installed() {
        match super::open::<E>(0) {
            Ok(gpu) => return Ok((gpu, false)),
            Err(GpuError::Unavailable(_)) => install()?,
            Err(e) => return Err(e),
        }
    }
    super::open::<E>(0).map(|gpu| (gpu, true))
}

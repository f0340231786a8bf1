//! Kernel sources, NVRTC compilation and the on-disk cache.
//!
//! The `.cu` files under `kernels/` are embedded in the binary with `include_str!` (so cargo
//! rebuilds when they change; `build.rs` also watches the folder). Each file is compiled as
//! its own NVRTC program named after the file, with `common.cuh` pasted in front under
//! `#line` directives: NVRTC's messages name the real file and line (`gemm.cu(42): error`).
//! Compiling for `sm_XY` gives a CUBIN, cached on disk under a key that hashes the sources,
//! the architecture, the options and the NVRTC version.

use std::borrow::Cow;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};

use super::error::GpuError;
use super::{contract, kernels};

/// The shared header, pasted in front of every file.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One kernel file: its name under `kernels/` and its source. The kernels it defines are
/// those of the kernel table (`kernels::KERNELS`).
pub struct KernelFile {
    /// The file name under `kernels/` (`gemm.cu`); also the NVRTC program's name, so compiler
    /// messages point at it.
    pub name: &'static str,
    /// Its text as embedded at build time (`$VAECUDA_KERNEL_SOURCES` can replace it at run time).
    pub source: &'static str,
}

/// Every kernel file, each compiled as its own program into its own module.
pub const FILES: &[KernelFile] = &[
    KernelFile { name: "gemm.cu", source: include_str!("../../../kernels/gemm.cu") },
    KernelFile { name: "conv2d.cu", source: include_str!("../../../kernels/conv2d.cu") },
    KernelFile { name: "batchnorm.cu", source: include_str!("../../../kernels/batchnorm.cu") },
    KernelFile { name: "elementwise.cu", source: include_str!("../../../kernels/elementwise.cu") },
    KernelFile { name: "vae_loss.cu", source: include_str!("../../../kernels/vae_loss.cu") },
    KernelFile { name: "adam.cu", source: include_str!("../../../kernels/adam.cu") },
    KernelFile { name: "rng.cu", source: include_str!("../../../kernels/rng.cu") },
];

/// Options every program is compiled with (besides the architecture).
const OPTIONS: &[&str] = &["-std=c++17"];

/// When set to `1`, builds favour build time over the speed of the code they make: NVRTC
/// compiles the kernel files with `--Ofast-compile=max` (about a sixth of the time: gemm.cu
/// 4 s instead of 20–30 s) and the emulated device's host builds of the kernel files take
/// `-O1` instead of `-O2` (a third less). For runs where the device code's speed does not
/// matter: the planted-bug tests set it for each build of broken sources, whose kernels run
/// on the emulated device as host builds (the CUBIN gives the driver only names, launch
/// bounds and register counts).
/// The performance model never uses it: it compiles its own CUBINs (`model::cubin`).
pub const FAST_BUILD_ENV: &str = "VAECUDA_FAST_BUILD";

/// Whether [`FAST_BUILD_ENV`] asks for fast builds.
pub fn fast_build() -> bool {
    std::env::var(FAST_BUILD_ENV).is_ok_and(|v| v == "1")
}

/// The options a kernel file is compiled with after [`OPTIONS`]: the fast-compile one when
/// [`FAST_BUILD_ENV`] asks for it.
fn file_extra_options() -> &'static [&'static str] {
    if fast_build() {
        &["--Ofast-compile=max"]
    } else {
        &[]
    }
}

/// Where kernel sources are read from instead of the copies built into the binary, when set:
/// a folder holding `common.cuh` and the `.cu` files. For kernel work without rebuilding, and
/// for the tests that break a kernel on purpose to show the suite catches it.
pub const SOURCES_ENV: &str = "VAECUDA_KERNEL_SOURCES";

/// The text of `name` (a file under `kernels/`, or `common.cuh`), embedded or from
/// `$VAECUDA_KERNEL_SOURCES`.
fn text_of(name: &str, embedded: &'static str) -> Result<Cow<'static, str>, GpuError> {
    match std::env::var_os(SOURCES_ENV).filter(|d| !d.is_empty()) {
        None => Ok(Cow::Borrowed(embedded)),
        Some(dir) => {
            let path = Path::new(&dir).join(name);
            std::fs::read_to_string(&path).map(Cow::Owned).map_err(|e| {
                GpuError::Unavailable(format!("cannot read kernel source {} ({SOURCES_ENV}): {e}", path.display()))
            })
        }
    }
}

/// The full text the compilers see for one file: the generated contract (constants, codes,
/// argument structs), common.cuh, the declarations of the file's kernels from the kernel table,
/// then the file with its `#include "common.cuh"` line blanked (so line numbers stay those of
/// the file). `#line` directives make messages name the real file and line.
pub fn program_source(file: &KernelFile) -> Result<String, GpuError> {
    let common = text_of("common.cuh", COMMON)?;
    let source = text_of(file.name, file.source)?;
    let body: String = source
        .lines()
        .map(|l| if l.trim() == "#include \"common.cuh\"" { "" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(format!(
        "#line 1 \"contract.rs (generated)\"\n{}\n#line 1 \"common.cuh\"\n{common}\n#line 1 \"{name} (declarations)\"\n{}\n#line 1 \"{name}\"\n{body}\n",
        contract::prelude(),
        kernels::declarations(file.name),
        name = file.name
    ))
}

/// The one-line error for a missing NVRTC.
pub fn nvrtc_missing() -> GpuError {
    GpuError::Unavailable(
        "NVRTC (libnvrtc.so.13, CUDA's runtime compiler) could not be loaded: install the CUDA 13 toolkit or \
         `pip install nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH (or use the CPU backend)"
            .to_string(),
    )
}

/// Whether NVRTC (`libnvrtc.so`) can be loaded; checked first because cudarc panics when it
/// cannot.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    if !nvrtc_present() {
        return Err(nvrtc_missing());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| GpuError::driver("asking NVRTC its version", e))?;
    Ok((major, minor))
}

/// The result of compiling one file.
pub struct Compiled {
    /// CUBIN for the requested `sm_XY`.
    pub binary: Vec<u8>,
    /// NVRTC's program log (warnings); empty for a clean compile.
    pub log: String,
}

fn log_of(prog: sys::nvrtcProgram) -> String {
    // SAFETY: prog is a live program.
    match unsafe { result::get_program_log(prog) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(e) => format!("(could not read the NVRTC log: {e:?})"),
    }
}

/// Compiles one kernel file for `arch` (e.g. "sm_90") to CUBIN. An error carries NVRTC's log,
/// whose messages name the file and line.
pub fn compile_file(file: &KernelFile, arch: &str) -> Result<Compiled, GpuError> {
    compile_program_with(file.name, &program_source(file)?, arch, file_extra_options())
}

/// Compiles the program text `text` (as `program_source` makes it), named `file` in messages,
/// for `arch` to CUBIN.
pub fn compile_program(file: &str, text: &str, arch: &str) -> Result<Compiled, GpuError> {
    compile_program_with(file, text, arch, &[])
}

/// [`compile_program`] with `extra` NVRTC options after the usual ones (the performance model
/// adds `--ptxas-options=-v` for ptxas's resource report, which then fills the log).
pub fn compile_program_with(file: &str, text: &str, arch: &str, extra: &[&str]) -> Result<Compiled, GpuError> {
    if !nvrtc_present() {
        return Err(nvrtc_missing());
    }
    let compile_error = |log: String| GpuError::Compile { file: file.to_string(), log };
    let src = CString::new(text).map_err(|_| compile_error("a NUL byte in the source".into()))?;
    let name = CString::new(file).map_err(|_| compile_error("a NUL byte in the file name".into()))?;
    let prog =
        result::create_program(&src, Some(&name)).map_err(|e| GpuError::driver("creating an NVRTC program", e))?;
    let mut opts: Vec<String> = vec![format!("--gpu-architecture={arch}")];
    opts.extend(OPTIONS.iter().chain(extra).map(|s| s.to_string()));
    // SAFETY: prog was just created and is destroyed below, on every path.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = log_of(prog);
    let out = match compiled {
        Err(e) => Err(compile_error(format!("NVRTC ({e:?}) for {arch}:\n{log}"))),
        Ok(()) => cubin_of(prog).map(|binary| Compiled { binary, log }),
    };
    // SAFETY: prog is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn cubin_of(prog: sys::nvrtcProgram) -> Result<Vec<u8>, GpuError> {
    let mut size = 0usize;
    // SAFETY: prog compiled successfully; the buffer has the size NVRTC reported.
    unsafe {
        sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| GpuError::driver("asking NVRTC the CUBIN size", e))?;
        let mut buf = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
            .result()
            .map_err(|e| GpuError::driver("copying the CUBIN from NVRTC", e))?;
        Ok(buf)
    }
}

/// What `compile_all_for_arch` did, file by file.
#[derive(Clone, Debug)]
pub struct CompileReport {
    /// The target, e.g. `sm_80`.
    pub arch: String,
    /// NVRTC's (major, minor) version.
    pub nvrtc_version: (i32, i32),
    /// One report per entry of [`FILES`], in order.
    pub files: Vec<FileReport>,
}

/// How one kernel file compiled: what the NVRTC test (`tests/nvrtc_compile.rs`) checks.
#[derive(Clone, Debug)]
pub struct FileReport {
    /// The file under `kernels/`.
    pub file: &'static str,
    /// NVRTC's log (empty when the file compiled without a message).
    pub log: String,
    /// Size of the CUBIN.
    pub binary_bytes: usize,
    /// Whether the CUBIN passes `cubin_is_whole` (the check a cached file must pass).
    pub whole: bool,
    /// `extern "C"` kernel names (`<base>_f32`, `<base>_f64`) that the file must define and
    /// that were not found in the CUBIN's symbol names.
    pub missing_kernels: Vec<String>,
}

/// The `extern "C"` names a file must define (from the kernel table).
pub fn kernel_names(file: &KernelFile) -> Vec<String> {
    kernels::symbols_in(file.name)
}

/// Whether `name` appears NUL-terminated in a CUBIN (an ELF whose string table holds every
/// kernel's symbol name).
pub fn has_symbol(binary: &[u8], name: &str) -> bool {
    let needle: Vec<u8> = name.bytes().chain([0]).collect();
    binary
        .windows(needle.len())
        .enumerate()
        .any(|(i, w)| w == needle && (i == 0 || binary[i - 1] == 0 || binary[i - 1] == b'.'))
}

/// Compiles every kernel file for `arch` (e.g. "sm_80") with NVRTC alone: no GPU, no driver.
/// It is the performance model's compile (ptxas's report on, [`compile_file_cached_with`]),
/// so a text the model compiled before comes from the disk cache; the report's lines are left
/// out of [`FileReport::log`] ([`without_ptxas_report`]).
pub fn compile_all_for_arch(arch: &str) -> Result<CompileReport, GpuError> {
    let nvrtc_version = nvrtc_version()?;
    let mut files = vec![];
    for f in FILES {
        let c = compile_file_cached_with(f, arch, &[PTXAS_REPORT])?;
        let missing_kernels = kernel_names(f).into_iter().filter(|n| !has_symbol(&c.binary, n)).collect();
        let (binary_bytes, whole) = (c.binary.len(), cubin_is_whole(&c.binary));
        files.push(FileReport {
            file: f.name,
            log: without_ptxas_report(&c.log),
            binary_bytes,
            whole,
            missing_kernels,
        });
    }
    Ok(CompileReport { arch: arch.to_string(), nvrtc_version, files })
}

/// The NVRTC option that turns ptxas's resource report on (registers, shared memory, spills
/// per kernel; the performance model reads it from the log).
pub const PTXAS_REPORT: &str = "--ptxas-options=-v";

/// An NVRTC log without the lines of ptxas's resource report (`ptxas info    : ...` and their
/// `ptxas         .` continuations): what is left are the compiler's messages, warnings
/// included.
pub fn without_ptxas_report(log: &str) -> String {
    let report = |l: &str| l.starts_with("ptxas info") || l.starts_with("ptxas         .");
    log.lines().filter(|l| !report(l)).collect::<Vec<_>>().join("\n")
}

/// `$VAECUDA_CACHE`, else `$XDG_CACHE_HOME/vaecuda`, else `~/.cache/vaecuda`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("VAECUDA_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("vaecuda")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("vaecuda")))
}

/// Hex key of everything that determines a file's CUBIN: the whole program text (contract,
/// common.cuh, declarations, the file), the architecture, the options ([`OPTIONS`], then
/// `extra`) and NVRTC's version.
fn cache_key(file: &KernelFile, arch: &str, extra: &[&str], nvrtc: (i32, i32)) -> Result<String, GpuError> {
    let mut h = Sha256::new();
    for part in [&program_source(file)?, file.name, arch, &format!("nvrtc {}.{}", nvrtc.0, nvrtc.1)] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for o in OPTIONS.iter().chain(extra) {
        h.update(o.as_bytes());
    }
    Ok(h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename,
/// so a concurrent reader sees the whole file or none.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.{:?}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Whether `bytes` is a whole 64-bit little-endian ELF image (a CUBIN): the header, the program
/// and section header tables and every section's contents lie inside the file. The driver's
/// `cuModuleLoadData` takes no length, so a truncated cache file must never reach it (it would
/// read past the buffer); other damage is caught by the load failing (see `cubin_fresh`).
pub fn cubin_is_whole(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u64);
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as u64);
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let whole = || -> Option<bool> {
        if bytes.len() < 64 || bytes[..4] != *b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
            return Some(false);
        }
        let len = bytes.len() as u64;
        let inside = |off: u64, size: u64| off.checked_add(size).is_some_and(|end| end <= len);
        let (phoff, shoff) = (u64_at(0x20)?, u64_at(0x28)?);
        let (phentsize, phnum, shentsize, shnum) = (u16_at(0x36)?, u16_at(0x38)?, u16_at(0x3a)?, u16_at(0x3c)?);
        if shnum == 0 || shentsize < 64 || (phnum > 0 && phentsize < 56) {
            return Some(false);
        }
        if !inside(phoff, phentsize * phnum) || !inside(shoff, shentsize * shnum) {
            return Some(false);
        }
        for s in 0..shnum {
            let h = (shoff + s * shentsize) as usize;
            const SHT_NOBITS: u64 = 8;
            if u32_at(h + 4)? != SHT_NOBITS && !inside(u64_at(h + 0x18)?, u64_at(h + 0x20)?) {
                return Some(false);
            }
        }
        for p in 0..phnum {
            let h = (phoff + p * phentsize) as usize;
            if !inside(u64_at(h + 8)?, u64_at(h + 0x20)?) {
                return Some(false);
            }
        }
        Some(true)
    };
    whole().unwrap_or(false)
}

/// Where the CUBIN of `file` for `arch` is cached under `dir`.
fn cache_path(dir: &Path, file: &KernelFile, arch: &str, nvrtc: (i32, i32)) -> Result<PathBuf, GpuError> {
    let stem = file.name.trim_end_matches(".cu");
    Ok(dir.join(format!("{stem}-{arch}-{}.cubin", cache_key(file, arch, file_extra_options(), nvrtc)?)))
}

/// A CUBIN and whether it was read from the disk cache (rather than compiled just now).
pub struct Cubin {
    /// The CUBIN, for `cuModuleLoadData`.
    pub binary: Vec<u8>,
    /// True when it came from the disk cache: if the driver then refuses it, the loader
    /// compiles afresh ([`cubin_fresh`]) instead of failing.
    pub from_cache: bool,
}

/// The CUBIN of `file` for `arch`: from the disk cache when present and whole, else compiled
/// (and then cached; a cache that cannot be written is skipped silently). A truncated or
/// otherwise broken cache file is recompiled and overwritten.
pub fn cubin_cached(file: &KernelFile, arch: &str) -> Result<Cubin, GpuError> {
    cubin_cached_in(cache_dir().as_deref(), file, arch)
}

/// `cubin_cached` with an explicit cache folder (`None`: no cache).
pub fn cubin_cached_in(dir: Option<&Path>, file: &KernelFile, arch: &str) -> Result<Cubin, GpuError> {
    let nvrtc = nvrtc_version()?;
    let Some(p) = dir.map(|d| cache_path(d, file, arch, nvrtc)).transpose()? else {
        return cubin_fresh_in(dir, file, arch);
    };
    let cached = || std::fs::read(&p).ok().filter(|b| cubin_is_whole(b));
    if let Some(binary) = cached() {
        return Ok(Cubin { binary, from_cache: true });
    }
    // Another process (or thread) compiling the same file holds the lock: wait for it and
    // take its CUBIN, rather than compile the same text twice at once.
    let lock = CompileLock::take(&p);
    if let Some(binary) = cached() {
        return Ok(Cubin { binary, from_cache: true });
    }
    let fresh = cubin_fresh_in(dir, file, arch);
    drop(lock);
    fresh
}

/// An exclusive lock on `<cache entry>.lock` while one process builds that entry: a second
/// process that needs the same entry waits, then finds it in the cache. Best effort (a cache
/// that cannot hold the lock file builds unlocked). The file is removed when the build is
/// done; a process still waiting on the removed file then finds the entry built.
pub(crate) struct CompileLock {
    held: Option<(std::fs::File, PathBuf)>,
}

impl CompileLock {
    /// Waits for, then holds, the lock of cache entry `entry`.
    pub(crate) fn take(entry: &Path) -> CompileLock {
        let path = entry.with_extension("lock");
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).ok();
        CompileLock { held: file.filter(|f| f.lock().is_ok()).map(|f| (f, path)) }
    }
}

impl Drop for CompileLock {
    fn drop(&mut self) {
        if let Some((file, path)) = self.held.take() {
            let _ = std::fs::remove_file(&path);
            drop(file); // closing releases the lock
        }
    }
}

/// Compiles `file` for `arch` and overwrites its cache entry: for a cached CUBIN the driver
/// refused to load (damaged inside, or written by a different NVRTC build).
pub fn cubin_fresh(file: &KernelFile, arch: &str) -> Result<Cubin, GpuError> {
    cubin_fresh_in(cache_dir().as_deref(), file, arch)
}

fn cubin_fresh_in(dir: Option<&Path>, file: &KernelFile, arch: &str) -> Result<Cubin, GpuError> {
    let nvrtc = nvrtc_version()?;
    let c = compile_file(file, arch)?;
    if let Some(p) = dir.map(|d| cache_path(d, file, arch, nvrtc)).transpose()? {
        let _ = write_atomic(&p, &c.binary);
    }
    Ok(Cubin { binary: c.binary, from_cache: false })
}

/// [`compile_program_with`] of `file` with `extra` options (the performance model's
/// `--ptxas-options=-v`), its CUBIN and log cached on disk beside the backend's CUBINs under
/// a key that includes the options: the model, its tests and `vae bench --model` then compile
/// each file once per architecture, not on every run. [`FAST_BUILD_ENV`] does not apply.
pub fn compile_file_cached_with(file: &KernelFile, arch: &str, extra: &[&str]) -> Result<Compiled, GpuError> {
    let fresh = || compile_program_with(file.name, &program_source(file)?, arch, extra);
    let Some(dir) = cache_dir() else { return fresh() };
    let stem =
        format!("{}-{arch}-{}", file.name.trim_end_matches(".cu"), cache_key(file, arch, extra, nvrtc_version()?)?);
    let (cubin, log) = (dir.join(format!("{stem}.cubin")), dir.join(format!("{stem}.log")));
    // The log is written first and the CUBIN last, so a whole CUBIN means a whole entry.
    let cached = || {
        let binary = std::fs::read(&cubin).ok().filter(|b| cubin_is_whole(b))?;
        Some(Compiled { binary, log: std::fs::read_to_string(&log).ok()? })
    };
    if let Some(c) = cached() {
        return Ok(c);
    }
    let _lock = CompileLock::take(&cubin);
    if let Some(c) = cached() {
        return Ok(c);
    }
    let c = fresh()?;
    let _ = write_atomic(&log, c.log.as_bytes()).and_then(|_| write_atomic(&cubin, &c.binary));
    Ok(c)
}

//! Static facts of every kernel, read from the CUBIN NVRTC compiles (no GPU needed): registers,
//! launch bounds, shared and local memory from the ELF's `.nv.info` attributes, and spills
//! from ptxas's own report (NVRTC passes `--ptxas-options=-v` on and returns its lines in the
//! program log).
//!
//! The CUBIN layout read here (seen in NVRTC 13's output and in `cuobjdump -elf`'s listing):
//! `.nv.info` holds per-function attributes `EIATTR_REGCOUNT` (0x2f) and `EIATTR_FRAME_SIZE`
//! (0x11), each `(symbol index: u32, value: u32)`; `.nv.info.<kernel>` holds
//! `EIATTR_MAX_THREADS` (0x05, three u32: the `__launch_bounds__` maximum) when the kernel
//! declares one, and `EIATTR_MAXREG_COUNT` (0x1b, a u16: the register cap ptxas compiled
//! under); `.nv.shared.<kernel>` is a NOBITS section the size of its static shared
//! memory (on sm_90 it includes the 1 KB the system reserves per block: a 1200-byte array
//! gives a 2224-byte section, 1200 on sm_80). Each attribute is `format: u8, attribute: u8`,
//! then for format 4 (`EIFMT_SVAL`) a `u16` length and that many bytes, otherwise a `u16`.

use std::collections::BTreeMap;

use crate::backend::cuda::compile::{compile_file_cached_with, KernelFile, FILES, PTXAS_REPORT};
use crate::backend::cuda::GpuError;

/// What the CUBIN and ptxas say about one kernel function.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelFacts {
    /// The symbol, `gemm_f32`.
    pub name: String,
    /// The file under `kernels/` that defines it.
    pub file: String,
    /// Registers per thread (`EIATTR_REGCOUNT`).
    pub registers: u32,
    /// The `__launch_bounds__` maximum threads per block (`EIATTR_MAX_THREADS`), if declared.
    pub max_threads: Option<u32>,
    /// Size of the `.nv.shared.<kernel>` section, bytes (0: none).
    pub shared_section_bytes: u32,
    /// Static shared memory as ptxas reports it (`N bytes smem`), bytes.
    pub shared_bytes: u32,
    /// Stack frame, bytes (`EIATTR_FRAME_SIZE`): local memory per thread.
    pub frame_bytes: u32,
    /// Bytes of registers spilled to local memory (ptxas's `spill stores`).
    pub spill_store_bytes: u32,
    /// Bytes reloaded from spills (ptxas's `spill loads`).
    pub spill_load_bytes: u32,
    /// Registers as ptxas reports them (a cross-check of `registers`).
    pub ptxas_registers: u32,
    /// The register cap ptxas compiled under (`EIATTR_MAXREG_COUNT`): 255, or less where
    /// `__launch_bounds__(threads, min_blocks)` asks for several blocks per SM.
    pub max_registers: u32,
}

impl KernelFacts {
    /// The blocks per SM the kernel is designed for, as its CUBIN records it: `min_blocks` of
    /// `__launch_bounds__(threads, min_blocks)` is what makes ptxas cap registers at
    /// `registers_per_sm / (threads · min_blocks)`, so it is that quotient back (1 without a
    /// cap or without launch bounds).
    pub fn designed_blocks_per_sm(&self, registers_per_sm: u32) -> u32 {
        match self.max_threads {
            Some(t) if self.max_registers > 0 && self.max_registers < 255 => {
                (registers_per_sm / (t * self.max_registers)).max(1)
            }
            _ => 1,
        }
    }
}

/// The CUBIN and the ptxas report of one kernel file for one architecture.
pub struct CompiledFile {
    /// The file under `kernels/`.
    pub file: &'static str,
    /// The CUBIN.
    pub cubin: Vec<u8>,
    /// Every kernel function in it.
    pub kernels: Vec<KernelFacts>,
}

/// Compiles every kernel file for `arch` (`sm_90`, `sm_80`) with ptxas's report on (or takes
/// the CUBIN and report from the disk cache) and reads the facts of every kernel function.
/// The files compile side by side: NVRTC is single-threaded.
pub fn compile_facts(arch: &str) -> Result<Vec<CompiledFile>, GpuError> {
    let of_file = |f: &'static KernelFile| {
        let c = compile_file_cached_with(f, arch, &[PTXAS_REPORT])?;
        let mut kernels = facts_of(&c.binary).map_err(|e| GpuError::Compile {
            file: f.name.to_string(),
            log: format!("cannot read the CUBIN NVRTC made for {arch}: {e}"),
        })?;
        merge_ptxas_report(&mut kernels, &c.log);
        for k in &mut kernels {
            k.file = f.name.to_string();
        }
        Ok(CompiledFile { file: f.name, cubin: c.binary, kernels })
    };
    std::thread::scope(|s| {
        let jobs: Vec<_> = FILES.iter().map(|f| s.spawn(move || of_file(f))).collect();
        jobs.into_iter().map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// Little-endian reads that fail instead of panicking on a short buffer.
struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn u16(&self, at: usize) -> Result<u16, String> {
        self.0.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]])).ok_or_else(|| format!("short at {at}"))
    }
    fn u32(&self, at: usize) -> Result<u32, String> {
        self.0
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| format!("short at {at}"))
    }
    fn u64(&self, at: usize) -> Result<u64, String> {
        self.0
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| format!("short at {at}"))
    }
    fn cstr(&self, at: usize) -> Result<&str, String> {
        let tail = self.0.get(at..).ok_or_else(|| format!("string past the end at {at}"))?;
        let end = tail.iter().position(|&b| b == 0).ok_or("unterminated string")?;
        std::str::from_utf8(&tail[..end]).map_err(|e| e.to_string())
    }
}

/// One ELF section header, the fields read here.
struct Section {
    name: String,
    kind: u32,
    offset: usize,
    size: usize,
}

const SHT_SYMTAB: u32 = 2;
const SHT_NOBITS: u32 = 8;
const EIFMT_SVAL: u8 = 4;
const EIATTR_MAX_THREADS: u8 = 0x05;
const EIATTR_FRAME_SIZE: u8 = 0x11;
const EIATTR_REGCOUNT: u8 = 0x2f;
const EIATTR_MAXREG_COUNT: u8 = 0x1b;
/// `STT_FUNC`: the low nibble of a symbol's `st_info`.
const STT_FUNC: u8 = 2;

fn sections(b: &Bytes) -> Result<Vec<Section>, String> {
    if b.0.len() < 64 || b.0[..4] != *b"\x7fELF" || b.0[4] != 2 {
        return Err("not a 64-bit ELF image".into());
    }
    let (shoff, shentsize, shnum, shstrndx) =
        (b.u64(0x28)? as usize, b.u16(0x3a)? as usize, b.u16(0x3c)?, b.u16(0x3e)?);
    let raw: Vec<(u32, u32, usize, usize)> = (0..shnum as usize)
        .map(|i| {
            let h = shoff + i * shentsize;
            Ok((b.u32(h)?, b.u32(h + 4)?, b.u64(h + 0x18)? as usize, b.u64(h + 0x20)? as usize))
        })
        .collect::<Result<_, String>>()?;
    let names = raw.get(shstrndx as usize).ok_or("no section-name table")?.2;
    raw.iter()
        .map(|&(name, kind, offset, size)| {
            Ok(Section { name: b.cstr(names + name as usize)?.to_string(), kind, offset, size })
        })
        .collect()
}

/// Reads the facts of every kernel of a CUBIN (ptxas's fields left 0).
pub fn facts_of(cubin: &[u8]) -> Result<Vec<KernelFacts>, String> {
    let b = Bytes(cubin);
    let secs = sections(&b)?;
    let data = |s: &Section| -> Result<&[u8], String> {
        cubin.get(s.offset..s.offset + s.size).ok_or_else(|| format!("section {} past the end", s.name))
    };
    // Function symbols by index.
    let symtab = secs.iter().find(|s| s.kind == SHT_SYMTAB).ok_or("no symbol table")?;
    let strtab = secs.iter().find(|s| s.name == ".strtab").ok_or("no string table")?;
    let mut funcs: BTreeMap<u32, KernelFacts> = BTreeMap::new();
    for (i, sym) in data(symtab)?.chunks_exact(24).enumerate() {
        let s = Bytes(sym);
        if sym[4] & 0xf == STT_FUNC {
            let name = b.cstr(strtab.offset + s.u32(0)? as usize)?.to_string();
            funcs.insert(i as u32, KernelFacts { name, ..Default::default() });
        }
    }
    // Kernels (entry points) have a `.nv.info.<name>` section; other functions (device
    // functions ptxas kept out of line) are not launched.
    funcs.retain(|_, f| secs.iter().any(|s| s.name.strip_prefix(".nv.info.") == Some(f.name.as_str())));
    for sec in &secs {
        if sec.name == ".nv.info" {
            for (attr, value) in attributes(data(sec)?)? {
                let v = Bytes(value);
                if let (EIATTR_REGCOUNT | EIATTR_FRAME_SIZE, Ok(sym), Ok(n)) = (attr, v.u32(0), v.u32(4)) {
                    if let Some(f) = funcs.get_mut(&sym) {
                        if attr == EIATTR_REGCOUNT {
                            f.registers = n;
                        } else {
                            f.frame_bytes = n;
                        }
                    }
                }
            }
        } else if let Some(kernel) = sec.name.strip_prefix(".nv.info.") {
            let Some(f) = funcs.values_mut().find(|f| f.name == kernel) else { continue };
            for (attr, v) in attributes(data(sec)?)? {
                let v = Bytes(v);
                match attr {
                    EIATTR_MAX_THREADS => f.max_threads = Some(v.u32(0)? * v.u32(4)? * v.u32(8)?),
                    EIATTR_MAXREG_COUNT => f.max_registers = v.u16(0)? as u32,
                    _ => {}
                }
            }
        } else if let Some(kernel) = sec.name.strip_prefix(".nv.shared.") {
            if sec.kind == SHT_NOBITS {
                funcs.values_mut().filter(|f| f.name == kernel).for_each(|f| f.shared_section_bytes = sec.size as u32);
            }
        }
    }
    Ok(funcs.into_values().collect())
}

/// The `(attribute, value)` pairs of a `.nv.info` section.
fn attributes(d: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let b = Bytes(d);
    let mut out = vec![];
    let mut at = 0;
    while at + 4 <= d.len() {
        let (format, attr) = (d[at], d[at + 1]);
        if format == EIFMT_SVAL {
            let len = b.u16(at + 2)? as usize;
            let value = d.get(at + 4..at + 4 + len).ok_or("attribute past the end of .nv.info")?;
            out.push((attr, value));
            at += 4 + len;
        } else {
            out.push((attr, &d[at + 2..at + 4]));
            at += 4;
        }
    }
    Ok(out)
}

/// Fills the ptxas fields of `kernels` from NVRTC's log of a `--ptxas-options=-v` compile:
/// `Compiling entry function 'k' for 'sm_90'`, then `N bytes stack frame, N bytes spill
/// stores, N bytes spill loads` and `Used N registers, ..., N bytes smem`.
pub fn merge_ptxas_report(kernels: &mut [KernelFacts], log: &str) {
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split(|c: char| !c.is_ascii_digit()).rev().find(|w| !w.is_empty())?.parse().ok()
    };
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("");
            current = kernels.iter().position(|k| k.name == name);
        } else if let Some(k) = current.map(|i| &mut kernels[i]) {
            if line.contains("spill stores") {
                k.spill_store_bytes = number_before(line, " bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, " bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used ") {
                k.ptxas_registers = number_before(line, " registers").unwrap_or(0);
                k.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_lines_are_read_per_function() {
        let mut k = vec![
            KernelFacts { name: "a_f32".into(), ..Default::default() },
            KernelFacts { name: "b_f32".into(), ..Default::default() },
        ];
        let log = "ptxas info    : Compiling entry function 'b_f32' for 'sm_90'\n\
                   ptxas info    : Function properties for b_f32\n\
                   ptxas         .     16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 72 registers, used 1 barriers, 8320 bytes smem\n\
                   ptxas info    : Compiling entry function 'a_f32' for 'sm_90'\n\
                   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 10 registers, used 0 barriers\n";
        merge_ptxas_report(&mut k, log);
        assert_eq!(
            (k[1].spill_store_bytes, k[1].spill_load_bytes, k[1].ptxas_registers, k[1].shared_bytes),
            (8, 12, 72, 8320)
        );
        assert_eq!((k[0].spill_store_bytes, k[0].ptxas_registers, k[0].shared_bytes), (0, 10, 0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(facts_of(b"not an elf").is_err());
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[0x28] = 0xff;
        elf[0x3c] = 3;
        assert!(facts_of(&elf).is_err());
    }
}

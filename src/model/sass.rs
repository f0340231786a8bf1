//! Facts from the machine code (SASS) of each kernel, where NVIDIA's disassembler is installed
//! (`nvdisasm`, from the PyPI wheel `nvidia-cuda-nvdisasm`; `scripts/nvrtc-env.sh` installs it
//! with NVRTC): tensor-core instructions, 128-bit loads, local-memory traffic, and the share of
//! FFMA among the instructions of the kernel's hottest loop.
//!
//! That share is the issue-bound ceiling of an FP32 kernel: a Hopper SM partition issues one
//! warp instruction per clock and has 32 FP32 lanes, so only a loop of nothing but FFMA reaches
//! the FP32 peak (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table:
//! 128 FP32 FMA per clock per SM on 9.0; Hopper whitepaper: four partitions of 32 FP32 units).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the disassembly says about one kernel function.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SassFacts {
    /// Instructions (NOPs not counted).
    pub instructions: u32,
    /// FP32 fused multiply-adds.
    pub ffma: u32,
    /// FP64 fused multiply-adds.
    pub dfma: u32,
    /// Tensor-core instructions (`HMMA`, `HGMMA`, `IMMA`, `DMMA`, ...).
    pub tensor: u32,
    /// Global loads, and of them 128-bit ones (`LDG.E.128`).
    pub ldg: u32,
    /// 128-bit global loads.
    pub ldg128: u32,
    /// Shared loads, and of them 128-bit ones (`LDS.128`).
    pub lds: u32,
    /// 128-bit shared loads.
    pub lds128: u32,
    /// Local loads and stores (`LDL`, `STL`): spills or arrays in local memory.
    pub local: u32,
    /// Instructions in the hottest loop: the loop (a backward branch) holding the most
    /// FFMA/DFMA, or 0 when there is none.
    pub loop_instructions: u32,
    /// FFMA and DFMA in that loop.
    pub loop_fma: u32,
    /// Instructions in the loop holding the most tensor-core instructions (0 when none does).
    pub tensor_loop_instructions: u32,
    /// Tensor-core instructions in that loop.
    pub loop_tensor: u32,
}

impl SassFacts {
    /// FMA share of the hottest loop's instructions (0 without a loop).
    pub fn loop_fma_share(&self) -> f64 {
        if self.loop_instructions == 0 {
            0.0
        } else {
            self.loop_fma as f64 / self.loop_instructions as f64
        }
    }
}

/// Where `name` (`nvdisasm`, `cuobjdump`) is: `$VAECUDA_CUDA_TOOLS`, the `PATH`, a CUDA
/// toolkit, or the wheel `scripts/nvrtc-env.sh` installs into `.cache/cudatools`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![];
    if let Some(d) = std::env::var_os("VAECUDA_CUDA_TOOLS") {
        dirs.push(d.into());
    }
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    dirs.push("/usr/local/cuda/bin".into());
    for root in [Path::new(env!("CARGO_MANIFEST_DIR")), Path::new(".")] {
        if let Ok(rd) = std::fs::read_dir(root.join(".cache/cudatools/nvidia")) {
            dirs.extend(rd.flatten().map(|e| e.path().join("bin")));
        }
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Disassembles a CUBIN with `nvdisasm` and reads every function's facts; `None` when
/// nvdisasm is not installed, an error when it fails.
pub fn sass_facts(cubin: &[u8]) -> Option<Result<BTreeMap<String, SassFacts>, String>> {
    let tool = find_tool("nvdisasm")?;
    let run = || -> Result<BTreeMap<String, SassFacts>, String> {
        let dir = std::env::temp_dir().join(format!("vaecuda-sass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join(format!("{:?}.cubin", std::thread::current().id()).replace(['(', ')'], ""));
        std::fs::write(&path, cubin).map_err(|e| e.to_string())?;
        let out = Command::new(&tool).arg("-c").arg(&path).output();
        let _ = std::fs::remove_file(&path);
        let out = out.map_err(|e| format!("{}: {e}", tool.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed: {}", tool.display(), String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(parse(&String::from_utf8_lossy(&out.stdout)))
    };
    Some(run())
}

/// One instruction: its address and opcode (with modifiers, predicate stripped), and the
/// label a branch goes to.
struct Instr {
    addr: u32,
    opcode: String,
    target: Option<String>,
}

/// Reads `nvdisasm -c` output: `.text.<function>` sections of `/*addr*/ OPCODE ... ;` lines
/// and `.L_x_N:` labels.
pub fn parse(text: &str) -> BTreeMap<String, SassFacts> {
    let mut funcs: BTreeMap<String, (Vec<Instr>, BTreeMap<String, u32>)> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut pending_labels: Vec<String> = vec![];
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("//--------------------- .text.") {
            current = rest.split_whitespace().next().map(str::to_string);
            pending_labels.clear();
            continue;
        }
        let Some(name) = current.clone() else { continue };
        let entry = funcs.entry(name).or_default();
        if let Some(label) = t.strip_suffix(':').filter(|l| l.starts_with(".L")) {
            pending_labels.push(label.to_string());
            continue;
        }
        let Some(rest) = t.strip_prefix("/*") else { continue };
        let Some((addr, body)) = rest.split_once("*/") else { continue };
        let Ok(addr) = u32::from_str_radix(addr.trim(), 16) else { continue };
        for l in pending_labels.drain(..) {
            entry.1.insert(l, addr);
        }
        let mut words = body.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.starts_with('@')) {
            words.next();
        }
        let Some(opcode) = words.next() else { continue };
        let target = body.split("`(").nth(1).and_then(|r| r.split(')').next()).map(str::to_string);
        entry.0.push(Instr { addr, opcode: opcode.trim_end_matches(';').to_string(), target });
    }
    funcs.into_iter().map(|(name, (instrs, labels))| (name, facts(&instrs, &labels))).collect()
}

fn facts(instrs: &[Instr], labels: &BTreeMap<String, u32>) -> SassFacts {
    let base = |op: &str| op.split('.').next().unwrap_or("").to_string();
    let is_fma = |op: &str| matches!(base(op).as_str(), "FFMA" | "DFMA");
    let is_tensor =
        |op: &str| matches!(base(op).as_str(), "HMMA" | "HGMMA" | "IMMA" | "IGMMA" | "DMMA" | "BMMA" | "QGMMA");
    let mut f = SassFacts::default();
    for i in instrs.iter().filter(|i| base(&i.opcode) != "NOP") {
        f.instructions += 1;
        let b = base(&i.opcode);
        let wide = i.opcode.split('.').any(|m| m == "128");
        match b.as_str() {
            "FFMA" => f.ffma += 1,
            "DFMA" => f.dfma += 1,
            _ if is_tensor(&i.opcode) => f.tensor += 1,
            "LDG" => {
                f.ldg += 1;
                f.ldg128 += wide as u32;
            }
            "LDS" => {
                f.lds += 1;
                f.lds128 += wide as u32;
            }
            "LDL" | "STL" => f.local += 1,
            _ => {}
        }
    }
    // Loops: a branch to a label at or before it. The hottest holds the most FMAs; among
    // equals, the shortest (the innermost).
    for br in instrs.iter().filter(|i| base(&i.opcode) == "BRA") {
        let Some(start) = br.target.as_ref().and_then(|t| labels.get(t)).copied().filter(|&s| s < br.addr) else {
            continue;
        };
        let body: Vec<&Instr> =
            instrs.iter().filter(|i| i.addr >= start && i.addr <= br.addr && base(&i.opcode) != "NOP").collect();
        let fma = body.iter().filter(|i| is_fma(&i.opcode)).count() as u32;
        let n = body.len() as u32;
        if fma > f.loop_fma || (fma == f.loop_fma && fma > 0 && n < f.loop_instructions) {
            (f.loop_fma, f.loop_instructions) = (fma, n);
        }
        let tensor = body.iter().filter(|i| is_tensor(&i.opcode)).count() as u32;
        if tensor > f.loop_tensor || (tensor == f.loop_tensor && tensor > 0 && n < f.tensor_loop_instructions) {
            (f.loop_tensor, f.tensor_loop_instructions) = (tensor, n);
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
//--------------------- .text.k_f32              --------------------------
k_f32:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_1:
        /*0020*/                   LDS R8, [R3] ;
        /*0030*/                   FFMA R9, R8, R8, R9 ;
        /*0040*/                   FFMA R10, R8, R9, R10 ;
        /*0050*/              @!P0 BRA `(.L_x_1) ;
        /*0060*/                   STL [R1], R9 ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
        /*0090*/                   NOP;
//--------------------- .text.m_f32              --------------------------
        /*0000*/                   HMMA.16816.F32 R0, R4, R8, R0 ;
        /*0010*/                   LDS.128 R4, [R2] ;
.L_x_3:
        /*0020*/                   LDS R4, [R2] ;
        /*0030*/                   HMMA.1688.F32.TF32 R0, R4, R8, R0 ;
        /*0040*/                   HMMA.1688.F32.TF32 R0, R4, R8, R0 ;
        /*0050*/                   BRA `(.L_x_3) ;
";

    #[test]
    fn counts_instructions_and_finds_the_loop() {
        let f = parse(LISTING);
        let k = &f["k_f32"];
        assert_eq!((k.instructions, k.ffma, k.ldg, k.ldg128, k.lds, k.lds128, k.local), (9, 2, 1, 1, 1, 0, 1));
        // The loop is 0x20..=0x50: LDS, FFMA, FFMA, BRA; the self-branch at 0x80 holds no FMA.
        assert_eq!((k.loop_instructions, k.loop_fma), (4, 2));
        assert!((k.loop_fma_share() - 0.5).abs() < 1e-12);
        let m = &f["m_f32"];
        assert_eq!((m.tensor, m.lds128, m.loop_instructions), (3, 1, 0));
        assert_eq!((m.loop_tensor, m.tensor_loop_instructions), (2, 4));
    }
}

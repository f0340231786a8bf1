//! The machines the model knows: the H200's datasheet rates and launch costs, and the
//! per-multiprocessor limits of sm_90 (and sm_80, for the static checks).
//!
//! **Honesty rule.** These numbers were fixed, each with its source, before any kernel was
//! tuned against the model. They change only with a cited source or a measurement on the GPU,
//! and each change is recorded in `bench/results/` with the model's figures before and after.
//! Datasheet rates are peaks ("up to"); where a measurement exists it replaces them.

/// What the model needs of a GPU: its rates, its size and its launch costs.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Machine {
    /// Its name, as the report prints it.
    pub name: &'static str,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Dense FP32 rate on the CUDA cores (FFMA), FLOP/s.
    pub fp32_flops: f64,
    /// Dense FP64 rate on the CUDA cores, FLOP/s (the batch-norm and reduction kernels
    /// accumulate in double).
    pub fp64_flops: f64,
    /// Dense TF32 tensor-core rate, FLOP/s (what an FP32 GEMM on tensor cores could reach).
    pub tf32_flops: f64,
    /// Dense BF16 tensor-core rate, FLOP/s.
    pub bf16_flops: f64,
    /// Device memory bandwidth, bytes/s.
    pub dram_bytes_per_s: f64,
    /// Host↔device bandwidth one way, bytes/s.
    pub pcie_bytes_per_s: f64,
    /// Host CPU time to issue one launch, memset or copy on a stream, seconds.
    pub host_issue_s: f64,
    /// Device time between two back-to-back kernels of one stream, eager launches, seconds.
    pub device_gap_eager_s: f64,
    /// Device time between two kernel nodes of one CUDA graph, seconds.
    pub device_gap_graph_s: f64,
    /// Host and dispatch time of one `cuGraphLaunch` (one per step under a graph), seconds.
    pub graph_launch_s: f64,
    /// One host wait on the stream (`cuStreamSynchronize` round trip), seconds.
    pub sync_s: f64,
    /// Its multiprocessors' limits.
    pub sm: SmLimits,
}

/// The NVIDIA H200 SXM (141 GB HBM3e), as the model prices it.
///
/// Sources, per field:
/// - `sms` = 132: NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), "H100 SXM5: 132
///   SMs"; the H200 is the same GH100 configuration with HBM3e memory (NVIDIA H200 product
///   page, <https://www.nvidia.com/en-us/data-center/h200/>), and `deviceQuery` on an H200
///   reports 132 multiprocessors.
/// - `fp32_flops` = 67 TFLOP/s, `fp64_flops` = 34 TFLOP/s, `tf32_flops` = 494.5 TFLOP/s
///   (989 "with sparsity", halved: dense), `bf16_flops` = 989.5 TFLOP/s (1,979 with sparsity),
///   `dram_bytes_per_s` = 4.8 TB/s: NVIDIA H200 Tensor Core GPU datasheet and product page,
///   "Technical Specifications", H200 SXM column.
/// - `pcie_bytes_per_s` = 64 GB/s: same table, "PCIe Gen5: 128 GB/s" (both directions).
/// - `host_issue_s` = 4.0 µs: a public measurement of one kernel submission through the CUDA
///   runtime and driver, "about 4–6 µs" (pegainfer, "From Launch Overhead to CUDA Graph",
///   susun-blog.com/blog/pegainfer-3-cuda-graph, CUDA 13.0, driver 580), the lower end; it
///   agrees with 28.3 µs − 24 µs = 4.3 µs for a direct `cuLaunchKernel` of a 24 µs kernel on a
///   B200 (dogacel.github.io, "Four counter-intuitive lessons from deep-diving GPU kernel
///   dispatch overhead", 2026-03-14).
/// - `device_gap_eager_s` = 0.9 µs and `device_gap_graph_s` = 0.5 µs: NVIDIA Technical Blog,
///   "Getting Started with CUDA Graphs" (A. Gray, 2019): a 2.9 µs kernel took 3.8 µs per
///   launch back-to-back on a stream and 3.4 µs per node in a graph.
/// - `graph_launch_s` = 1.8 µs: the B200 measurement above, 25.8 µs − 24 µs for the same
///   kernel dispatched as a graph.
/// - `sync_s` = 5.8 µs: the CUDA Graphs blog above, 9.6 µs per kernel with a
///   `cudaStreamSynchronize` after each against 3.8 µs without.
/// - `sm`: [`SM_90`].
pub const H200: Machine = Machine {
    name: "NVIDIA H200 SXM",
    sms: 132,
    fp32_flops: 67e12,
    fp64_flops: 34e12,
    tf32_flops: 494.5e12,
    bf16_flops: 989.5e12,
    dram_bytes_per_s: 4.8e12,
    pcie_bytes_per_s: 64e9,
    host_issue_s: 4.0e-6,
    device_gap_eager_s: 0.9e-6,
    device_gap_graph_s: 0.5e-6,
    graph_launch_s: 1.8e-6,
    sync_s: 5.8e-6,
    sm: SM_90,
};

/// What one multiprocessor holds at once: the limits occupancy is computed from.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SmLimits {
    /// The architecture, `sm_90`.
    pub arch: &'static str,
    /// Resident threads per SM.
    pub max_threads: u32,
    /// Resident blocks per SM.
    pub max_blocks: u32,
    /// 32-bit registers per SM.
    pub registers: u32,
    /// Registers are allocated per warp in units of this many.
    pub register_unit: u32,
    /// Most registers one thread may use.
    pub max_registers_per_thread: u32,
    /// Shared memory per SM, bytes (the most the L1/shared carve-out gives).
    pub shared_bytes: u32,
    /// Shared memory the system reserves per block, bytes.
    pub reserved_shared_per_block: u32,
    /// Shared memory is allocated in units of this many bytes.
    pub shared_unit: u32,
}

/// Compute capability 9.0 (Hopper). Source: CUDA C++ Programming Guide, "Technical
/// Specifications per Compute Capability" (2048 threads, 32 blocks, 64 K 32-bit registers,
/// 255 registers per thread, 228 KB shared memory per SM, 1 KB reserved per block) and the
/// CUDA Occupancy Calculator's allocation granularities (registers: 256 per warp; shared
/// memory: 128 bytes).
pub const SM_90: SmLimits = SmLimits {
    arch: "sm_90",
    max_threads: 2048,
    max_blocks: 32,
    registers: 65536,
    register_unit: 256,
    max_registers_per_thread: 255,
    shared_bytes: 228 * 1024,
    reserved_shared_per_block: 1024,
    shared_unit: 128,
};

/// Compute capability 8.0 (A100), for the static checks. Same sources as [`SM_90`]; 164 KB
/// shared memory per SM.
pub const SM_80: SmLimits = SmLimits {
    arch: "sm_80",
    max_threads: 2048,
    max_blocks: 32,
    registers: 65536,
    register_unit: 256,
    max_registers_per_thread: 255,
    shared_bytes: 164 * 1024,
    reserved_shared_per_block: 1024,
    shared_unit: 128,
};

impl SmLimits {
    /// The limits of `arch` (`sm_90`, `sm_80`).
    pub fn of(arch: &str) -> Option<SmLimits> {
        [SM_90, SM_80].into_iter().find(|s| s.arch == arch)
    }

    /// Blocks of `threads` threads using `registers` registers each and `shared` bytes of
    /// shared memory per block (static + dynamic, without the system's reserve) that one SM
    /// holds at once: the least of the thread, block, register and shared-memory limits
    /// (the Occupancy Calculator's rule, registers allocated per warp). 0: it cannot run.
    pub fn blocks_per_sm(&self, threads: u32, registers: u32, shared: u32) -> u32 {
        if threads == 0 || registers > self.max_registers_per_thread {
            return 0;
        }
        let warps = threads.div_ceil(32);
        let regs_per_warp = (registers.max(1) * 32).div_ceil(self.register_unit) * self.register_unit;
        let by_registers = (self.registers / regs_per_warp) / warps;
        let smem = (shared + self.reserved_shared_per_block).div_ceil(self.shared_unit) * self.shared_unit;
        let by_shared = self.shared_bytes / smem;
        (self.max_threads / threads).min(self.max_blocks).min(by_registers).min(by_shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-worked occupancies on sm_90.
    #[test]
    fn occupancy_takes_the_tightest_limit() {
        // 256 threads, 32 registers: 8 warps × 1024 registers; threads allow 8 blocks.
        assert_eq!(SM_90.blocks_per_sm(256, 32, 0), 8);
        // 64 registers: 2048 per warp, 32 warps fit, 4 blocks of 8 warps.
        assert_eq!(SM_90.blocks_per_sm(256, 64, 0), 4);
        // 65 registers round up to 72 per thread (2304 per warp): 28 warps, 3 blocks.
        assert_eq!(SM_90.blocks_per_sm(256, 65, 0), 3);
        // Shared memory: 100 KB + 1 KB reserved per block, 228 KB per SM: 2 blocks.
        assert_eq!(SM_90.blocks_per_sm(128, 16, 100 * 1024), 2);
        // sm_80 has 164 KB: 1 block.
        assert_eq!(SM_80.blocks_per_sm(128, 16, 100 * 1024), 1);
        // Small blocks hit the 32-block limit.
        assert_eq!(SM_90.blocks_per_sm(32, 16, 0), 32);
        assert_eq!(SM_90.blocks_per_sm(256, 256, 0), 0);
    }
}

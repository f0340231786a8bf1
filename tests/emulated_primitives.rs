//! The emulated device's warps, shared memory, launch limits and undefined-behaviour checks,
//! proven with small test kernels: each program here is compiled by NVRTC for sm_90 (the
//! CUBIN the driver loads, and reads the kernels' limits from) and built for the host from the
//! same text (`emu::load_program`), then run through cudarc like the project's kernels.
//! Results are checked against the PTX ISA's and the CUDA programming guide's definitions,
//! written out here independently of `kernels/emu/warps.h`. Undefined behaviour must fail the
//! launch with a message naming the kernel, block, lane and source line.
//!
//! `the_emulator_catches_planted_bugs` plants one bug per part (`VAECUDA_PLANT`) and requires
//! the test that covers that part to fail.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use vaecuda::backend::cuda::{compile, emu};

/// One bug planted on purpose: in program `program`, `from` (which must occur) becomes `to`.
struct Plant {
    name: &'static str,
    program: &'static str,
    from: &'static str,
    to: &'static str,
}

const PLANTS: &[Plant] = &[
    Plant { name: "shuffle-offset", program: "warps.cu", from: "v, o);", to: "v, o + 1);" },
    Plant { name: "no-syncwarp", program: "warps.cu", from: "__syncwarp(); // sw", to: "" },
    Plant { name: "mask-missing-lane", program: "warps.cu", from: "FULL 0xffffffffu", to: "FULL 0x7fffffffu" },
    Plant {
        name: "unwritten-shared",
        program: "shared.cu",
        from: "s[t] = i < n ? x[i] : 0.f;",
        to: "if (i < n) s[t] = x[i];",
    },
    Plant { name: "shared-one-past", program: "shared.cu", from: "(t + 1 < 64)", to: "(t + 1 <= 64)" },
    Plant {
        name: "above-launch-bounds",
        program: "limits.cu",
        from: "__launch_bounds__(128)",
        to: "__launch_bounds__(64)",
    },
    Plant { name: "misaligned-float4", program: "limits.cu", from: "x + 4 * i)", to: "x + 4 * i + 1)" },
    Plant {
        name: "fragment-by-position",
        program: "tensor.cu",
        from: "D[g * 8 + 2 * t] = d[0]; D[g * 8 + 2 * t + 1] = d[1];",
        to: "D[g * 8 + 2 * t] = d[1]; D[g * 8 + 2 * t + 1] = d[0];",
    },
    Plant { name: "async-read-before-wait", program: "async.cu", from: "CP_WAIT(1); // the first tile", to: "" },
    // Not in a kernel: the graph test synchronizes its stream in the middle of a capture.
    Plant { name: "sync-in-capture", program: "", from: "", to: "" },
];

/// Whether the bug `name` is planted in this process.
fn planted(name: &str) -> bool {
    std::env::var("VAECUDA_PLANT").is_ok_and(|p| p == name)
}

/// The device, once per process; None (the test returns) where the emulator or NVRTC is
/// missing outside CI.
fn device() -> Option<(Arc<CudaContext>, Arc<CudaStream>)> {
    static DEVICE: OnceLock<Option<(Arc<CudaContext>, Arc<CudaStream>)>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let ready = emu::install().and_then(|()| compile::nvrtc_version().map(|_| ()));
            match ready {
                Ok(()) => {
                    let ctx = CudaContext::new(0).expect("open the emulated device");
                    let stream = ctx.default_stream();
                    Some((ctx, stream))
                }
                Err(e) if std::env::var_os("CI").is_some() => {
                    panic!("the emulated device is unavailable under CI: {e}")
                }
                Err(e) => {
                    eprintln!("note: emulated-primitive tests skipped: {e}");
                    None
                }
            }
        })
        .clone()
}

/// Launches that are expected to fail leave a sticky error; tests that expect one hold this
/// lock and clear the error afterwards, so the others never see it.
static LAUNCHING: Mutex<()> = Mutex::new(());

/// A compiled test program: NVRTC's CUBIN loaded by the driver, the host build registered.
fn program(ctx: &Arc<CudaContext>, name: &str, source: &str, kernels: &[&str]) -> Arc<CudaModule> {
    let mut text = source.to_string();
    if let Ok(plant) = std::env::var("VAECUDA_PLANT") {
        for p in PLANTS.iter().filter(|p| p.name == plant && p.program == name && !p.from.is_empty()) {
            assert!(text.contains(p.from), "plant {}: {:?} is not in {name}", p.name, p.from);
            text = text.replace(p.from, p.to);
        }
    }
    emu::load_program(name, &text, kernels).unwrap_or_else(|e| panic!("{e}"));
    let cubin = compile::compile_program(name, &text, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin.binary)).unwrap()
}

fn cfg(blocks: u32, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared }
}

/// What became of a launch, as text: "the launch succeeded", or the error's code and the
/// emulator's message (the error is then cleared).
fn outcome<T>(stream: &Arc<CudaStream>, launched: Result<T, cudarc::driver::DriverError>) -> String {
    let text = match launched.and_then(|_| stream.synchronize()) {
        Ok(()) => "the launch succeeded".to_string(),
        Err(e) => format!("{e:?}"),
    };
    emu::clear_error().unwrap();
    text
}

/// Launches kernel `f` with `cfg` and the arguments, and returns its [`outcome`].
macro_rules! launch {
    ($stream:expr, $f:expr, $cfg:expr, $($arg:expr),*) => {{
        let mut b = $stream.launch_builder(&$f);
        $(b.arg($arg);)*
        // SAFETY: each test kernel is given exactly the arguments it takes, with buffers of
        // the sizes it reads and writes (or, on purpose, too small: the emulator catches it).
        outcome(&$stream, unsafe { b.launch($cfg) })
    }};
}

// ---- warps ----

const WARPS: &str = r#"
#define FULL 0xffffffffu
// Every shuffle of value 7·t + 3 for widths 1..32 and operands 0..33: out[((w·34 + b)·4 + mode)·n + t].
extern "C" __global__ void shfl_table(int* out) {
    int t = threadIdx.x, n = blockDim.x, v = 7 * t + 3, k = 0;
    for (int w = 1; w <= 32; w *= 2) {
        for (int b = 0; b < 34; ++b, ++k) {
            out[(k * 4 + 0) * n + t] = __shfl_sync(0xffffffffu, v, b, w);
            out[(k * 4 + 1) * n + t] = __shfl_up_sync(0xffffffffu, v, b, w);
            out[(k * 4 + 2) * n + t] = __shfl_down_sync(0xffffffffu, v, b, w);
            out[(k * 4 + 3) * n + t] = __shfl_xor_sync(0xffffffffu, v, b, w);
        }
    }
}
// Partial masks: odd and even lanes shuffle and vote apart; the first ten lanes ask who is active.
extern "C" __global__ void partial(int* out, long long* wide) {
    int t = threadIdx.x, lane = t & 31, v = 7 * t + 3;
    if (lane & 1) {
        out[t] = __shfl_xor_sync(0xaaaaaaaau, v, 2);
        out[64 + t] = (int)__ballot_sync(0xaaaaaaaau, lane % 3 == 0);
    } else {
        out[t] = __shfl_down_sync(0x55555555u, v, 4, 16);
        out[64 + t] = __any_sync(0x55555555u, lane == 6) + 10 * __all_sync(0x55555555u, lane < 40);
    }
    out[128 + t] = lane < 10 ? (int)__activemask() : 0;
    double d = __shfl_sync(0xffffffffu, 0.5 + t, 31 - lane);
    wide[t] = (long long)(d * 2) + __shfl_up_sync(0xffffffffu, 1000000000000ll * t, 1);
}
// Sum of each block of 128 values: shuffles within each warp, then warp 0 over the warps.
extern "C" __global__ void warp_sum(const float* x, float* y) {
    __shared__ float part[4];
    int t = threadIdx.x;
    float v = x[blockIdx.x * 128 + t];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL, v, o);
    if ((t & 31) == 0) part[t / 32] = v;
    __syncthreads();
    if (t < 32) {
        v = t < 4 ? part[t] : 0.f;
        for (int o = 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
        if (t == 0) y[blockIdx.x] = v;
    }
}
// The same sum per warp through shared memory, each step fenced by __syncwarp.
extern "C" __global__ void warp_sum_shared(const float* x, float* y) {
    __shared__ float s[64];
    int t = threadIdx.x, lane = t & 31;
    s[t] = x[blockIdx.x * 64 + t];
    __syncwarp(); // sw
    for (int o = 16; o > 0; o >>= 1) {
        float other = lane < o ? s[t + o] : 0.f;
        __syncwarp(); // sw
        if (lane < o) s[t] += other;
        __syncwarp(); // sw
    }
    if (lane == 0) y[blockIdx.x * 2 + t / 32] = s[t];
}
// Undefined behaviour, one case per `which`.
extern "C" __global__ void misuse(int which, int* out) {
    int t = threadIdx.x, lane = t & 31, v = t;
    switch (which) {
        case 0: v = __shfl_sync(0xfffffffeu, v, 1); break;
        case 1: v = __shfl_sync(lane == 3 ? 0x0000ffffu : 0xffffffffu, v, 0); break;
        case 2: if (lane == 5) return; __syncwarp(); break;
        case 3: if (lane < 16) v = __shfl_sync(0x0000ffffu, v, 20); break;
        case 4: if (lane == 0) __syncthreads(); else __syncwarp(); break;
        case 5: v = __shfl_down_sync(0xffffffffu, v, 1, 12); break;
        case 6: v = __shfl_sync(0xffffffffu, v, 1); break;
    }
    out[t] = v;
}
"#;
const WARP_KERNELS: &[&str] = &["shfl_table", "partial", "warp_sum", "warp_sum_shared", "misuse"];

/// The source lane of each shuffle mode as the CUDA programming guide defines it (warp
/// shuffle functions): lanes form segments of `width`; a source outside the caller's segment
/// (or, for xor, in a later segment) leaves the caller its own value.
fn guide_source(mode: usize, lane: usize, b: usize, width: usize) -> usize {
    let start = lane / width * width;
    match mode {
        0 => start + b % width,
        1 if b < 32 && lane - start >= b => lane - b,
        2 if b < 32 && lane - start + b < width => lane + b,
        3 if b < 32 && (lane ^ b) < start + width => lane ^ b,
        _ => lane,
    }
}

#[test]
fn shuffles_follow_the_ptx_definition_for_every_width_and_operand() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "warps.cu", WARPS, WARP_KERNELS);
    let n = 64usize;
    let rows = 6 * 34 * 4;
    let mut out = stream.alloc_zeros::<i32>(rows * n).unwrap();
    let f = m.load_function("shfl_table").unwrap();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut out);
    // SAFETY: shfl_table writes rows·n ints.
    unsafe { b.launch(cfg(1, n as u32, 0)) }.unwrap();
    let got = stream.clone_dtoh(&out).unwrap();
    let mut wrong = vec![];
    for (wi, width) in [1usize, 2, 4, 8, 16, 32].into_iter().enumerate() {
        for b in 0..34 {
            for mode in 0..4 {
                for t in 0..n {
                    let (warp, lane) = (t / 32, t % 32);
                    // b ≥ 32 is taken modulo 32 by shfl.sync (its b[4:0]); the guide's table
                    // covers b < 32 for up, down and xor, so those compare with b mod 32.
                    let b_used = if mode == 0 { b } else { b % 32 };
                    let src = warp * 32 + guide_source(mode, lane, b_used, width);
                    let expect = 7 * src as i32 + 3;
                    let k = (wi * 34 + b) * 4 + mode;
                    if got[k * n + t] != expect && wrong.len() < 10 {
                        wrong.push(format!(
                            "mode {mode} width {width} b {b} thread {t}: {} vs {expect}",
                            got[k * n + t]
                        ));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "shuffles differ from the definition:\n{}", wrong.join("\n"));
}

#[test]
fn partial_masks_votes_activemask_and_64_bit_shuffles() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "warps.cu", WARPS, WARP_KERNELS);
    let mut out = stream.alloc_zeros::<i32>(192).unwrap();
    let mut wide = stream.alloc_zeros::<i64>(64).unwrap();
    let f = m.load_function("partial").unwrap();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut out).arg(&mut wide);
    // SAFETY: partial writes 192 ints and 64 long longs.
    unsafe { b.launch(cfg(1, 64, 0)) }.unwrap();
    let got = stream.clone_dtoh(&out).unwrap();
    let wide = stream.clone_dtoh(&wide).unwrap();
    let odd_votes = (0..32).filter(|l| l % 2 == 1 && l % 3 == 0).fold(0u32, |m, l| m | 1 << l);
    for t in 0..64usize {
        let (warp, lane) = (t / 32, t % 32);
        let value = |l: usize| 7 * (warp * 32 + l) as i32 + 3;
        if lane % 2 == 1 {
            assert_eq!(got[t], value(lane ^ 2), "xor within the odd lanes, thread {t}");
            assert_eq!(got[64 + t] as u32, odd_votes, "ballot of the odd lanes, thread {t}");
        } else {
            let src = if lane % 16 + 4 < 16 { lane + 4 } else { lane };
            assert_eq!(got[t], value(src), "down by 4 in segments of 16, thread {t}");
            assert_eq!(got[64 + t], 1 + 10, "any and all of the even lanes, thread {t}");
        }
        let active = if lane < 10 { 0x3ff } else { 0 };
        assert_eq!(got[128 + t], active, "__activemask of the first ten lanes, thread {t}");
        let d = 0.5 + (warp * 32 + 31 - lane) as f64;
        let up = if lane >= 1 { 1_000_000_000_000i64 * (t as i64 - 1) } else { 1_000_000_000_000i64 * t as i64 };
        assert_eq!(wide[t], (d * 2.0) as i64 + up, "double and long long shuffles, thread {t}");
    }
}

/// The half and bfloat16 shuffles come from CUDA's own headers (`cuda_fp16.h`, `cuda_bf16.h`),
/// which NVRTC does not build in: the program includes them from `VAECUDA_CUDA_INCLUDE`
/// (`scripts/nvrtc-env.sh` installs NVIDIA's header wheels there), for NVRTC and for the host
/// build alike. Values go in and out as raw bits, so nothing but the shuffle touches them.
const HALF: &str = r#"#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Every shuffle of a __half, __nv_bfloat16, __half2 and __nv_bfloat162 per thread for widths
// 1..32 and operands 0..33: out[((w·34 + b)·4 + mode)·n + t], the pairs packed as (y << 16) | x.
template <class T>
__device__ void shuffle_all(T v, int t, int n, int k, T* out) {
    out[(k * 4 + 0) * n + t] = __shfl_sync(0xffffffffu, v, k % 34, 1 << (k / 34));
    out[(k * 4 + 1) * n + t] = __shfl_up_sync(0xffffffffu, v, k % 34, 1 << (k / 34));
    out[(k * 4 + 2) * n + t] = __shfl_down_sync(0xffffffffu, v, k % 34, 1 << (k / 34));
    out[(k * 4 + 3) * n + t] = __shfl_xor_sync(0xffffffffu, v, k % 34, 1 << (k / 34));
}
extern "C" __global__ void shfl_half_table(__half* h, __nv_bfloat16* b, __half2* h2, __nv_bfloat162* b2) {
    int t = threadIdx.x, n = blockDim.x;
    __half_raw hr; hr.x = (unsigned short)(0x3c00 + 7 * t);
    __nv_bfloat16_raw br; br.x = (unsigned short)(0x4000 + 5 * t);
    __half2_raw h2r; h2r.x = (unsigned short)(0x4400 + t); h2r.y = (unsigned short)(0xc400 + 3 * t);
    __nv_bfloat162_raw b2r; b2r.x = (unsigned short)(0x3f00 + t); b2r.y = (unsigned short)(0xbf00 + 9 * t);
    for (int k = 0; k < 6 * 34; ++k) {
        shuffle_all(__half(hr), t, n, k, h);
        shuffle_all(__nv_bfloat16(br), t, n, k, b);
        shuffle_all(__half2(h2r), t, n, k, h2);
        shuffle_all(__nv_bfloat162(b2r), t, n, k, b2);
    }
}
"#;

/// The include flags for CUDA's headers (`-I dir -I dir/cccl`: CUDA 13 keeps `nv/target` in
/// CCCL's folder), or None where they are missing outside CI.
fn cuda_include_flags() -> Option<Vec<String>> {
    match std::env::var("VAECUDA_CUDA_INCLUDE") {
        Ok(dir) if std::path::Path::new(&dir).join("cuda_bf16.h").is_file() => {
            Some(vec![format!("-I{dir}"), format!("-I{dir}/cccl")])
        }
        _ if std::env::var_os("CI").is_some() => {
            panic!("CUDA's headers are missing under CI: source scripts/nvrtc-env.sh (it sets VAECUDA_CUDA_INCLUDE)")
        }
        _ => {
            eprintln!("note: half and bfloat16 shuffles skipped: VAECUDA_CUDA_INCLUDE is not set (source scripts/nvrtc-env.sh)");
            None
        }
    }
}

#[test]
fn half_and_bfloat16_shuffles_follow_the_ptx_definition() {
    let Some((ctx, stream)) = device() else { return };
    let Some(includes) = cuda_include_flags() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let flags: Vec<&str> = includes.iter().map(String::as_str).collect();
    emu::load_program_with("half.cu", HALF, &["shfl_half_table"], &flags).unwrap_or_else(|e| panic!("{e}"));
    let cubin = compile::compile_program_with("half.cu", HALF, "sm_90", &flags).unwrap_or_else(|e| panic!("{e}"));
    let m = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin.binary)).unwrap();
    let n = 64usize;
    let len = 6 * 34 * 4 * n;
    let mut h = stream.alloc_zeros::<u16>(len).unwrap();
    let mut b = stream.alloc_zeros::<u16>(len).unwrap();
    let mut h2 = stream.alloc_zeros::<u32>(len).unwrap();
    let mut b2 = stream.alloc_zeros::<u32>(len).unwrap();
    let f = m.load_function("shfl_half_table").unwrap();
    let mut l = stream.launch_builder(&f);
    l.arg(&mut h).arg(&mut b).arg(&mut h2).arg(&mut b2);
    // SAFETY: shfl_half_table writes `len` elements of each output.
    unsafe { l.launch(cfg(1, n as u32, 0)) }.unwrap();
    let (h, b, h2, b2) = (
        stream.clone_dtoh(&h).unwrap(),
        stream.clone_dtoh(&b).unwrap(),
        stream.clone_dtoh(&h2).unwrap(),
        stream.clone_dtoh(&b2).unwrap(),
    );
    let value = |t: usize| {
        let t = t as u32;
        (
            (0x3c00 + 7 * t) as u16,
            (0x4000 + 5 * t) as u16,
            (0x4400 + t) | (0xc400 + 3 * t) << 16,
            (0x3f00 + t) | (0xbf00 + 9 * t) << 16,
        )
    };
    let mut wrong = vec![];
    for k in 0..6 * 34 {
        let (width, op) = (1usize << (k / 34), k % 34);
        for mode in 0..4 {
            for t in 0..n {
                let (warp, lane) = (t / 32, t % 32);
                let op_used = if mode == 0 { op } else { op % 32 };
                let src = warp * 32 + guide_source(mode, lane, op_used, width);
                let at = (k * 4 + mode) * n + t;
                let got = (h[at], b[at], h2[at], b2[at]);
                if got != value(src) && wrong.len() < 10 {
                    wrong.push(format!("mode {mode} width {width} b {op} thread {t}: {got:x?} vs {:x?}", value(src)));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "half and bfloat16 shuffles differ from the definition:\n{}", wrong.join("\n"));
}

/// The sums of 128-value blocks, by shuffles and by shared memory with __syncwarp, against
/// the host's.
#[test]
fn warp_reductions_match_the_host() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "warps.cu", WARPS, WARP_KERNELS);
    let blocks = 6usize;
    let x: Vec<f32> = (0..blocks * 128).map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0).collect();
    let dx = stream.clone_htod(&x).unwrap();
    let mut y = stream.alloc_zeros::<f32>(blocks * 2).unwrap();
    let f = m.load_function("warp_sum").unwrap();
    let mut b = stream.launch_builder(&f);
    b.arg(&dx).arg(&mut y);
    // SAFETY: warp_sum reads 128 values and writes one per block.
    let r = unsafe { b.launch(cfg(blocks as u32, 128, 0)) };
    let text = r.map(|_| ()).map_err(|e| format!("{e:?}"));
    emu::clear_error().unwrap();
    text.unwrap_or_else(|e| panic!("warp_sum failed: {e}"));
    let got = stream.clone_dtoh(&y).unwrap();
    for blk in 0..blocks {
        let want: f32 = x[blk * 128..(blk + 1) * 128].iter().sum();
        assert!((got[blk] - want).abs() < 1e-3, "warp_sum block {blk}: {} vs {want}", got[blk]);
    }
    let f = m.load_function("warp_sum_shared").unwrap();
    let mut y = stream.alloc_zeros::<f32>(blocks * 4).unwrap();
    let text = launch!(stream, f, cfg(blocks as u32 * 2, 64, 0), &dx, &mut y);
    assert_eq!(text, "the launch succeeded", "warp_sum_shared");
    let got = stream.clone_dtoh(&y).unwrap();
    for w in 0..blocks * 4 {
        let want: f32 = x[w * 32..(w + 1) * 32].iter().sum();
        assert!((got[w] - want).abs() < 1e-3, "warp_sum_shared warp {w}: {} vs {want}", got[w]);
    }
}

#[test]
fn warp_misuse_fails_the_launch_naming_kernel_block_lane_and_line() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "warps.cu", WARPS, WARP_KERNELS);
    let f = m.load_function("misuse").unwrap();
    let mut out = stream.alloc_zeros::<i32>(64).unwrap();
    let cases: &[(i32, u32, &[&str])] = &[
        (0, 32, &["__shfl_sync", "does not contain the calling lane", "lane 0 of warp 0", "0xfffffffe"]),
        (1, 32, &["disagree on the mask", "lane 3 of warp 0", "0x0000ffff"]),
        (2, 32, &["__syncwarp", "lane 5", "has exited"]),
        (3, 32, &["reads lane 20, which is not in the mask 0x0000ffff"]),
        (4, 32, &["__syncwarp", "lane 0", "__syncthreads()"]),
        (5, 32, &["width 12 is not a power of two"]),
        (6, 48, &["names lane 16, which does not exist (the block has 48 threads)"]),
    ];
    for &(which, threads, expect) in cases {
        let text = launch!(stream, f, cfg(1, threads, 0), &which, &mut out);
        for e in expect.iter().chain(&["CUDA_ERROR_LAUNCH_FAILED", "kernel misuse", "block (0,0,0)", "warps.cu:"]) {
            assert!(text.contains(e), "case {which}: expected {e:?} in: {text}");
        }
    }
}

// ---- shared memory and locals ----

const SHARED: &str = r#"
// Reads shared memory and a local array nobody wrote: out = [float, int, local] per thread.
extern "C" __global__ void unwritten(float* f, int* i, float* local) {
    __shared__ float sf[64];
    __shared__ int si[64];
    float a[4];
    int t = threadIdx.x;
    if (blockIdx.x == 0) { sf[t] = 1.f; si[t] = 1; }
    __syncthreads();
    f[blockIdx.x * 64 + t] = sf[t];
    i[blockIdx.x * 64 + t] = si[t];
    local[blockIdx.x * 64 + t] = a[t & 3];
}
// Sums of 64 values (a ragged tail reads as 0) and each value plus its right neighbour.
extern "C" __global__ void sums(const float* x, float* y, float* pairs, int n) {
    __shared__ float s[64];
    int t = threadIdx.x, i = blockIdx.x * 64 + t;
    s[t] = i < n ? x[i] : 0.f;
    __syncthreads();
    float right = (t + 1 < 64) ? s[t + 1] : 0.f;
    if (i < n) pairs[i] = s[t] + right;
    __syncthreads();
    for (int o = 32; o > 0; o >>= 1) {
        if (t < o) s[t] += s[t + o];
        __syncthreads();
    }
    if (t == 0) y[blockIdx.x] = s[0];
}
// Dynamic shared memory: each thread writes its slot and reads `reach` slots further on.
extern "C" __global__ void dynamic(int reach, float* out) {
    extern __shared__ __align__(16) float d[];
    int t = threadIdx.x;
    d[t] = (float)t;
    __syncthreads();
    out[t] = d[t + reach];
}
// Each block adds one to what the previous block wrote: a dependence between blocks of one
// launch, which a GPU never orders.
extern "C" __global__ void chain(float* y) {
    if (threadIdx.x == 0) y[blockIdx.x] = (blockIdx.x == 0 ? 0.f : y[blockIdx.x - 1]) + 1.f;
}
// Signed 32-bit arithmetic on an index.
extern "C" __global__ void index_overflow(int rows, int cols, float* out) {
    int at = rows * cols + (int)threadIdx.x;
    out[threadIdx.x] = (float)(at & 7);
}
"#;
const SHARED_KERNELS: &[&str] = &["unwritten", "sums", "dynamic", "index_overflow", "chain"];

#[test]
fn shared_memory_and_locals_start_as_poison_in_every_block() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "shared.cu", SHARED, SHARED_KERNELS);
    let f = m.load_function("unwritten").unwrap();
    let mut fo = stream.alloc_zeros::<f32>(128).unwrap();
    let mut io = stream.alloc_zeros::<i32>(128).unwrap();
    let mut lo = stream.alloc_zeros::<f32>(128).unwrap();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut fo).arg(&mut io).arg(&mut lo);
    // SAFETY: unwritten writes 64 values of each output per block.
    unsafe { b.launch(cfg(2, 64, 0)) }.unwrap();
    let (fo, io, lo) =
        (stream.clone_dtoh(&fo).unwrap(), stream.clone_dtoh(&io).unwrap(), stream.clone_dtoh(&lo).unwrap());
    assert!(fo[..64].iter().all(|&v| v == 1.0) && io[..64].iter().all(|&v| v == 1), "block 0 wrote its shared memory");
    // Block 1 (whichever CPU thread ran block 0 before it) sees poison, not block 0's values.
    assert!(fo[64..].iter().all(|v| v.is_nan()), "unwritten shared floats: {:?}", &fo[64..68]);
    assert!(io[64..].iter().all(|&v| v == -1), "unwritten shared ints: {:?}", &io[64..68]);
    assert!(lo.iter().all(|&v| v.to_bits() != 0), "uninitialized locals must not read as zero: {:?}", &lo[..4]);
}

/// The blocks of a launch run in a shuffled order (the default), so a block that reads what
/// an earlier block of the same launch wrote reads the NaN poison instead.
#[test]
fn blocks_run_in_a_shuffled_order() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "shared.cu", SHARED, SHARED_KERNELS);
    let f = m.load_function("chain").unwrap();
    // SAFETY: plain f32 bits; fresh device memory reads as NaN.
    let mut y = unsafe { stream.alloc::<f32>(64) }.unwrap();
    let text = launch!(stream, f, cfg(64, 32, 0), &mut y);
    assert_eq!(text, "the launch succeeded");
    let y = stream.clone_dtoh(&y).unwrap();
    let in_order = y.iter().enumerate().all(|(i, &v)| v == (i + 1) as f32);
    assert!(!in_order && y.iter().any(|v| v.is_nan()), "the blocks ran in grid order: {y:?}");
}

#[test]
fn shared_sums_match_the_host() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "shared.cu", SHARED, SHARED_KERNELS);
    let n = 200usize;
    let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
    let dx = stream.clone_htod(&x).unwrap();
    let mut y = stream.alloc_zeros::<f32>(4).unwrap();
    let mut pairs = stream.alloc_zeros::<f32>(n).unwrap();
    let f = m.load_function("sums").unwrap();
    let n32 = n as i32;
    let text = launch!(stream, f, cfg(4, 64, 0), &dx, &mut y, &mut pairs, &n32);
    assert_eq!(text, "the launch succeeded");
    let (y, pairs) = (stream.clone_dtoh(&y).unwrap(), stream.clone_dtoh(&pairs).unwrap());
    for blk in 0..4 {
        let want: f32 = x[(blk * 64).min(n)..((blk + 1) * 64).min(n)].iter().sum();
        assert!(y[blk] == want, "block {blk}: {} vs {want}", y[blk]);
    }
    for i in 0..n {
        let right = if i % 64 != 63 && i + 1 < n { x[i + 1] } else { 0.0 };
        assert!(pairs[i] == x[i] + right, "pair {i}: {} vs {}", pairs[i], x[i] + right);
    }
}

#[test]
fn out_of_bounds_shared_memory_and_signed_overflow_fail_the_launch() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "shared.cu", SHARED, SHARED_KERNELS);
    let mut out = stream.alloc_zeros::<f32>(64).unwrap();
    let f = m.load_function("dynamic").unwrap();
    // Within its 64 floats: fine; one past: the guard page.
    let text = launch!(stream, f, cfg(1, 32, 256), &32i32, &mut out);
    assert_eq!(text, "the launch succeeded");
    let got = stream.clone_dtoh(&out).unwrap();
    assert!(got[..32].iter().all(|v| v.is_nan()), "unwritten dynamic shared memory: {:?}", &got[..4]);
    let text = launch!(stream, f, cfg(1, 64, 256), &1i32, &mut out);
    for e in [
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        "kernel dynamic",
        "past the end of the dynamic shared memory of its block (256 bytes",
    ] {
        assert!(text.contains(e), "expected {e:?} in: {text}");
    }
    let f = m.load_function("index_overflow").unwrap();
    let text = launch!(stream, f, cfg(1, 32, 0), &65536i32, &32768i32, &mut out);
    for e in ["kernel index_overflow", "shared.cu:", "signed 32-bit integer overflow: 65536 * 32768"] {
        assert!(text.contains(e), "expected {e:?} in: {text}");
    }
}

// ---- limits ----

const LIMITS: &str = r#"
extern "C" __global__ void __launch_bounds__(128) bounded(float* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1.f; }
// Sums of four values, loaded as one float4.
extern "C" __global__ void quads(const float* x, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float4 q = *reinterpret_cast<const float4*>(x + 4 * i);
    y[i] = q.x + q.y + q.z + q.w;
}
extern "C" __global__ void big_shared(float* out) {
    extern __shared__ float d[];
    d[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = d[(threadIdx.x + 1) % blockDim.x];
}
// Many values live at once: a high register count.
extern "C" __global__ void registers(const double* x, double* out) {
    double a[48];
#pragma unroll
    for (int k = 0; k < 48; ++k) a[k] = x[k * 1024 + threadIdx.x];
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < 48; ++k) s += a[k] * a[(k * 7 + 3) % 48];
#pragma unroll
    for (int k = 0; k < 48; ++k) out[k * 1024 + threadIdx.x] = a[k] * s;
}
"#;
const LIMIT_KERNELS: &[&str] = &["bounded", "quads", "big_shared", "registers"];

#[test]
fn launches_within_the_kernels_limits_run() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "limits.cu", LIMITS, LIMIT_KERNELS);
    let mut out = stream.alloc_zeros::<f32>(1024).unwrap();
    let f = m.load_function("bounded").unwrap();
    let text = launch!(stream, f, cfg(2, 128, 0), &mut out);
    assert_eq!(text, "the launch succeeded", "a launch at __launch_bounds__(128)");
    let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let dx = stream.clone_htod(&x).unwrap();
    let f = m.load_function("quads").unwrap();
    let text = launch!(stream, f, cfg(2, 32, 0), &dx, &mut out);
    assert_eq!(text, "the launch succeeded", "aligned float4 loads");
    let got = stream.clone_dtoh(&out).unwrap();
    for i in 0..64 {
        assert_eq!(got[i], x[4 * i..4 * i + 4].iter().sum::<f32>(), "quad {i}");
    }
}

#[test]
fn launches_beyond_the_gpus_limits_fail_as_a_driver_fails_them() {
    use cudarc::driver::sys::CUfunction_attribute as A;
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "limits.cu", LIMITS, LIMIT_KERNELS);
    let mut out = stream.alloc_zeros::<f32>(64 * 1024).unwrap();
    let f = m.load_function("bounded").unwrap();
    assert_eq!(f.max_threads_per_block().unwrap(), 128, "MAX_THREADS_PER_BLOCK of __launch_bounds__(128)");
    let text = launch!(stream, f, cfg(1, 256, 0), &mut out);
    assert!(text.contains("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES") && text.contains("__launch_bounds__ of 128"), "{text}");
    let text = launch!(
        stream,
        f,
        LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1025, 1, 1), shared_mem_bytes: 0 },
        &mut out
    );
    assert!(text.contains("CUDA_ERROR_INVALID_VALUE"), "{text}");

    // Dynamic shared memory: 48 KiB without asking, up to 227 KiB after cuFuncSetAttribute.
    let f = m.load_function("big_shared").unwrap();
    let text = launch!(stream, f, cfg(1, 64, 64 << 10), &mut out);
    assert!(text.contains("CUDA_ERROR_INVALID_VALUE") && text.contains("cuFuncSetAttribute"), "{text}");
    let e = f.set_attribute(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 228 << 10).unwrap_err();
    assert!(format!("{e:?}").contains("CUDA_ERROR_INVALID_VALUE"), "{e:?}");
    f.set_attribute(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 227 << 10).unwrap();
    let text = launch!(stream, f, cfg(1, 64, 227 << 10), &mut out);
    assert_eq!(text, "the launch succeeded", "227 KiB of dynamic shared memory after asking");

    // Registers: the count comes from the CUBIN; a block that would need more than 65,536 fails.
    let f = m.load_function("registers").unwrap();
    let regs = f.num_regs().unwrap();
    let most = f.max_threads_per_block().unwrap();
    assert!(regs > 64 && most < 1024, "registers {regs}, max threads {most}");
    let x = stream.alloc_zeros::<f64>(48 * 1024).unwrap();
    let mut wide = stream.alloc_zeros::<f64>(48 * 1024).unwrap();
    let text = launch!(stream, f, cfg(1, 1024, 0), &x, &mut wide);
    assert!(text.contains("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES") && text.contains("65,536 registers"), "{text}");
    let text = launch!(stream, f, cfg(1, most as u32, 0), &x, &mut wide);
    assert_eq!(text, "the launch succeeded", "{most} threads of {regs} registers");

    // A float4 load from an address that is not a multiple of 16.
    let x = stream.alloc_zeros::<f32>(300).unwrap();
    let view = x.slice(1..);
    let f = m.load_function("quads").unwrap();
    let text = launch!(stream, f, cfg(1, 32, 0), &view, &mut out);
    for e in [
        "CUDA_ERROR_MISALIGNED_ADDRESS",
        "kernel quads",
        "misaligned access to",
        "float4",
        "16-byte alignment",
        "limits.cu:",
    ] {
        assert!(text.contains(e), "expected {e:?} in: {text}");
    }
}

// ---- tensor cores ----

const TENSOR: &str = r#"#ifdef VAECUDA_EMULATED
#define TO_TF32(x) emu_cvt_rna_tf32(x)
#define MMA_TF32(d, a, b, c) emu_mma_m16n8k8_tf32(d, a, b, c)
#else
__device__ __forceinline__ unsigned TO_TF32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void MMA_TF32(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3]));
}
#endif
// D = A·B + C for one 16×8 tile (A 16×8 and B 8×8, row-major), the fragments placed by the
// PTX ISA's tables for m16n8k8 .tf32 (written out here, apart from the emulator's body).
extern "C" __global__ void mma_tile(const float* A, const float* B, const float* C, float* D, unsigned* rounded) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    unsigned a[4] = {TO_TF32(A[g * 8 + t]), TO_TF32(A[(g + 8) * 8 + t]), TO_TF32(A[g * 8 + t + 4]),
                     TO_TF32(A[(g + 8) * 8 + t + 4])};
    unsigned b[2] = {TO_TF32(B[t * 8 + g]), TO_TF32(B[(t + 4) * 8 + g])};
    float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    float d[4];
    MMA_TF32(d, a, b, c);
    D[g * 8 + 2 * t] = d[0]; D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
    rounded[lane] = TO_TF32(A[lane]);
}
"#;

/// `cvt.rna.tf32.f32` as the PTX ISA defines it: to the nearest value with a 10-bit mantissa,
/// ties away from zero (computed on the magnitude in units of the last kept place).
fn tf32_rna(x: f32) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let exponent = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
    let unit = 2f64.powi(exponent - 10);
    let q = x.abs() as f64 / unit;
    let kept = if q - q.floor() >= 0.5 { q.floor() + 1.0 } else { q.floor() };
    (x.signum() as f64 * kept * unit) as f32
}

/// One m16n8k8 TF32 tile through the PTX fragment tables: operands rounded as
/// `cvt.rna.tf32.f32` rounds them (ties included), products exact, sum rounded once to f32.
#[test]
fn tensor_core_mma_follows_the_ptx_fragment_tables() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "tensor.cu", TENSOR, &["mma_tile"]);
    let f = m.load_function("mma_tile").unwrap();
    let tie = 2f32.powi(-11);
    let mut a: Vec<f32> =
        (0..128).map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.173 * (1.0 + (i % 7) as f32 * 3e-4)).collect();
    a[0] = 1.0 + tie; // a tie: away from zero, to 1 + 2^-10
    a[1] = -(1.0 + 3.0 * tie); // a tie below zero: to -(1 + 2^-9)
    a[2] = 1.0 + tie - 2f32.powi(-20); // just below a tie: to 1
    let b: Vec<f32> = (0..64).map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.291 * (1.0 + (i % 5) as f32 * 7e-4)).collect();
    let c: Vec<f32> = (0..128).map(|i| (i % 9) as f32 * 0.5 - 2.0).collect();
    let (da, db, dc) = (stream.clone_htod(&a).unwrap(), stream.clone_htod(&b).unwrap(), stream.clone_htod(&c).unwrap());
    let mut dd = stream.alloc_zeros::<f32>(128).unwrap();
    let mut rounded = stream.alloc_zeros::<u32>(32).unwrap();
    let text = launch!(stream, f, cfg(1, 32, 0), &da, &db, &dc, &mut dd, &mut rounded);
    assert_eq!(text, "the launch succeeded");
    let (d, rounded) = (stream.clone_dtoh(&dd).unwrap(), stream.clone_dtoh(&rounded).unwrap());
    for (i, &r) in rounded.iter().enumerate() {
        assert_eq!(f32::from_bits(r), tf32_rna(a[i]), "cvt.rna.tf32.f32 of {:e}", a[i]);
    }
    assert_eq!(tf32_rna(a[0]), 1.0 + 2.0 * tie);
    assert_eq!(tf32_rna(a[1]), -(1.0 + 4.0 * tie));
    assert_eq!(tf32_rna(a[2]), 1.0);
    for i in 0..16 {
        for j in 0..8 {
            let sum: f64 = (0..8).map(|k| tf32_rna(a[i * 8 + k]) as f64 * tf32_rna(b[k * 8 + j]) as f64).sum();
            let want = (sum + c[i * 8 + j] as f64) as f32;
            assert_eq!(d[i * 8 + j], want, "D[{i}][{j}]");
        }
    }
}

const TENSOR_BF16: &str = r#"#ifdef VAECUDA_EMULATED
#define PACK_BF16(hi, lo) emu_cvt_rn_bf16x2(hi, lo)
#define MMA_BF16(d, a, b, c) emu_mma_m16n8k16_bf16(d, a, b, c)
#else
__device__ __forceinline__ unsigned PACK_BF16(float hi, float lo) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void MMA_BF16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3]));
}
#endif
// D = A·B + C for one 16×8 tile (A 16×16, B 16×8, row-major), the fragments placed by the PTX
// ISA's tables for m16n8k16 .bf16, written out element by element (apart from the emulator's
// loops): each register packs two bf16, the lower-numbered element in the low half.
extern "C" __global__ void mma_bf16_tile(const float* A, const float* B, const float* C, float* D, unsigned* packed) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    unsigned a[4] = {PACK_BF16(A[g * 16 + 2 * t + 1], A[g * 16 + 2 * t]),                // a1:a0, row g
                     PACK_BF16(A[(g + 8) * 16 + 2 * t + 1], A[(g + 8) * 16 + 2 * t]),    // a3:a2, row g+8
                     PACK_BF16(A[g * 16 + 2 * t + 9], A[g * 16 + 2 * t + 8]),            // a5:a4, cols +8
                     PACK_BF16(A[(g + 8) * 16 + 2 * t + 9], A[(g + 8) * 16 + 2 * t + 8])};
    unsigned b[2] = {PACK_BF16(B[(2 * t + 1) * 8 + g], B[(2 * t) * 8 + g]),              // b1:b0
                     PACK_BF16(B[(2 * t + 9) * 8 + g], B[(2 * t + 8) * 8 + g])};         // b3:b2, rows +8
    float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    float d[4];
    MMA_BF16(d, a, b, c);
    D[g * 8 + 2 * t] = d[0]; D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
    packed[lane] = PACK_BF16(A[2 * lane + 1], A[2 * lane]);
}
"#;

/// `cvt.rn.bf16.f32` as defined: to the nearest value with a 7-bit mantissa, ties to the even
/// one (computed on the magnitude in units of the last kept place).
fn bf16_rne(x: f32) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let exponent = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
    let unit = 2f64.powi(exponent - 7);
    let q = x.abs() as f64 / unit;
    let (floor, rest) = (q.floor(), q - q.floor());
    let kept = if rest > 0.5 || (rest == 0.5 && floor % 2.0 == 1.0) { floor + 1.0 } else { floor };
    (x.signum() as f64 * kept * unit) as f32
}

/// One m16n8k16 BF16 tile through the PTX fragment tables: operands rounded as
/// `cvt.rn.bf16x2.f32` rounds and packs them (ties to even), products exact, sum rounded once.
#[test]
fn bf16_tensor_core_mma_follows_the_ptx_fragment_tables() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "tensor_bf16.cu", TENSOR_BF16, &["mma_bf16_tile"]);
    let f = m.load_function("mma_bf16_tile").unwrap();
    let tie = 2f32.powi(-8);
    let mut a: Vec<f32> =
        (0..256).map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.173 * (1.0 + (i % 7) as f32 * 3e-3)).collect();
    a[0] = 1.0 + tie; // a tie between 1 (even) and 1 + 2^-7: to 1
    a[1] = -(1.0 + 3.0 * tie); // a tie between 1 + 2^-7 and 1 + 2^-6 (even): to -(1 + 2^-6)
    a[2] = 1.0 + tie + 2f32.powi(-20); // just above a tie: up
    let b: Vec<f32> = (0..128).map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.291 * (1.0 + (i % 5) as f32 * 7e-3)).collect();
    let c: Vec<f32> = (0..128).map(|i| (i % 9) as f32 * 0.5 - 2.0).collect();
    let (da, db, dc) = (stream.clone_htod(&a).unwrap(), stream.clone_htod(&b).unwrap(), stream.clone_htod(&c).unwrap());
    let mut dd = stream.alloc_zeros::<f32>(128).unwrap();
    let mut packed = stream.alloc_zeros::<u32>(32).unwrap();
    let text = launch!(stream, f, cfg(1, 32, 0), &da, &db, &dc, &mut dd, &mut packed);
    assert_eq!(text, "the launch succeeded");
    let (d, packed) = (stream.clone_dtoh(&dd).unwrap(), stream.clone_dtoh(&packed).unwrap());
    let bits = |x: f32| bf16_rne(x).to_bits() >> 16;
    for (l, &p) in packed.iter().enumerate() {
        assert_eq!(p, bits(a[2 * l + 1]) << 16 | bits(a[2 * l]), "cvt.rn.bf16x2.f32 of lane {l}");
    }
    assert_eq!(bf16_rne(a[0]), 1.0);
    assert_eq!(bf16_rne(a[1]), -(1.0 + 4.0 * tie));
    assert_eq!(bf16_rne(a[2]), 1.0 + 2.0 * tie);
    for i in 0..16 {
        for j in 0..8 {
            let sum: f64 = (0..16).map(|k| bf16_rne(a[i * 16 + k]) as f64 * bf16_rne(b[k * 8 + j]) as f64).sum();
            let want = (sum + c[i * 8 + j] as f64) as f32;
            assert_eq!(d[i * 8 + j], want, "D[{i}][{j}]");
        }
    }
}

// ---- asynchronous copies ----

const ASYNC: &str = r#"#ifdef VAECUDA_EMULATED
#define CP_ASYNC16(dst, src) emu_cp_async(dst, src, 16)
#define CP_COMMIT() emu_cp_async_commit()
#define CP_WAIT(n) emu_cp_async_wait(n)
#else
__device__ __forceinline__ void CP_ASYNC16(void* dst, const void* src) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src));
}
#define CP_COMMIT() asm volatile("cp.async.commit_group;")
#define CP_WAIT(n) asm volatile("cp.async.wait_group %0;" ::"n"(n))
#endif
// Two stages: each block copies two tiles of 256 floats (16 bytes per thread per tile) into
// shared memory asynchronously, waits for the first, sums it, waits for the second, sums it.
extern "C" __global__ void staged_sum(const float* x, float* y) {
    __shared__ __align__(16) float tile[2][256];
    int t = threadIdx.x;
    const float* base = x + blockIdx.x * 512;
    CP_ASYNC16(&tile[0][4 * t], base + 4 * t);
    CP_COMMIT();
    CP_ASYNC16(&tile[1][4 * t], base + 256 + 4 * t);
    CP_COMMIT();
    CP_WAIT(1); // the first tile
    __syncthreads();
    float s = 0.f;
    if (t == 0)
        for (int i = 0; i < 256; ++i) s += tile[0][i];
    CP_WAIT(0);
    __syncthreads();
    if (t == 0) {
        for (int i = 0; i < 256; ++i) s += tile[1][i];
        y[blockIdx.x] = s;
    }
}
"#;

/// Two cp.async groups per thread: each tile is read only after the wait that lands it.
#[test]
fn async_copies_land_at_their_wait() {
    let Some((ctx, stream)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "async.cu", ASYNC, &["staged_sum"]);
    let f = m.load_function("staged_sum").unwrap();
    let blocks = 3usize;
    let x: Vec<f32> = (0..blocks * 512).map(|i| (i % 23) as f32 * 0.25 - 2.0).collect();
    let dx = stream.clone_htod(&x).unwrap();
    let mut y = stream.alloc_zeros::<f32>(blocks).unwrap();
    let text = launch!(stream, f, cfg(blocks as u32, 64, 0), &dx, &mut y);
    assert_eq!(text, "the launch succeeded");
    let y = stream.clone_dtoh(&y).unwrap();
    for b in 0..blocks {
        let want: f32 = x[b * 512..(b + 1) * 512].iter().sum();
        assert!((y[b] - want).abs() <= 1e-3, "block {b}: {} vs {want}", y[b]);
    }
}

// ---- graphs ----

const GRAPHS: &str = r#"
extern "C" __global__ void axpy(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
"#;

/// A capture records launches, memsets and device copies without running them; the graph
/// replays them; what a GPU refuses during capture is refused with its error code and
/// invalidates the capture.
#[test]
fn graphs_capture_replay_and_refuse_what_a_gpu_refuses() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags as Flags, CUstreamCaptureMode as Mode};
    let Some((ctx, default)) = device() else { return };
    let _one = LAUNCHING.lock().unwrap_or_else(|p| p.into_inner());
    let m = program(&ctx, "graphs.cu", GRAPHS, &["axpy"]);
    let f = m.load_function("axpy").unwrap();
    let s = ctx.new_stream().unwrap();
    // One stream does all the captured work: no cross-stream events (cudarc's tracking would
    // wait on events recorded outside the capture, which a GPU refuses).
    // SAFETY: every buffer below is used on `s` only.
    unsafe { ctx.disable_event_tracking() };
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let dx = s.clone_htod(&x).unwrap();
    let mut y = s.alloc_zeros::<f32>(n).unwrap();
    let mut keep = s.alloc_zeros::<f32>(n).unwrap();
    s.synchronize().unwrap();
    let n32 = n as i32;
    let cfg1 = cfg(4, 256, 0);

    s.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_GLOBAL).unwrap();
    s.memset_zeros(&mut y).unwrap();
    let (two, three) = (2.0f32, 3.0f32);
    for a in [&two, &three] {
        let mut b = s.launch_builder(&f);
        b.arg(a).arg(&dx).arg(&mut y).arg(&n32);
        // SAFETY: axpy reads and writes n floats.
        unsafe { b.launch(cfg1) }.unwrap();
    }
    if planted("sync-in-capture") {
        let synced = s.synchronize();
        let _ = s.end_capture(Flags(0));
        synced.unwrap();
    }
    s.memcpy_dtod(&y, &mut keep).unwrap();
    let graph = s.end_capture(Flags(0)).unwrap().expect("a graph");
    assert!(s.clone_dtoh(&keep).unwrap().iter().all(|&v| v == 0.0), "a capture must not run the work");
    for _ in 0..2 {
        graph.launch().unwrap();
    }
    s.synchronize().unwrap();
    let (y, keep) = (s.clone_dtoh(&y).unwrap(), s.clone_dtoh(&keep).unwrap());
    for i in 0..n {
        assert_eq!((y[i], keep[i]), (5.0 * x[i], 5.0 * x[i]), "element {i} after two replays");
    }
    drop(graph);

    // What a capture refuses, and how: the call fails, and so does ending the capture (which
    // ends it before anything is asserted, so no capture outlives this test).
    let mut small = s.alloc_zeros::<f32>(4).unwrap();
    let mut host = [0f32; 4];
    for what in
        ["cuStreamSynchronize", "a copy from pageable host memory", "a copy to pageable host memory", "cuMemAlloc"]
    {
        s.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_GLOBAL).unwrap();
        let refused = match what {
            "cuStreamSynchronize" => s.synchronize(),
            "a copy from pageable host memory" => s.memcpy_htod(&[1.0f32; 4], &mut small),
            "a copy to pageable host memory" => s.memcpy_dtoh(&small, &mut host),
            _ => s.alloc_zeros::<f32>(4).map(|_| ()),
        };
        let ended = s.end_capture(Flags(0)).map(|g| g.is_some());
        let e = format!("{:?}", refused.expect_err(what));
        assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED") && e.contains(what), "{what}: {e}");
        let e = format!("{:?}", ended.expect_err(what));
        assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"), "{what}: {e}");
    }
    // A thread-local capture (what the backend uses) refuses only the capturing thread's
    // unsafe calls: another thread allocates meanwhile, as on a GPU.
    let other_stream = ctx.new_stream().unwrap();
    s.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let other = std::thread::scope(|t| t.spawn(|| other_stream.alloc_zeros::<f32>(4).map(drop)).join().unwrap());
    let own = s.alloc_zeros::<f32>(4).map(drop);
    let ended = s.end_capture(Flags(0)).map(|g| g.is_some());
    other.expect("another thread's allocation during a thread-local capture");
    let e = format!("{:?}", own.expect_err("the capturing thread's allocation"));
    assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"), "{e}");
    assert!(ended.is_err(), "a thread-local capture after a refused call must be invalidated");
    let e = format!("{:?}", default.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_GLOBAL).unwrap_err());
    assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED") && e.contains("NULL stream"), "{e}");
}

// ---- the planted bugs ----

/// Runs one test of this file in a child process with a bug planted; returns (whether it
/// passed, what it printed).
fn run_planted(test: &str, plant: &str) -> (bool, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env("VAECUDA_PLANT", plant)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("cannot run the test binary");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains("1 passed"), text)
}

/// One planted bug per part; each must fail the test that covers it, for the stated reason.
#[test]
fn the_emulator_catches_planted_bugs() {
    if std::env::var_os("VAECUDA_PLANT").is_some() || device().is_none() {
        return;
    }
    let cases: &[(&str, &str, &[&str])] = &[
        ("shuffle-offset", "warp_reductions_match_the_host", &["warp_sum block"]),
        ("no-syncwarp", "warp_reductions_match_the_host", &["warp_sum_shared warp"]),
        ("mask-missing-lane", "warp_reductions_match_the_host", &["0x7fffffff", "lane 31", "warps.cu:"]),
        ("unwritten-shared", "shared_sums_match_the_host", &["NaN"]),
        ("shared-one-past", "shared_sums_match_the_host", &["index 64 is outside the array", "kernel sums"]),
        ("above-launch-bounds", "launches_within_the_kernels_limits_run", &["__launch_bounds__ of 64"]),
        ("misaligned-float4", "launches_within_the_kernels_limits_run", &["CUDA_ERROR_MISALIGNED_ADDRESS", "float4"]),
        ("fragment-by-position", "tensor_core_mma_follows_the_ptx_fragment_tables", &["D[0][0]"]),
        ("async-read-before-wait", "async_copies_land_at_their_wait", &["block 0: NaN"]),
        (
            "sync-in-capture",
            "graphs_capture_replay_and_refuse_what_a_gpu_refuses",
            &["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"],
        ),
    ];
    let mut missed = vec![];
    for &(plant, test, expect) in cases {
        let (passed, text) = run_planted(test, plant);
        if passed || !expect.iter().all(|e| text.contains(e)) {
            missed.push(format!("{plant}: {test} passed={passed}, expected {expect:?} in:\n{text}"));
        } else {
            eprintln!("caught: {plant} ({test} failed as it should)");
        }
    }
    assert_eq!(cases.len(), PLANTS.len(), "every plant is checked");
    assert!(missed.is_empty(), "the emulator missed planted bugs:\n{}", missed.join("\n\n"));
}

// Kernel modules of the emulated driver (part of driver.cpp): CUBINs bound to host builds.

namespace {

// ---- kernel modules ----
struct HostKernel {
    const EmuKernel* kernel;
    const EmuModule* module;
};
std::unordered_map<std::string, HostKernel> host_kernels;

// What a kernel's CUBIN says about it, for the launch checks.
struct KernelInfo {
    unsigned max_threads = 1024;  // __launch_bounds__, else 1024
    unsigned registers = 0;       // per thread
    unsigned static_shared = 0;   // bytes of __shared__ variables
};

struct Module {
    std::vector<std::string> names;  // kernels the CUBIN defines
    std::map<std::string, KernelInfo> info;
};
struct Function {
    std::string name;
    HostKernel host;
    KernelInfo info;
    unsigned max_dynamic_shared;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (48 KiB − static)
};

// sm_90 reserves 1 KiB of every block's shared memory for the system; the CUBIN's
// .nv.shared.<kernel> section counts it.
const unsigned RESERVED_SHARED = 1024;

// The kernel attributes in a CUBIN's .nv.info sections: entries of (format, attribute, value);
// format 4 carries a 16-bit size and that many bytes. EIATTR_REGCOUNT (0x2f, in .nv.info:
// symbol index, registers) and EIATTR_MAX_THREADS (0x05, in .nv.info.<kernel>: x, y, z).
void cubin_info(const unsigned char* b, const Elf64_Shdr* sh, const char* shstr, const Elf64_Sym* syms,
                const char* strtab, size_t nsyms, std::map<std::string, KernelInfo>& info, int shnum) {
    for (int i = 0; i < shnum; ++i) {
        const std::string sec = shstr + sh[i].sh_name;
        if (sec.rfind(".nv.shared.", 0) == 0) {
            auto it = info.find(sec.substr(11));
            if (it != info.end())
                it->second.static_shared = sh[i].sh_size > RESERVED_SHARED ? (unsigned)sh[i].sh_size - RESERVED_SHARED : 0;
            continue;
        }
        if (sec.rfind(".nv.info", 0) != 0) continue;
        const std::string kernel = sec.size() > 9 ? sec.substr(9) : "";
        const unsigned char* d = b + sh[i].sh_offset;
        size_t at = 0, end = sh[i].sh_size;
        while (at + 2 <= end) {
            const unsigned fmt = d[at], attr = d[at + 1];
            size_t size = 0, head = 4;
            if (fmt == 4) {
                if (at + 4 > end) break;
                size = d[at + 2] | (d[at + 3] << 8);
            } else if (fmt == 1) {
                head = 2;
            }
            if (at + head + size > end) break;
            const unsigned char* v = d + at + head;
            auto u32 = [&](size_t o) { return (unsigned)(v[o] | v[o + 1] << 8 | v[o + 2] << 16 | (unsigned)v[o + 3] << 24); };
            if (fmt == 4 && attr == 0x2f && size == 8 && kernel.empty()) {
                const unsigned sym = u32(0);
                if (sym < nsyms) {
                    auto it = info.find(strtab + syms[sym].st_name);
                    if (it != info.end()) it->second.registers = u32(4);
                }
            } else if (fmt == 4 && attr == 0x05 && size == 12 && !kernel.empty()) {
                auto it = info.find(kernel);
                if (it != info.end()) it->second.max_threads = u32(0) * u32(4) * u32(8);
            }
            at += head + size;
        }
    }
}

// The kernel entry points of a CUBIN: global function symbols in sections ".text.<name>".
bool cubin_kernels(const void* image, std::vector<std::string>& out, std::map<std::string, KernelInfo>& info,
                   std::string& why) {
    const unsigned char* b = (const unsigned char*)image;
    const Elf64_Ehdr* eh = (const Elf64_Ehdr*)b;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) {
        why = "not a 64-bit ELF image (a CUBIN)";
        return false;
    }
    if (eh->e_machine != 190 /* EM_CUDA */) {
        why = "an ELF image for another machine than CUDA";
        return false;
    }
    const Elf64_Shdr* sh = (const Elf64_Shdr*)(b + eh->e_shoff);
    const char* shstr = (const char*)(b + sh[eh->e_shstrndx].sh_offset);
    for (int i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != SHT_SYMTAB) continue;
        const Elf64_Sym* syms = (const Elf64_Sym*)(b + sh[i].sh_offset);
        const char* strtab = (const char*)(b + sh[sh[i].sh_link].sh_offset);
        size_t count = sh[i].sh_size / sizeof(Elf64_Sym);
        for (size_t s = 0; s < count; ++s) {
            const Elf64_Sym& sym = syms[s];
            if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || ELF64_ST_BIND(sym.st_info) != STB_GLOBAL) continue;
            if (sym.st_shndx == SHN_UNDEF || sym.st_shndx >= eh->e_shnum) continue;
            std::string name = strtab + sym.st_name;
            if (std::string(shstr + sh[sym.st_shndx].sh_name) == ".text." + name) out.push_back(name);
        }
        for (const std::string& n : out) info[n] = KernelInfo{};
        cubin_info(b, sh, shstr, syms, strtab, count, info, eh->e_shnum);
    }
    if (out.empty()) {
        why = "the CUBIN defines no kernel";
        return false;
    }
    return true;
}

}  // namespace

EXPORT int vaecuda_emu_register_modules(const char* paths) {
    std::string all(paths);
    size_t at = 0;
    while (at <= all.size()) {
        size_t nl = all.find('\n', at);
        std::string path = all.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
        at = nl == std::string::npos ? all.size() + 1 : nl + 1;
        if (path.empty()) continue;
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        EmuModuleFn get = h ? (EmuModuleFn)dlsym(h, "vaecuda_emu_module") : nullptr;
        if (!get) {
            fprintf(stderr, "emulated device: cannot load kernel module %s: %s\n", path.c_str(), dlerror());
            return 1;
        }
        const EmuModule* m = get();
        std::lock_guard<std::mutex> g(mu);
        for (int k = 0; k < m->count; ++k) host_kernels[m->kernels[k].name] = HostKernel{&m->kernels[k], m};
    }
    return 0;
}

EXPORT CUresult cuModuleLoadData(void** module, const void* image) {
    if (CUresult s = check_sticky()) return s;
    std::vector<std::string> names;
    std::map<std::string, KernelInfo> info;
    std::string why;
    if (!cubin_kernels(image, names, info, why)) return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: %s", why.c_str());
    std::lock_guard<std::mutex> g(mu);
    for (const std::string& n : names) {
        if (!host_kernels.count(n)) {
            last_message[CUDA_ERROR_INVALID_IMAGE] =
                "the CUBIN's kernel " + n + " has no host build (are the emulator's kernel modules out of date?)";
            return CUDA_ERROR_INVALID_IMAGE;
        }
    }
    *module = new Module{names, info};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleUnload(void* module) {
    delete (Module*)module;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    Module* m = (Module*)module;
    bool in_cubin = false;
    for (const std::string& n : m->names) in_cubin |= n == name;
    if (!in_cubin) return fail(CUDA_ERROR_NOT_FOUND, "the module defines no kernel named %s", name);
    std::lock_guard<std::mutex> g(mu);
    const KernelInfo& info = m->info.at(name);
    *f = new Function{name, host_kernels.at(name), info, (48u << 10) - info.static_shared};
    return CUDA_SUCCESS;
}
// The most threads a block of `fn` can have: 1,024, its __launch_bounds__, and what its
// registers allow (65,536 per block, allocated per warp in units of 256).
unsigned max_threads_of(const Function* fn) {
    unsigned most = fn->info.max_threads < 1024 ? fn->info.max_threads : 1024;
    if (fn->info.registers) {
        unsigned per_warp = (fn->info.registers * 32 + 255) / 256 * 256;
        unsigned by_registers = 65536 / per_warp * 32;
        if (by_registers < most) most = by_registers;
    }
    return most;
}

EXPORT CUresult cuFuncGetAttribute(int* v, int attrib, void* f) {
    const Function* fn = (const Function*)f;
    switch (attrib) {
        case 0: *v = (int)max_threads_of(fn); break;         // MAX_THREADS_PER_BLOCK
        case 1: *v = (int)fn->info.static_shared; break;     // SHARED_SIZE_BYTES
        case 4: *v = (int)fn->info.registers; break;         // NUM_REGS
        case 5: case 6: *v = 90; break;                      // PTX_VERSION, BINARY_VERSION
        case 8: *v = (int)fn->max_dynamic_shared; break;     // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: *v = 0; break;                              // constant and local memory: none
    }
    return CUDA_SUCCESS;
}

// sm_90: a block's shared memory (static plus dynamic) may reach 227 KiB once the kernel has
// asked for it with CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES; 48 KiB without.
const unsigned MAX_SHARED_OPTIN = 227 << 10;

EXPORT CUresult cuFuncSetAttribute(void* f, int attrib, int value) {
    if (CUresult s = check_sticky()) return s;
    Function* fn = (Function*)f;
    if (attrib == 8) {
        if (value < 0 || (unsigned)value + fn->info.static_shared > MAX_SHARED_OPTIN)
            return fail(CUDA_ERROR_INVALID_VALUE,
                        "cuFuncSetAttribute(%s, MAX_DYNAMIC_SHARED_SIZE_BYTES, %d): with %u bytes of static shared "
                        "memory at most %u bytes are possible on sm_90",
                        fn->name.c_str(), value, fn->info.static_shared, MAX_SHARED_OPTIN - fn->info.static_shared);
        fn->max_dynamic_shared = (unsigned)value;
        return CUDA_SUCCESS;
    }
    if (attrib == 9) return CUDA_SUCCESS;  // PREFERRED_SHARED_MEMORY_CARVEOUT: a hint
    return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute(%s): attribute %d cannot be set", fn->name.c_str(), attrib);
}

// CUDA graphs in the emulated driver (part of driver.cpp): not yet modelled.

namespace {
bool capturing(void*) { return false; }
CUresult capture_launch(Function*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                        void**) {
    return CUDA_ERROR_NOT_SUPPORTED;
}
}  // namespace

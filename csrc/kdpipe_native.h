// Declarations shared by the native op files and the bindings. All shapes are element counts.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kdpipe {

constexpr double kAtEps = 1e-12;   // floor of the attention-map L2 norm (Zagoruyko & Komodakis)
constexpr double kDctEps = 1e-12;  // below this a DCT target denominator gives an all-zero target

// ---- tap_targets.cpp: one pass over an activation -> attention map (N,HW) and pooled vector (N,C).
// x is C-contiguous (N,C,H,W) when nhwc is false, else (N,H,W,C); float32, or float16 bits when is_half.
void tap_targets_cpu(const void* x, bool is_half, bool nhwc, int64_t n, int64_t c, int64_t hw, float* at,
                     float* pooled, int threads);

// ---- dct_targets.cpp: DCT-driven targets of maps (N,H,W) float32 -> out (N,H,W) float32.
enum class DctVariant { DftAbs, Dft, Dct2 };
bool parse_dct_variant(const char* name, DctVariant* out);
void dct_targets_cpu(const float* maps, int64_t n, int64_t h, int64_t w, DctVariant variant, float* out,
                     int threads);

// ---- storage.cpp: float32 -> float16 / bfloat16 bits, round to nearest even.
// Both return how many finite inputs became +-inf (the caller raises OverflowError).
int64_t to_float16_cpu(const float* x, uint16_t* out, int64_t count, int threads);
int64_t to_bfloat16_cpu(const float* x, uint16_t* out, int64_t count, int threads);
int openmp_max_threads();

// ---- normalize.cpp: uint8 (B,H,W,c_in) -> float32 (B,c_out,H,W) when nchw, else (B,H,W,c_out):
// out[.., c, p] = lut[c * 256 + images[.., p, src_channel[c]]] (hw = H*W pixels per image).
void normalize_u8_cpu(const uint8_t* images, int64_t b, int64_t hw, int64_t c_in, const float* lut,
                      const int32_t* src_channel, int64_t c_out, bool nchw, float* out, int threads);

// ---- crop_resize.cpp: bilinear crop + resize of uint8 images (b,h,w,c) -> out (b,size,size,c).
// ya/yb (b,size): the two source rows of each output row, wy0/wy1 their float32 weights; xa/xb/wx0/wx1
// the same for columns (flips already applied). Indices must lie inside the image.
void crop_resize_u8_cpu(const uint8_t* images, int64_t b, int64_t h, int64_t w, int64_t c, const int64_t* ya,
                        const int64_t* yb, const float* wy0, const float* wy1, const int64_t* xa,
                        const int64_t* xb, const float* wx0, const float* wx1, int64_t size, uint8_t* out,
                        int threads);

// ---- cuda/*.cu (or cuda_stub.cpp without a toolkit). Pointers are device addresses; stream is a
// cudaStream_t. Errors (no driver, no GPU, launch failure) throw std::runtime_error.
int cuda_device_count();  // 0 when there is no driver, no GPU or no CUDA build; never throws
size_t cuda_tap_workspace_bytes(int64_t n, int64_t c, int64_t hw, bool nhwc);
void cuda_tap_targets(uintptr_t x, int64_t n, int64_t c, int64_t h, int64_t w, int channel_axis, bool is_half,
                      uintptr_t at, uintptr_t pooled, uintptr_t workspace, int device, uintptr_t stream);
size_t cuda_dct_workspace_bytes(int64_t n, int64_t h, int64_t w);
void cuda_dct_targets(uintptr_t maps, int64_t n, int64_t h, int64_t w, DctVariant variant, uintptr_t out,
                      uintptr_t workspace, int device, uintptr_t stream);

}  // namespace kdpipe

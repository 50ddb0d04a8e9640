// pybind11 bindings of kdpipe._native. Each op lives in its own file; this file only binds them.
// Inputs are checked here (dtype, rank, C-contiguity) and raise ValueError; kdpipe/ops.py prepares
// arrays so users never see these. Compute runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "kdpipe_native.h"

namespace py = pybind11;

namespace {

void require_c_contiguous(const py::array& a, const char* op) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(op) + ": array must be C-contiguous (use np.ascontiguousarray)");
}

py::tuple tap_targets(const py::array& x, int channel_axis, int threads) {
  const bool is_half = x.dtype().equal(py::dtype::from_args(py::str("float16")));
  if (!is_half && !x.dtype().equal(py::dtype::of<float>()))
    throw py::value_error("tap_targets: expected float32 or float16, got " + std::string(py::str(x.dtype())));
  if (x.ndim() != 4) throw py::value_error("tap_targets: expected a 4-D activation");
  if (channel_axis != 1 && channel_axis != 3) throw py::value_error("tap_targets: channel_axis must be 1 or 3");
  require_c_contiguous(x, "tap_targets");
  const bool nhwc = channel_axis == 3;
  const int64_t n = x.shape(0);
  const int64_t c = x.shape(channel_axis);
  const int64_t h = x.shape(nhwc ? 1 : 2);
  const int64_t w = x.shape(nhwc ? 2 : 3);
  if (n > 0 && (c == 0 || h == 0 || w == 0))
    throw py::value_error("tap_targets: channel and spatial sizes must be non-zero");
  py::array_t<float> at({n, h, w});
  py::array_t<float> pooled({n, c});
  const void* src = x.data();
  float* at_p = at.mutable_data();
  float* pooled_p = pooled.mutable_data();
  {
    py::gil_scoped_release release;
    kdpipe::tap_targets_cpu(src, is_half, nhwc, n, c, h * w, at_p, pooled_p, threads);
  }
  return py::make_tuple(at, pooled);
}

py::array_t<float> dct_targets(const py::array& maps, const std::string& variant, int threads) {
  kdpipe::DctVariant v;
  if (!kdpipe::parse_dct_variant(variant.c_str(), &v))
    throw py::value_error("dct_targets: unknown variant '" + variant + "' (dft-abs, dft, dct2)");
  if (!maps.dtype().equal(py::dtype::of<float>())) throw py::value_error("dct_targets: expected float32 maps");
  if (maps.ndim() != 3) throw py::value_error("dct_targets: expected maps of shape (N,H,W)");
  require_c_contiguous(maps, "dct_targets");
  const int64_t n = maps.shape(0), h = maps.shape(1), w = maps.shape(2);
  if (h == 0 || w == 0) throw py::value_error("dct_targets: spatial sizes must be non-zero");
  py::array_t<float> out({n, h, w});
  const auto* src = static_cast<const float*>(maps.data());
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    kdpipe::dct_targets_cpu(src, n, h, w, v, dst, threads);
  }
  return out;
}

// Fills out (uint16 bits, or float16) from x (float32, same size); returns the overflow count.
template <int64_t (*Convert)(const float*, uint16_t*, int64_t, int)>
int64_t convert(const py::array& x, py::array& out, int threads) {
  if (!x.dtype().equal(py::dtype::of<float>())) throw py::value_error("to_storage: expected float32 input");
  if (out.itemsize() != 2) throw py::value_error("to_storage: output must have 2-byte items");
  if (out.size() != x.size()) throw py::value_error("to_storage: output size differs from input size");
  require_c_contiguous(x, "to_storage");
  require_c_contiguous(out, "to_storage");
  if (!out.writeable()) throw py::value_error("to_storage: output is read-only");
  const auto* src = static_cast<const float*>(x.data());
  auto* dst = static_cast<uint16_t*>(out.mutable_data());
  const int64_t count = x.size();
  py::gil_scoped_release release;
  return Convert(src, dst, count, threads);
}

void normalize_u8(const py::array& images, const py::array& lut, const py::array& src_channel, bool nchw,
                  py::array& out, int threads) {
  if (!images.dtype().equal(py::dtype::of<uint8_t>())) throw py::value_error("normalize_u8: expected uint8 images");
  if (images.ndim() != 4) throw py::value_error("normalize_u8: expected images (B,H,W,C)");
  if (!lut.dtype().equal(py::dtype::of<float>()) || lut.ndim() != 2 || lut.shape(1) != 256)
    throw py::value_error("normalize_u8: expected a float32 lookup table (C_out, 256)");
  if (!src_channel.dtype().equal(py::dtype::of<int32_t>()) || src_channel.ndim() != 1 ||
      src_channel.shape(0) != lut.shape(0))
    throw py::value_error("normalize_u8: src_channel must be int32 with one entry per table row");
  if (!out.dtype().equal(py::dtype::of<float>()) || !out.writeable())
    throw py::value_error("normalize_u8: out must be a writeable float32 array");
  for (const py::array* a : {&images, &lut, &src_channel, static_cast<const py::array*>(&out)})
    require_c_contiguous(*a, "normalize_u8");
  const int64_t b = images.shape(0), h = images.shape(1), w = images.shape(2), c_in = images.shape(3);
  const int64_t c_out = lut.shape(0);
  if (out.size() != b * h * w * c_out) throw py::value_error("normalize_u8: out has the wrong size");
  const auto* ch = static_cast<const int32_t*>(src_channel.data());
  for (int64_t c = 0; c < c_out; ++c)
    if (ch[c] < 0 || ch[c] >= c_in) throw py::value_error("normalize_u8: src_channel out of range");
  const auto* src = static_cast<const uint8_t*>(images.data());
  const auto* table = static_cast<const float*>(lut.data());
  auto* dst = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  kdpipe::normalize_u8_cpu(src, b, h * w, c_in, table, ch, c_out, nchw, dst, threads);
}

py::array_t<uint8_t> crop_resize_u8(const py::array& images, const py::array& ya, const py::array& yb,
                                    const py::array& wy0, const py::array& wy1, const py::array& xa,
                                    const py::array& xb, const py::array& wx0, const py::array& wx1, int threads) {
  if (!images.dtype().equal(py::dtype::of<uint8_t>()) || images.ndim() != 4)
    throw py::value_error("crop_resize_u8: expected uint8 images (B,H,W,C)");
  require_c_contiguous(images, "crop_resize_u8");
  const int64_t b = images.shape(0), h = images.shape(1), w = images.shape(2), c = images.shape(3);
  if (ya.ndim() != 2 || ya.shape(0) != b) throw py::value_error("crop_resize_u8: index arrays must be (B, size)");
  const int64_t size = ya.shape(1);
  for (const py::array* a : {&ya, &yb, &xa, &xb}) {
    if (!a->dtype().equal(py::dtype::of<int64_t>()) || a->ndim() != 2 || a->shape(0) != b || a->shape(1) != size)
      throw py::value_error("crop_resize_u8: index arrays must be int64 (B, size)");
    require_c_contiguous(*a, "crop_resize_u8");
  }
  for (const py::array* a : {&wy0, &wy1, &wx0, &wx1}) {
    if (!a->dtype().equal(py::dtype::of<float>()) || a->ndim() != 2 || a->shape(0) != b || a->shape(1) != size)
      throw py::value_error("crop_resize_u8: weights must be float32 (B, size)");
    require_c_contiguous(*a, "crop_resize_u8");
  }
  const auto in_range = [&](const py::array& a, int64_t limit) {
    const auto* p = static_cast<const int64_t*>(a.data());
    for (int64_t i = 0; i < b * size; ++i)
      if (p[i] < 0 || p[i] >= limit) return false;
    return true;
  };
  if (!in_range(ya, h) || !in_range(yb, h) || !in_range(xa, w) || !in_range(xb, w))
    throw py::value_error("crop_resize_u8: a source index lies outside the image");
  py::array_t<uint8_t> out({b, size, size, c});
  const auto i64 = [](const py::array& a) { return static_cast<const int64_t*>(a.data()); };
  const auto f32 = [](const py::array& a) { return static_cast<const float*>(a.data()); };
  const auto* src = static_cast<const uint8_t*>(images.data());
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    kdpipe::crop_resize_u8_cpu(src, b, h, w, c, i64(ya), i64(yb), f32(wy0), f32(wy1), i64(xa), i64(xb), f32(wx0),
                               f32(wx1), size, dst, threads);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "kdpipe native target ops (C++/OpenMP, optional CUDA)";
#ifdef KDPIPE_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def("tap_targets", &tap_targets, py::arg("x"), py::arg("channel_axis"), py::arg("num_threads"),
        "x (N,C,H,W) [channel_axis=1] or (N,H,W,C) [3], float32/float16, C-contiguous -> "
        "(at (N,H,W) float32 = l2n(mean_c(x^2)), pooled (N,C) float32 = mean_hw(x))");
  m.def("dct_targets", &dct_targets, py::arg("maps"), py::arg("variant"), py::arg("num_threads"),
        "maps (N,H,W) float32, C-contiguous; variant 'dft-abs' | 'dft' | 'dct2' -> (N,H,W) float32");
  m.def("to_float16", &convert<kdpipe::to_float16_cpu>, py::arg("x"), py::arg("out"), py::arg("num_threads"),
        "float32 x -> out (float16 or uint16, same size), round to nearest even; returns #finite->inf");
  m.def("to_bfloat16", &convert<kdpipe::to_bfloat16_cpu>, py::arg("x"), py::arg("out"), py::arg("num_threads"),
        "float32 x -> out (uint16 bfloat16 bits), round to nearest even, NaN -> 0x7fc0; returns #finite->inf");
  m.def("normalize_u8", &normalize_u8, py::arg("images"), py::arg("lut"), py::arg("src_channel"), py::arg("nchw"),
        py::arg("out"), py::arg("num_threads"),
        "uint8 images (B,H,W,C_in) -> out float32 (B,C_out,H,W) [nchw] or (B,H,W,C_out): "
        "out[..c..] = lut[c, images[..src_channel[c]]]; all C-contiguous");
  m.def("crop_resize_u8", &crop_resize_u8, py::arg("images"), py::arg("ya"), py::arg("yb"), py::arg("wy0"),
        py::arg("wy1"), py::arg("xa"), py::arg("xb"), py::arg("wx0"), py::arg("wx1"), py::arg("num_threads"),
        "uint8 images (B,H,W,C) -> (B,size,size,C): bilinear blend of source rows ya/yb and columns xa/xb "
        "(int64 (B,size)) with float32 weights, as kdpipe.data.transforms.crop_resize_batch");
  m.def("openmp_max_threads", &kdpipe::openmp_max_threads, "OpenMP's default thread count (0 without OpenMP)");
  m.def("cuda_device_count", &kdpipe::cuda_device_count,
        "visible CUDA devices; 0 without a driver, a GPU or a CUDA build (never raises)");
  m.def("cuda_tap_workspace_bytes", &kdpipe::cuda_tap_workspace_bytes, py::arg("n"), py::arg("c"), py::arg("hw"),
        py::arg("nhwc"), "device scratch bytes cuda_tap_targets needs");
  m.def("cuda_tap_targets", &kdpipe::cuda_tap_targets, py::arg("x_ptr"), py::arg("n"), py::arg("c"), py::arg("h"),
        py::arg("w"), py::arg("channel_axis"), py::arg("is_half"), py::arg("at_ptr"), py::arg("pooled_ptr"),
        py::arg("workspace_ptr"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "device pointers: x (N,C,H,W)/(N,H,W,C) f32|f16 contiguous -> at (N,H,W) f32, pooled (N,C) f32; "
        "enqueued on stream (a cudaStream_t as int); raises RuntimeError without a GPU");
  m.def("cuda_dct_workspace_bytes", &kdpipe::cuda_dct_workspace_bytes, py::arg("n"), py::arg("h"), py::arg("w"),
        "device scratch bytes cuda_dct_targets needs");
  m.def(
      "cuda_dct_targets",
      [](uintptr_t maps, int64_t n, int64_t h, int64_t w, const std::string& variant, uintptr_t out,
         uintptr_t workspace, int device, uintptr_t stream) {
        kdpipe::DctVariant v;
        if (!kdpipe::parse_dct_variant(variant.c_str(), &v))
          throw py::value_error("cuda_dct_targets: unknown variant '" + variant + "' (dft-abs, dft, dct2)");
        py::gil_scoped_release release;
        kdpipe::cuda_dct_targets(maps, n, h, w, v, out, workspace, device, stream);
      },
      py::arg("maps_ptr"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("variant"), py::arg("out_ptr"),
      py::arg("workspace_ptr"), py::arg("device"), py::arg("stream"),
      "device pointers: maps (N,H,W) f32 contiguous -> out (N,H,W) f32; raises RuntimeError without a GPU");
}

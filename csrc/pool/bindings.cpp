#include "bindings.h"

#include <torch/extension.h>

#include <stdexcept>

#include "page_allocator.h"

namespace py = pybind11;
using minlora::pool::PageAllocator;
using minlora::pool::PageList;
using minlora::pool::Request;

namespace {

std::vector<int32_t> to_pages(const at::Tensor& t, const char* what) {
  if (t.scalar_type() != at::kInt || !t.device().is_cpu() || t.dim() != 1)
    throw std::invalid_argument(std::string(what) + " must be a 1-D int32 CPU tensor");
  const auto c = t.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  return std::vector<int32_t>(p, p + c.numel());
}

at::Tensor to_tensor(const std::vector<int32_t>& v) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kInt);
  std::copy(v.begin(), v.end(), t.data_ptr<int32_t>());
  return t;
}

}  // namespace

void register_pool_bindings(py::module_& m) {
  py::class_<PageAllocator>(m, "PageAllocator", R"doc(
Page bookkeeping for minlora's AdapterPool (csrc/pool/page_allocator.h).

One arena of arena_bytes, cut into chunks of chunk_bytes; each pool (row length) is a view of
the whole arena as [arena_bytes // row_bytes, row_length], and a chunk serves one pool at a
time, so all pools share one budget.  alloc is all-or-nothing; every method is thread-safe
(a mutex) and keeps the GIL: the calls are short.
)doc")
      .def(py::init<int64_t, int64_t>(), py::arg("arena_bytes"), py::arg("chunk_bytes"))
      .def("add_pool", &PageAllocator::add_pool, py::arg("row_bytes"), "Adds a pool; returns its id.")
      .def_property_readonly("arena_bytes", &PageAllocator::arena_bytes)
      .def_property_readonly("chunk_bytes", &PageAllocator::chunk_bytes)
      .def_property_readonly("num_chunks", &PageAllocator::num_chunks)
      .def_property_readonly("num_pools", &PageAllocator::num_pools)
      .def("free_chunks", &PageAllocator::free_chunks)
      .def("used_bytes", &PageAllocator::used_bytes)
      .def(
          "pool_info",
          [](const PageAllocator& a, int32_t pool) {
            const auto p = a.pool_info(pool);
            py::dict d;
            d["row_bytes"] = p.row_bytes;
            d["num_pages"] = p.num_pages;
            d["used_pages"] = p.used_pages;
            d["free_in_chunks"] = p.free_in_chunks;
            d["owned_chunks"] = p.owned_chunks;
            return d;
          },
          py::arg("pool"))
      .def(
          "alloc",
          [](PageAllocator& a, const std::vector<Request>& requests) -> py::object {
            // The GIL stays held: these calls take microseconds, and releasing it would let a
            // waiting Python thread take it for a whole switch interval.
            auto r = a.alloc(requests);
            if (!r) return py::none();
            py::list out;
            for (const auto& v : *r) out.append(to_tensor(v));
            return out;
          },
          py::arg("requests"),
          "[(pool, count)] -> [int32 tensor of pages] per request, or None (nothing changed) if they do not fit.")
      .def(
          "free",
          [](PageAllocator& a, int32_t pool, const at::Tensor& pages) {
            a.free(pool, to_pages(pages, "pages"));
          },
          py::arg("pool"), py::arg("pages"))
      .def(
          "plan_evictions",
          [](const PageAllocator& a, const std::vector<Request>& requests,
             const std::vector<std::vector<std::pair<int32_t, at::Tensor>>>& candidates) {
            std::vector<std::vector<PageList>> c;
            c.reserve(candidates.size());
            for (const auto& cand : candidates) {
              std::vector<PageList> lists;
              for (const auto& [pool, t] : cand) lists.emplace_back(pool, to_pages(t, "candidate pages"));
              c.push_back(std::move(lists));
            }
            return a.plan_evictions(requests, c);
          },
          py::arg("requests"), py::arg("candidates"),
          "Smallest k such that freeing candidates[:k] (each a list of (pool, pages)) makes requests fit; "
          "-1 if none does.  Changes nothing.")
      .def(
          "plan_evictions_flat",
          [](const PageAllocator& a, const std::vector<Request>& requests, const at::Tensor& pools,
             const at::Tensor& pages, const at::Tensor& offsets) {
            // The candidates packed in three arrays (one call, no per-candidate objects):
            // candidate i owns entries offsets[i]..offsets[i+1] of (pools, pages).
            const auto pl = to_pages(pools, "pools");
            const auto pg = to_pages(pages, "pages");
            if (offsets.scalar_type() != at::kLong || !offsets.device().is_cpu() || offsets.dim() != 1 ||
                offsets.numel() < 1)
              throw std::invalid_argument("offsets must be a non-empty 1-D int64 CPU tensor");
            if (pl.size() != pg.size()) throw std::invalid_argument("pools and pages must have one length");
            const auto off = offsets.contiguous();
            const int64_t* o = off.data_ptr<int64_t>();
            const int64_t n = off.numel() - 1;
            std::vector<std::vector<PageList>> c(n);
            for (int64_t i = 0; i < n; ++i) {
              if (o[i] < 0 || o[i] > o[i + 1] || o[i + 1] > static_cast<int64_t>(pg.size()))
                throw std::invalid_argument("offsets must be non-decreasing within 0..len(pages)");
              for (int64_t j = o[i]; j < o[i + 1]; ++j) {
                if (c[i].empty() || c[i].back().first != pl[j]) c[i].emplace_back(pl[j], std::vector<int32_t>{});
                c[i].back().second.push_back(pg[j]);
              }
            }
            return a.plan_evictions(requests, c);
          },
          py::arg("requests"), py::arg("pools"), py::arg("pages"), py::arg("offsets"),
          "plan_evictions with the candidates packed: candidate i is (pools[j], pages[j]) for j in "
          "offsets[i]..offsets[i+1].")
      .def(
          "used_pages", [](const PageAllocator& a, int32_t pool) { return to_tensor(a.used_pages(pool)); },
          py::arg("pool"))
      .def("check_invariants", &PageAllocator::check_invariants);
}

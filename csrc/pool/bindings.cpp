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
and releases the GIL while it works.
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
            std::optional<std::vector<std::vector<int32_t>>> r;
            {
              py::gil_scoped_release nogil;
              r = a.alloc(requests);
            }
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
            auto v = to_pages(pages, "pages");
            py::gil_scoped_release nogil;
            a.free(pool, v);
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
            py::gil_scoped_release nogil;
            return a.plan_evictions(requests, c);
          },
          py::arg("requests"), py::arg("candidates"),
          "Smallest k such that freeing candidates[:k] (each a list of (pool, pages)) makes requests fit; "
          "-1 if none does.  Changes nothing.")
      .def(
          "used_pages", [](const PageAllocator& a, int32_t pool) { return to_tensor(a.used_pages(pool)); },
          py::arg("pool"))
      .def("check_invariants", &PageAllocator::check_invariants);
}

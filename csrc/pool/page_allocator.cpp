#include "page_allocator.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>

namespace minlora::pool {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

PageAllocator::PageAllocator(int64_t arena_bytes, int64_t chunk_bytes)
    : arena_bytes_(arena_bytes), chunk_bytes_(chunk_bytes) {
  if (chunk_bytes <= 0) throw std::invalid_argument("chunk_bytes must be > 0, got " + str(chunk_bytes));
  if (arena_bytes < 0) throw std::invalid_argument("arena_bytes must be >= 0, got " + str(arena_bytes));
  if (arena_bytes % chunk_bytes != 0)
    throw std::invalid_argument("arena_bytes (" + str(arena_bytes) + ") must be a multiple of chunk_bytes (" +
                                str(chunk_bytes) + ")");
  const int64_t n = arena_bytes / chunk_bytes;
  if (n > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("too many chunks: " + str(n));
  chunks_.resize(n);
  free_chunks_.reserve(n);
  // Carve from the back of the stack: pushing in reverse hands out low chunks first.
  for (int64_t k = n - 1; k >= 0; --k) free_chunks_.push_back(static_cast<int32_t>(k));
}

int32_t PageAllocator::add_pool(int64_t row_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (row_bytes <= 0) throw std::invalid_argument("row_bytes must be > 0, got " + str(row_bytes));
  // Every chunk must hold at least one page of every pool, else some chunks would be useless
  // to it and the budget would not be shared.  C >= 2 * row_bytes or C a multiple suffices.
  if (!(chunk_bytes_ % row_bytes == 0 || chunk_bytes_ >= 2 * row_bytes))
    throw std::invalid_argument("chunk_bytes (" + str(chunk_bytes_) + ") must be a multiple of row_bytes (" +
                                str(row_bytes) + ") or at least twice it");
  const int64_t pages = arena_bytes_ / row_bytes;
  if (pages > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("a pool of row_bytes " + str(row_bytes) + " would have " + str(pages) +
                                " pages, more than int32 page tables can index");
  PoolInfo p;
  p.row_bytes = row_bytes;
  p.num_pages = pages;
  pools_.push_back(p);
  return static_cast<int32_t>(pools_.size() - 1);
}

int32_t PageAllocator::num_pools() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int32_t>(pools_.size());
}

int64_t PageAllocator::free_chunks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(free_chunks_.size());
}

PoolInfo PageAllocator::pool_info(int32_t pool) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_pool(pool);
  return pools_[pool];
}

int64_t PageAllocator::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t b = 0;
  for (const auto& p : pools_) b += p.used_pages * p.row_bytes;
  return b;
}

void PageAllocator::check_pool(int32_t pool) const {
  if (pool < 0 || pool >= static_cast<int32_t>(pools_.size()))
    throw std::invalid_argument("unknown pool id " + str(pool) + " (there are " + str(pools_.size()) + ")");
}

int64_t PageAllocator::pages_in_chunk(int32_t pool, int64_t chunk) const {
  const int64_t rb = pools_[pool].row_bytes;
  const int64_t first = ceil_div(chunk * chunk_bytes_, rb);
  const int64_t end = (chunk + 1) * chunk_bytes_ / rb;
  return std::max<int64_t>(0, end - first);
}

int64_t PageAllocator::chunk_of(int32_t pool, int32_t page) const {
  return static_cast<int64_t>(page) * pools_[pool].row_bytes / chunk_bytes_;
}

void PageAllocator::partial_push(int32_t pool, int32_t k) {
  Chunk& c = chunks_[k];
  c.prev = -1;
  c.next = pools_[pool].partial_head;
  if (c.next >= 0) chunks_[c.next].prev = k;
  pools_[pool].partial_head = k;
}

void PageAllocator::partial_remove(int32_t pool, int32_t k) {
  Chunk& c = chunks_[k];
  if (c.prev >= 0) chunks_[c.prev].next = c.next;
  else pools_[pool].partial_head = c.next;
  if (c.next >= 0) chunks_[c.next].prev = c.prev;
  c.prev = c.next = -1;
}

bool PageAllocator::fits_locked(const std::vector<Request>& requests, const std::vector<int64_t>& fip_in,
                                const std::vector<int32_t>& extra) const {
  std::vector<int64_t> fip = fip_in;  // free pages per pool, as chunks get carved
  int64_t ie = static_cast<int64_t>(extra.size());
  int64_t ifree = static_cast<int64_t>(free_chunks_.size());
  for (const auto& [p, n] : requests) {
    int64_t need = n - fip[p];
    if (need <= 0) {
      fip[p] -= n;
      continue;
    }
    fip[p] = 0;
    while (need > 0) {
      int32_t k;
      if (ie > 0) k = extra[--ie];
      else if (ifree > 0) k = free_chunks_[--ifree];
      else return false;
      need -= pages_in_chunk(p, k);
    }
    fip[p] = -need;  // the carved chunks' leftover pages serve later requests of p
  }
  return true;
}

std::vector<int64_t> PageAllocator::checked_free_in_pools_locked(const std::vector<Request>& requests) const {
  for (const auto& [p, n] : requests) {
    check_pool(p);
    if (n < 0) throw std::invalid_argument("cannot allocate a negative number of pages (" + str(n) + ")");
  }
  std::vector<int64_t> fip(pools_.size());
  for (size_t i = 0; i < pools_.size(); ++i) fip[i] = pools_[i].free_in_chunks;
  return fip;
}

std::optional<std::vector<std::vector<int32_t>>> PageAllocator::alloc(const std::vector<Request>& requests) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> fip = checked_free_in_pools_locked(requests);
  if (!fits_locked(requests, fip, {})) return std::nullopt;

  std::vector<std::vector<int32_t>> out;
  out.reserve(requests.size());
  for (const auto& [p, n] : requests) {
    PoolInfo& pool = pools_[p];
    std::vector<int32_t> pages;
    pages.reserve(n);
    while (static_cast<int64_t>(pages.size()) < n) {
      int32_t k = pool.partial_head;
      if (k < 0) {
        // Carve a free chunk for this pool (fits_locked guaranteed there is one).
        k = free_chunks_.back();
        free_chunks_.pop_back();
        Chunk& c = chunks_[k];
        const int64_t rb = pool.row_bytes;
        c.owner = p;
        c.first = static_cast<int32_t>(ceil_div(static_cast<int64_t>(k) * chunk_bytes_, rb));
        c.count = static_cast<int32_t>(pages_in_chunk(p, k));
        c.used = 0;
        c.allocated.assign(c.count, 0);
        c.free.resize(c.count);
        // Stack: the lowest page is popped first.
        for (int32_t i = 0; i < c.count; ++i) c.free[i] = c.first + c.count - 1 - i;
        pool.free_in_chunks += c.count;
        pool.owned_chunks += 1;
        if (c.count == 0) {  // cannot happen given add_pool's rule; keep the chunk owned-empty safe
          c.owner = -1;
          pool.owned_chunks -= 1;
          free_chunks_.insert(free_chunks_.begin(), k);
          continue;
        }
        partial_push(p, k);
      }
      Chunk& c = chunks_[k];
      while (!c.free.empty() && static_cast<int64_t>(pages.size()) < n) {
        const int32_t page = c.free.back();
        c.free.pop_back();
        c.allocated[page - c.first] = 1;
        c.used += 1;
        pool.free_in_chunks -= 1;
        pool.used_pages += 1;
        pages.push_back(page);
      }
      if (c.free.empty()) partial_remove(p, k);
    }
    out.push_back(std::move(pages));
  }
  return out;
}

void PageAllocator::free(int32_t pool, const std::vector<int32_t>& pages) {
  std::lock_guard<std::mutex> lock(mu_);
  check_pool(pool);
  const PoolInfo& info = pools_[pool];
  // Validate everything first so a bad call changes nothing.  A page seen in this call is
  // marked 2 (instead of 1 = allocated) to catch repeats without a hash set; marks are undone
  // before throwing.
  auto unmark = [&](size_t upto) {
    for (size_t i = 0; i < upto; ++i) {
      Chunk& c = chunks_[chunk_of(pool, pages[i])];
      c.allocated[pages[i] - c.first] = 1;
    }
  };
  for (size_t i = 0; i < pages.size(); ++i) {
    const int32_t page = pages[i];
    if (page < 0 || page >= info.num_pages) {
      unmark(i);
      throw std::invalid_argument("page " + str(page) + " is outside pool " + str(pool) + "'s " +
                                  str(info.num_pages) + " pages");
    }
    Chunk& c = chunks_[chunk_of(pool, page)];
    if (c.owner != pool || page < c.first || page >= c.first + c.count || c.allocated[page - c.first] == 0) {
      unmark(i);
      throw std::invalid_argument("page " + str(page) + " of pool " + str(pool) + " is not allocated");
    }
    if (c.allocated[page - c.first] == 2) {
      unmark(i);
      throw std::invalid_argument("page " + str(page) + " of pool " + str(pool) + " is freed twice in one call");
    }
    c.allocated[page - c.first] = 2;
  }
  PoolInfo& p = pools_[pool];
  for (int32_t page : pages) {
    const int32_t k = static_cast<int32_t>(chunk_of(pool, page));
    Chunk& c = chunks_[k];
    if (c.free.empty()) partial_push(pool, k);
    c.allocated[page - c.first] = 0;
    c.free.push_back(page);
    c.used -= 1;
    p.used_pages -= 1;
    p.free_in_chunks += 1;
    if (c.used == 0) {
      // Whole chunk free again: give it back to the shared budget.
      partial_remove(pool, k);
      p.free_in_chunks -= c.count;
      p.owned_chunks -= 1;
      c.owner = -1;
      c.count = 0;
      c.first = 0;
      std::vector<int32_t>().swap(c.free);
      std::vector<uint8_t>().swap(c.allocated);
      free_chunks_.push_back(k);
    }
  }
}

int64_t PageAllocator::plan_evictions(const std::vector<Request>& requests,
                                      const std::vector<std::vector<PageList>>& candidates) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> fip = checked_free_in_pools_locked(requests);
  std::vector<int32_t> emptied;  // chunks the simulated frees give back, in order
  if (fits_locked(requests, fip, emptied)) return 0;
  std::unordered_map<int32_t, int32_t> used;  // simulated used count of touched chunks
  {
    // Candidate pages must be distinct (a repeat would be freed twice): sort and compare.
    std::vector<int64_t> keys;
    for (const auto& cand : candidates)
      for (const auto& [pool, pages] : cand)
        for (int32_t page : pages) keys.push_back((static_cast<int64_t>(pool) << 32) | static_cast<uint32_t>(page));
    std::sort(keys.begin(), keys.end());
    const auto dup = std::adjacent_find(keys.begin(), keys.end());
    if (dup != keys.end())
      throw std::invalid_argument("candidate page " + str(static_cast<int32_t>(*dup & 0xffffffff)) + " of pool " +
                                  str(*dup >> 32) + " appears twice");
  }
  for (size_t v = 0; v < candidates.size(); ++v) {
    for (const auto& [pool, pages] : candidates[v]) {
      check_pool(pool);
      const PoolInfo& info = pools_[pool];
      for (int32_t page : pages) {
        if (page < 0 || page >= info.num_pages)
          throw std::invalid_argument("candidate page " + str(page) + " is outside pool " + str(pool));
        const int32_t k = static_cast<int32_t>(chunk_of(pool, page));
        const Chunk& c = chunks_[k];
        if (c.owner != pool || page < c.first || page >= c.first + c.count || !c.allocated[page - c.first])
          throw std::invalid_argument("candidate page " + str(page) + " of pool " + str(pool) +
                                      " is not allocated");
        auto it = used.find(k);
        if (it == used.end()) it = used.emplace(k, c.used).first;
        it->second -= 1;
        fip[pool] += 1;
        if (it->second == 0) {
          fip[pool] -= c.count;
          emptied.push_back(k);
        }
      }
    }
    if (fits_locked(requests, fip, emptied)) return static_cast<int64_t>(v + 1);
  }
  return -1;
}

std::vector<int32_t> PageAllocator::used_pages(int32_t pool) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_pool(pool);
  std::vector<int32_t> out;
  for (const auto& c : chunks_) {
    if (c.owner != pool) continue;
    for (int32_t i = 0; i < c.count; ++i)
      if (c.allocated[i]) out.push_back(c.first + i);
  }
  return out;  // chunks ascend and so do their pages
}

void PageAllocator::check_invariants() const {
  std::lock_guard<std::mutex> lock(mu_);
  auto fail = [](const std::string& what) { throw std::logic_error("page allocator invariant broken: " + what); };
  std::vector<int64_t> used(pools_.size(), 0), fic(pools_.size(), 0), owned(pools_.size(), 0);
  std::vector<uint8_t> in_free(chunks_.size(), 0);
  for (int32_t k : free_chunks_) {
    if (k < 0 || k >= static_cast<int32_t>(chunks_.size())) fail("free chunk out of range");
    if (in_free[k]) fail("chunk " + str(k) + " twice in the free list");
    in_free[k] = 1;
  }
  for (size_t k = 0; k < chunks_.size(); ++k) {
    const Chunk& c = chunks_[k];
    if (c.owner < 0) {
      if (!in_free[k]) fail("chunk " + str(k) + " neither owned nor free (leak)");
      continue;
    }
    if (in_free[k]) fail("chunk " + str(k) + " owned and free");
    if (c.owner >= static_cast<int32_t>(pools_.size())) fail("bad owner");
    if (c.count != pages_in_chunk(c.owner, k)) fail("chunk page count");
    int64_t n_alloc = 0;
    for (auto a : c.allocated) n_alloc += a;
    if (n_alloc != c.used || c.used <= 0) fail("chunk " + str(k) + " used count");
    if (static_cast<int64_t>(c.free.size()) != c.count - c.used) fail("chunk " + str(k) + " free count");
    std::vector<uint8_t> mark(c.count, 0);
    for (int32_t page : c.free) {
      if (page < c.first || page >= c.first + c.count) fail("free page outside its chunk");
      if (c.allocated[page - c.first]) fail("page both allocated and free");
      if (mark[page - c.first]++) fail("page twice in a free list");
    }
    used[c.owner] += c.used;
    fic[c.owner] += c.count - c.used;
    owned[c.owner] += 1;
  }
  for (size_t p = 0; p < pools_.size(); ++p) {
    const PoolInfo& info = pools_[p];
    if (info.used_pages != used[p] || info.free_in_chunks != fic[p] || info.owned_chunks != owned[p])
      fail("pool " + str(p) + " counts");
    int64_t n_partial = 0;
    int32_t prev = -1;
    for (int32_t k = info.partial_head; k >= 0; k = chunks_[k].next) {
      const Chunk& c = chunks_[k];
      if (c.owner != static_cast<int32_t>(p) || c.free.empty() || c.prev != prev) fail("partial list");
      prev = k;
      if (++n_partial > static_cast<int64_t>(chunks_.size())) fail("partial list cycle");
    }
    int64_t expect = 0;
    for (const auto& c : chunks_)
      if (c.owner == static_cast<int32_t>(p) && !c.free.empty()) ++expect;
    if (expect != n_partial) fail("partial list length");
  }
  // No byte of the arena is owned twice: owned chunks are disjoint by construction and a
  // page lies wholly inside its chunk (checked through pages_in_chunk above).
}

}  // namespace minlora::pool

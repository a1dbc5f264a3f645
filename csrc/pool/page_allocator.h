// The page allocator core of minlora's AdapterPool (DESIGN.md, "Paged adapter memory").
//
// One arena of `arena_bytes` is cut into chunks of `chunk_bytes`.  Every pool (one per row
// length) is a view of the WHOLE arena as [arena_bytes / row_bytes, row_length]: page p of a
// pool occupies bytes [p * row_bytes, (p + 1) * row_bytes).  A chunk belongs to at most one
// pool at a time and hands out the pages of that pool lying wholly inside it, so pools of
// different row lengths draw on one budget: a chunk freed by one pool can serve any other
// (no fixed per-module split), and the only waste is the partial page at a chunk's edges.
//
// This class only does the bookkeeping (it never touches the arena's memory, which Python
// owns as a tensor).  Every operation is O(1) per page plus O(1) per chunk carved or freed;
// allocation is all-or-nothing; every method is thread-safe.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace minlora::pool {

// (pool id, number of pages)
using Request = std::pair<int32_t, int64_t>;
// (pool id, pages of that pool)
using PageList = std::pair<int32_t, std::vector<int32_t>>;

struct PoolInfo {
  int64_t row_bytes = 0;
  int64_t num_pages = 0;        // pages of the view over the whole arena
  int64_t used_pages = 0;       // pages allocated now
  int64_t free_in_chunks = 0;   // free pages inside chunks this pool owns
  int64_t owned_chunks = 0;
  int32_t partial_head = -1;    // list of owned chunks with a free page
};

class PageAllocator {
 public:
  PageAllocator(int64_t arena_bytes, int64_t chunk_bytes);

  // Registers a pool of pages of `row_bytes` bytes; returns its id (0, 1, ...).
  int32_t add_pool(int64_t row_bytes);

  int64_t arena_bytes() const { return arena_bytes_; }
  int64_t chunk_bytes() const { return chunk_bytes_; }
  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  int32_t num_pools() const;
  int64_t free_chunks() const;
  PoolInfo pool_info(int32_t pool) const;
  // Bytes of pages allocated now (sum over pools of used pages * row bytes).
  int64_t used_bytes() const;
  // Number of pages of `pool` inside chunk `chunk` (0 if the pool's rows do not fit there).
  int64_t pages_in_chunk(int32_t pool, int64_t chunk) const;

  // All-or-nothing: the pages of every request, in request order, or nullopt (and nothing
  // changed) when they do not all fit.  A pool may appear in several requests.
  std::optional<std::vector<std::vector<int32_t>>> alloc(const std::vector<Request>& requests);

  // Returns pages to their pool.  Every page is checked first (range, allocated, no
  // repeats); on a bad one it throws std::invalid_argument and changes nothing.
  void free(int32_t pool, const std::vector<int32_t>& pages);

  // The smallest k such that, after freeing candidates[0..k) (in that order, each as
  // free() would), `requests` fit; -1 when they do not fit even after freeing all of them.
  // Changes nothing.  Candidate pages must be allocated and distinct (else invalid_argument).
  int64_t plan_evictions(const std::vector<Request>& requests,
                         const std::vector<std::vector<PageList>>& candidates) const;

  // Allocated pages of `pool`, ascending (for tests and invariant checks).
  std::vector<int32_t> used_pages(int32_t pool) const;

  // Recomputes every count and list from scratch and throws std::logic_error on a mismatch.
  void check_invariants() const;

 private:
  struct Chunk {
    int32_t owner = -1;  // pool id, -1 = free
    int32_t first = 0;   // first page (of the owner's view) inside this chunk
    int32_t count = 0;   // pages of the owner inside this chunk
    int32_t used = 0;
    int32_t prev = -1, next = -1;  // the owner's partial list
    std::vector<int32_t> free;     // free pages (a stack)
    std::vector<uint8_t> allocated;  // per page: 1 = allocated
  };

  void check_pool(int32_t pool) const;
  int64_t chunk_of(int32_t pool, int32_t page) const;
  void partial_push(int32_t pool, int32_t chunk);
  void partial_remove(int32_t pool, int32_t chunk);
  // Validates `requests` (known pools, non-negative counts); returns each pool's free pages
  // inside its chunks, the starting point of fits_locked.
  std::vector<int64_t> checked_free_in_pools_locked(const std::vector<Request>& requests) const;
  // Whether `requests` fit given per-pool free pages `fip` and free-chunk stacks (taken from
  // the back of `extra` first, then from the back of free_chunks_).
  bool fits_locked(const std::vector<Request>& requests, const std::vector<int64_t>& fip,
                   const std::vector<int32_t>& extra) const;

  int64_t arena_bytes_;
  int64_t chunk_bytes_;
  std::vector<Chunk> chunks_;
  std::vector<int32_t> free_chunks_;  // a stack: chunks are carved from the back
  std::vector<PoolInfo> pools_;
  mutable std::mutex mu_;
};

}  // namespace minlora::pool

// Python bindings of the pool's page allocator (minlora._C.PageAllocator).
#pragma once

#include <pybind11/pybind11.h>

void register_pool_bindings(pybind11::module_& m);

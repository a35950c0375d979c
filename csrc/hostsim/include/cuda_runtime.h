// Host-simulation build: CUDA's language built-ins (qualifiers, vector types, thread indices,
// intrinsics, launch API) defined on the CPU. Everything here forwards to csrc/hostsim/hostsim.h.
#pragma once
#include "cuda_runtime_api.h"
#include "../hostsim.h"

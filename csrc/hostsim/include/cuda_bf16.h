// Host-simulation build: bf16 types and conversions (csrc/hostsim/hostsim.h).
#pragma once
#include "../hostsim.h"

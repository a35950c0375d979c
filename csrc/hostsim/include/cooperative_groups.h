// Host-simulation build: the thread-block cluster part of cooperative groups.
#pragma once
#include "../hostsim.h"

namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const { return ::gptoss_hostsim::cluster_block_rank(); }
  unsigned num_blocks() const { return ::gptoss_hostsim::cluster_num_blocks(); }
  void sync() const { ::gptoss_hostsim::cluster_sync(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(::gptoss_hostsim::map_shared_rank(static_cast<const void*>(p), rank));
  }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups

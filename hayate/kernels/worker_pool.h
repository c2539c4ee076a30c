// The planned decode step's own threads: started once, they spin briefly between the
// step's ~150 parallel sections and sleep when the engine idles. Unlike OpenMP's teams,
// which libgomp creates per calling thread and throttles to near-passive waiting once the
// process holds more OpenMP threads than CPUs (an engine loop in its own thread beside the
// loading thread's team: 2x slower steps), these behave the same from any calling thread.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Waits until done() holds: spinning, and every 64 spins yielding the CPU, so that with more
// runnable threads than CPUs (a server's event loop beside the engine) the thread being
// waited for gets to run instead of the waiter burning its time slice.
template <class Done>
inline bool spin_until(const Done& done, int64_t max_spins) {
  for (int64_t spins = 0; spins < max_spins; ++spins) {
    if (done()) return true;
    if (spins % 64 == 63) std::this_thread::yield();
    else cpu_relax();
  }
  return done();
}

class WorkerPool {
 public:
  explicit WorkerPool(int threads) {
    for (int index = 1; index < std::max(threads, 1); ++index) workers_.emplace_back([this, index] { work(index); });
  }

  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(begin, end) over [0, n) in contiguous parts, one per thread (the caller runs part 0);
  // parts are multiples of `grain` where possible. Returns when every part is done.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t parts = std::min<int64_t>(size(), std::max<int64_t>(1, (n + grain - 1) / grain));
    if (parts <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    task_ = [&](int index) {
      if (index < parts) fn(split(n, grain, parts, index), split(n, grain, parts, index + 1));
    };
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    // seq_cst on both sides (here and in sleep_until_new): a worker going to sleep either
    // sees the new generation or is seen as a sleeper and woken.
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    task_(0);
    spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; }, INT64_MAX);
  }

 private:
  static int64_t split(int64_t n, int64_t grain, int64_t parts, int64_t index) {
    const int64_t units = (n + grain - 1) / grain;
    return std::min(n, units * index / parts * grain);
  }

  void work(int index) {
    uint64_t seen = 0;
    while (true) {
      uint64_t now = seen;
      spin_until([&] { return (now = generation_.load(std::memory_order_acquire)) != seen; }, kSpins);
      if (now == seen) now = sleep_until_new(seen);
      seen = now;
      if (stopping_) return;
      task_(index);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  uint64_t sleep_until_new(uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1);
    wake_.wait(lock, [&] { return generation_.load() != seen; });
    sleepers_.fetch_sub(1);
    return generation_.load(std::memory_order_acquire);
  }

  static constexpr int64_t kSpins = 1 << 15;  // about a millisecond of waiting before sleeping
  std::vector<std::thread> workers_;
  std::function<void(int)> task_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
};

}  // namespace

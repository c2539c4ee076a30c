// The planned decode step's own threads: started once, they spin briefly between the
// step's ~150 parallel sections and sleep when the engine idles; each section's chunks go to
// whichever thread is free, so one the OS has put aside does not hold the step up. Unlike
// OpenMP's teams, which libgomp creates per calling thread and throttles to near-passive
// waiting once the process holds more OpenMP threads than CPUs (an engine loop in its own
// thread beside the loading thread's team: 2x slower steps), these behave the same from any
// calling thread.
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

// Waits until done() holds: spinning, and every kSpinsPerYield spins (tens of us) yielding the
// CPU, so that with more runnable threads than CPUs (a server's event loop beside the engine)
// the thread being waited for gets to run instead of the waiter burning its time slice. Not
// more often: each yield may hand the core to another process for a scheduler slice (with a
// nice-19 busy loop beside it, yielding every 64 spins cost the default model's decode 20%:
// 110-115 tokens/s against 133-138; quiet and served speeds the same either way).
constexpr int64_t kSpinsPerYield = 1024;

template <class Done>
inline bool spin_until(const Done& done, int64_t max_spins) {
  for (int64_t spins = 0; spins < max_spins; ++spins) {
    if (done()) return true;
    if (spins % kSpinsPerYield == kSpinsPerYield - 1) std::this_thread::yield();
    else cpu_relax();
  }
  return done();
}

class WorkerPool {
 public:
  explicit WorkerPool(int threads) {
    for (int index = 1; index < std::max(threads, 1); ++index) workers_.emplace_back([this] { work(); });
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

  // fn(begin, end) over [0, n) in chunks of whole grains, a few per thread, fixed by n, grain
  // and the pool's size (so results never depend on which thread ran what). Every thread,
  // the caller too, takes the next chunk until none is left: a thread the OS has descheduled
  // (a core shared with another process) delays at most the chunk it holds, never a share
  // fixed in advance. Returns when every chunk is done.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t units = (n + grain - 1) / grain;
    const int64_t chunks = std::min<int64_t>({units, int64_t{size()} * kChunksPerThread, kMaxChunks});
    if (std::min<int64_t>(size(), units) <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    fn_ = &fn;
    n_ = n;
    grain_ = grain;
    done_.store(0, std::memory_order_relaxed);
    call_ = (call_ + 1) & kCallMask;
    claim_.store(call_ << 32 | static_cast<uint64_t>(chunks) << 16, std::memory_order_release);
    // seq_cst on both sides (here and in sleep_until_new): a worker going to sleep either
    // sees the new generation or is seen as a sleeper and woken.
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    run_chunks(call_);
    spin_until([&] { return done_.load(std::memory_order_acquire) == chunks; }, INT64_MAX);
  }

 private:
  // claim_ packs the call's number (bits 32..), its chunk count (16..31) and the next chunk
  // to take (0..15), so a chunk is taken with one compare-and-swap that also checks the call.
  static constexpr int64_t kChunksPerThread = 4, kMaxChunks = 0xffff;
  static constexpr uint64_t kCallMask = 0xffffffff;

  // Takes and runs chunks of call `call` until none is left or a later call has begun. A
  // chunk taken keeps its caller waiting, so fn_, n_ and grain_ are that call's while it runs.
  void run_chunks(uint64_t call) {
    uint64_t claim = claim_.load(std::memory_order_acquire);
    while ((claim >> 32) == call) {
      const int64_t chunks = (claim >> 16) & 0xffff, next = claim & 0xffff;
      if (next >= chunks) return;
      if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel)) continue;
      const int64_t units = (n_ + grain_ - 1) / grain_;
      (*fn_)(std::min(n_, units * next / chunks * grain_), std::min(n_, units * (next + 1) / chunks * grain_));
      done_.fetch_add(1, std::memory_order_acq_rel);
      claim = claim_.load(std::memory_order_acquire);
    }
  }

  void work() {
    uint64_t seen = 0;
    while (true) {
      uint64_t now = seen;
      spin_until([&] { return (now = generation_.load(std::memory_order_acquire)) != seen; }, kSpins);
      if (now == seen) now = sleep_until_new(seen);
      seen = now;
      if (stopping_) return;
      run_chunks(claim_.load(std::memory_order_acquire) >> 32);
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
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  uint64_t call_ = 0;                     // the caller's count of calls (kCallMask bits)
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<uint64_t> generation_{0};   // wakes the workers
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
};

}  // namespace

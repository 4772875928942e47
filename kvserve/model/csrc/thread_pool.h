// A small persistent thread pool for the quantized matmuls. A decode step makes ~120 matmul
// calls of a few tens of microseconds each, too short to start a thread per call. Workers spin
// briefly after a job (the next call usually follows within that time), then sleep on a
// condition variable, so an idle pool costs no CPU.
#pragma once

#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace kvserve {

class ThreadPool {
  public:
    using Job = void (*)(void* ctx, int thread, int num_threads);

    // Runs job(ctx, t, n) for t in [0, n), t = 0 on the caller. Returns false (nothing run)
    // when another call holds the pool; the caller then does all the work itself.
    bool run(Job job, void* ctx, int num_threads) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        for (; num_workers_ < num_threads - 1; ++num_workers_) {
            const int id = num_workers_ + 1;
            const uint64_t seen = generation_.load(std::memory_order_relaxed);
            std::thread([this, id, seen] { loop(id, seen); }).detach();
        }
        job_ = job;
        ctx_ = ctx;
        num_threads_ = num_threads;
        pending_.store(num_workers_, std::memory_order_relaxed);
        bool wake;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation_.fetch_add(1, std::memory_order_release);
            wake = sleepers_ > 0;
        }
        if (wake) cv_.notify_all();
        job(ctx, 0, num_threads);
        for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
            if (spins < 100000) _mm_pause();
            else std::this_thread::yield();  // a worker lost its core: do not burn ours
        }
        return true;
    }

  private:
    static constexpr std::chrono::microseconds kSpin{200};

    void loop(int id, uint64_t seen) {  // seen: the generation before this worker's first job
        for (;;) {
            const auto until = std::chrono::steady_clock::now() + kSpin;
            uint64_t gen = generation_.load(std::memory_order_acquire);
            for (int i = 0; gen == seen; ++i) {
                _mm_pause();
                if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
                gen = generation_.load(std::memory_order_acquire);
            }
            if (gen == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                ++sleepers_;
                cv_.wait(lock, [&] { return generation_.load() != seen; });
                --sleepers_;
                gen = generation_.load(std::memory_order_acquire);
            }
            seen = gen;
            if (id < num_threads_) job_(ctx_, id, num_threads_);
            pending_.fetch_sub(1, std::memory_order_release);
        }
    }

    std::mutex busy_, mutex_;
    std::condition_variable cv_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    int sleepers_ = 0;
    int num_workers_ = 0;  // detached threads, ids 1..num_workers_
    Job job_ = nullptr;
    void* ctx_ = nullptr;
    int num_threads_ = 1;
};

// One pool per process, never destroyed (its detached workers outlive static destructors);
// a forked child starts a fresh one, since the parent's workers do not exist in it.
inline ThreadPool*& pool_slot() {
    static ThreadPool* pool = nullptr;
    return pool;
}

inline ThreadPool& pool() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { pool_slot() = nullptr; }); });
    static std::mutex mutex;
    std::lock_guard<std::mutex> lock(mutex);
    if (pool_slot() == nullptr) pool_slot() = new ThreadPool();
    return *pool_slot();
}

// Runs job on num_threads threads, or all of it on the caller when the pool is busy.
inline void parallel(ThreadPool::Job job, void* ctx, int num_threads) {
    if (num_threads > 1 && pool().run(job, ctx, num_threads)) return;
    for (int t = 0; t < num_threads; ++t) job(ctx, t, num_threads);
}

}  // namespace kvserve

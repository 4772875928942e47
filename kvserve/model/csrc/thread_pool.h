// A small persistent thread pool for the quantized matmuls. A decode step makes ~120 matmul
// calls of a few tens of microseconds each, too short to start a thread per call.
//
// A call is split into chunks that the caller and the workers claim one at a time, so the
// caller never waits for a worker that has no core (a busy machine, or more threads than
// cores): it does the unclaimed chunks itself and waits only for chunks already under way.
// Workers spin briefly after a call (the next one usually follows within that time), then
// sleep on a condition variable, so an idle pool costs no CPU.
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
    using Task = void (*)(void* ctx, int64_t chunk);

    // Runs task(ctx, i) for every i in [0, num_chunks), on up to num_threads threads (the
    // caller included). Returns false (nothing run) when another call holds the pool.
    bool run(Task task, void* ctx, int64_t num_chunks, int num_threads) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        for (; num_workers_ < num_threads - 1; ++num_workers_) {
            const int id = num_workers_ + 1;
            const uint64_t seen = sequence_.load(std::memory_order_relaxed);
            std::thread([this, id, seen] { loop(id, seen); }).detach();
        }
        // Publish the job under a sequence lock: odd while the fields change.
        const uint64_t seq = sequence_.load(std::memory_order_relaxed) + 2;
        sequence_.store(seq - 1, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_release);
        task_.store(task, std::memory_order_relaxed);
        ctx_.store(ctx, std::memory_order_relaxed);
        num_chunks_.store(num_chunks, std::memory_order_relaxed);
        num_threads_.store(num_threads, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        claim_.store(tag(seq) << 32, std::memory_order_relaxed);
        bool wake;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            sequence_.store(seq, std::memory_order_release);
            wake = sleepers_ > 0;
        }
        if (wake) cv_.notify_all();
        int64_t chunk;
        while (claim(seq, num_chunks, chunk)) {
            task(ctx, chunk);
            done_.fetch_add(1, std::memory_order_release);
        }
        for (int spins = 0; done_.load(std::memory_order_acquire) < num_chunks; ++spins) {
            if (spins < 2000) _mm_pause();
            else std::this_thread::yield();  // the worker finishing a chunk may need our core
        }
        return true;
    }

  private:
    static constexpr std::chrono::microseconds kSpin{100};

    static uint64_t tag(uint64_t seq) { return (seq >> 1) & 0xffffffffu; }

    // The next unclaimed chunk of job `seq`, if that job is still the current one.
    bool claim(uint64_t seq, int64_t num_chunks, int64_t& chunk) {
        uint64_t c = claim_.load(std::memory_order_relaxed);
        for (;;) {
            if ((c >> 32) != tag(seq) || int64_t(c & 0xffffffffu) >= num_chunks) return false;
            if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) {
                chunk = int64_t(c & 0xffffffffu);
                return true;
            }
        }
    }

    void loop(int id, uint64_t seen) {
        for (;;) {
            uint64_t seq = wait_for_job(seen);
            seen = seq;
            const Task task = task_.load(std::memory_order_relaxed);
            void* const ctx = ctx_.load(std::memory_order_relaxed);
            const int64_t num_chunks = num_chunks_.load(std::memory_order_relaxed);
            const int num_threads = num_threads_.load(std::memory_order_relaxed);
            std::atomic_thread_fence(std::memory_order_acquire);
            // The fields were read whole only if no new job began meanwhile; a job that ended
            // meanwhile has no chunk left to claim, so they are never used for it.
            if (sequence_.load(std::memory_order_relaxed) != seq || id >= num_threads) continue;
            int64_t chunk;
            while (claim(seq, num_chunks, chunk)) {
                task(ctx, chunk);
                done_.fetch_add(1, std::memory_order_release);
            }
        }
    }

    uint64_t wait_for_job(uint64_t seen) {
        const auto until = std::chrono::steady_clock::now() + kSpin;
        for (int i = 0;; ++i) {
            const uint64_t seq = sequence_.load(std::memory_order_acquire);
            if (seq != seen && !(seq & 1)) return seq;
            _mm_pause();
            if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleepers_;
        uint64_t seq;
        cv_.wait(lock, [&] {
            seq = sequence_.load(std::memory_order_acquire);
            return seq != seen && !(seq & 1);
        });
        --sleepers_;
        return seq;
    }

    std::mutex busy_, mutex_;
    std::condition_variable cv_;
    std::atomic<uint64_t> sequence_{0};  // 2 per job; odd while a job is being published
    std::atomic<uint64_t> claim_{0};     // job tag << 32 | next chunk
    std::atomic<int64_t> done_{0};
    std::atomic<Task> task_{nullptr};
    std::atomic<void*> ctx_{nullptr};
    std::atomic<int64_t> num_chunks_{0};
    std::atomic<int> num_threads_{1};
    int sleepers_ = 0;
    int num_workers_ = 0;  // detached threads, ids 1..num_workers_
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

// task(ctx, i) for i in [0, num_chunks) on num_threads threads, or all on the caller when the
// pool is busy with another call.
inline void parallel_for(ThreadPool::Task task, void* ctx, int64_t num_chunks, int num_threads) {
    if (num_threads > 1 && num_chunks > 1 && pool().run(task, ctx, num_chunks, num_threads))
        return;
    for (int64_t i = 0; i < num_chunks; ++i) task(ctx, i);
}

}  // namespace kvserve

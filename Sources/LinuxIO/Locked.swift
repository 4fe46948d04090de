#if canImport(Glibc)
import Glibc
#endif

/// A value behind a pthread mutex: the one lock type of the daemon.
/// `Synchronization.Mutex` would do the same job, but it is built on futexes
/// inside the standard library, which ThreadSanitizer does not see: every
/// access it guards was reported as a race (`make test-tsan`). pthread
/// mutexes are intercepted, so TSan checks what this lock protects instead
/// of being told to look away.
///
/// Lock the state itself: a `Locked(())` around nothing, used as a bare
/// mutex, is reported by TSan as a race on its empty value (`make
/// test-tsan` refuses one).
///
/// `@unchecked Sendable` is safe: `value` is read and written only inside
/// `withLock`, between `pthread_mutex_lock` and `pthread_mutex_unlock` of a
/// mutex allocated once (never moved) and destroyed in `deinit`.
public final class Locked<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    public init(_ value: Value) {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        self.value = value
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the value, holding the lock.
    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

/// A loop's timers: each named by a value, due at an instant, kept in a
/// binary heap ordered by due time. Scheduling a timer again moves it;
/// cancelled and moved entries are dropped lazily when they reach the top.
/// Pure: the caller passes the time.

public struct DeadlineHeap<Timer: Hashable & Sendable>: Sendable {
    @usableFromInline var heap: [(due: ContinuousClock.Instant, timer: Timer, generation: UInt64)] = []
    /// The live generation of each scheduled timer (older heap entries are stale).
    @usableFromInline var live: [Timer: (due: ContinuousClock.Instant, generation: UInt64)] = [:]
    @usableFromInline var nextGeneration: UInt64 = 0

    @inlinable public init() {}

    /// Timers scheduled and not fired or cancelled.
    @inlinable public var count: Int { live.count }

    /// Entries in the heap, stale ones included (tests: re-arming a timer
    /// at the time it already has adds nothing).
    @inlinable public var storage: Int { heap.count }

    /// When `timer` is due (nil: not scheduled).
    @inlinable public func due(_ timer: Timer) -> ContinuousClock.Instant? { live[timer]?.due }

    /// The earliest due time (nil: no timer): what the loop's wait ends at.
    @inlinable public var next: ContinuousClock.Instant? {
        mutating get {
            dropStale()
            return heap.first?.due
        }
    }

    /// Schedules `timer` at `due`, replacing an earlier schedule of it.
    @inlinable public mutating func schedule(_ timer: Timer, at due: ContinuousClock.Instant) {
        if live[timer]?.due == due { return } // a loop re-arms the same timer every pass: nothing to add
        nextGeneration += 1
        live[timer] = (due, nextGeneration)
        heap.append((due, timer, nextGeneration))
        siftUp(heap.count - 1)
    }

    @inlinable public mutating func cancel(_ timer: Timer) {
        live[timer] = nil
    }

    /// Takes every timer due at `now`, earliest first.
    @inlinable public mutating func expired(now: ContinuousClock.Instant) -> [Timer] {
        var fired: [Timer] = []
        while true {
            dropStale()
            guard let top = heap.first, top.due <= now else { return fired }
            popTop()
            live[top.timer] = nil
            fired.append(top.timer)
        }
    }

    // MARK: heap

    @inlinable mutating func dropStale() {
        while let top = heap.first, live[top.timer]?.generation != top.generation { popTop() }
    }

    @inlinable mutating func popTop() {
        heap.swapAt(0, heap.count - 1)
        heap.removeLast()
        siftDown(0)
    }

    @inlinable mutating func siftUp(_ start: Int) {
        var i = start
        while i > 0 {
            let parent = (i - 1) / 2
            guard heap[i].due < heap[parent].due else { return }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    @inlinable mutating func siftDown(_ start: Int) {
        var i = start
        while true {
            let l = 2 * i + 1, r = l + 1
            var smallest = i
            if l < heap.count, heap[l].due < heap[smallest].due { smallest = l }
            if r < heap.count, heap[r].due < heap[smallest].due { smallest = r }
            guard smallest != i else { return }
            heap.swapAt(i, smallest)
            i = smallest
        }
    }
}

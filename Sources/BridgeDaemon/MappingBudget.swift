import LinuxIO

/// The daemon's mappings, shared by every bridge. Each mapping costs the
/// process about two kernel VMAs (the mapping and the split of the PROT_NONE
/// reservation around it), and `vm.max_map_count` caps VMAs per process: past
/// it every mmap of every bridge fails. So the total is derived from that
/// limit, and split so no bridge can starve another: with n bridges each is
/// guaranteed total / (n + 1) — one share is always kept for a bridge created
/// later — and may borrow beyond it only what no other bridge's guarantee
/// (and that reserve) needs.
///
/// A bridge asks for its ceiling before handling a request (`reserve`) and
/// reports its count after (`settle`); between the two, its headroom counts
/// as used, so two bridges never hand out the same headroom.
///
/// Sendable without `@unchecked`: all state is behind a `Locked` (pthread mutex).
public final class MappingBudget: Sendable {
    public struct ID: Hashable, Sendable { let raw: Int }

    private struct State {
        var next = 0
        var used: [ID: Int] = [:]
        var reserved: [ID: Int] = [:]
    }

    /// Mappings all bridges together may hold.
    public let total: Int
    private let state = Locked(State())

    /// VMAs left for everything else in the process (libraries, stacks,
    /// rings, VM2s' windows in tests).
    public static let reservedVMAs = 4096

    public init(total: Int) { self.total = max(1, total) }

    /// The budget for this process: (vm.max_map_count − reserved) / 2, with
    /// the kernel's default (65530) when /proc/sys is not visible (the
    /// shipped unit's ProcSubset=pid).
    public static let process = MappingBudget(total: max(1024, ((ResourceLimits.maxMapCount() ?? 65530) - reservedVMAs) / 2))

    public func register() -> ID {
        state.withLock { s in
            defer { s.next += 1 }
            let id = ID(raw: s.next)
            s.used[id] = 0
            return id
        }
    }

    public func unregister(_ id: ID) {
        state.withLock { s in
            s.used[id] = nil
            s.reserved[id] = nil
        }
    }

    /// What each registered bridge may always reach.
    public var guaranteedShare: Int { state.withLock { total / ($0.used.count + 1) } }

    /// The most mappings bridge `id` (now holding `current`) may hold after
    /// its next request; its headroom is held until `settle`.
    public func reserve(_ id: ID, current: Int) -> Int {
        state.withLock { s in
            guard s.used[id] != nil else { return 0 } // unregistered: nothing
            let share = total / (s.used.count + 1)
            var others = share // the reserve for a bridge yet to be created
            for (other, used) in s.used where other != id { others += max(used + (s.reserved[other] ?? 0), share) }
            let ceiling = max(0, total - others)
            s.used[id] = current
            s.reserved[id] = max(0, ceiling - current)
            return ceiling
        }
    }

    /// Bridge `id` now holds `count` mappings; its headroom is released.
    public func settle(_ id: ID, count: Int) {
        state.withLock { s in
            guard s.used[id] != nil else { return }
            s.used[id] = count
            s.reserved[id] = 0
        }
    }

    /// Mappings held by all bridges.
    public var used: Int { state.withLock { $0.used.values.reduce(0, +) } }
}

/// BAR address space is a resource of VM2's VMM: several bridges may share
/// one VM2, and together they must fit the budget configured for it.
public enum BARBudget {
    public struct Request: Equatable, Sendable {
        public var bridge: String
        public var vm2: String
        public var barSize: UInt64
        public init(bridge: String, vm2: String, barSize: UInt64) {
            self.bridge = bridge; self.vm2 = vm2; self.barSize = barSize
        }
    }

    public enum Failure: Error, Equatable, Sendable, CustomStringConvertible {
        case exceeded(vm2: String, budget: UInt64, requested: UInt64, bridges: [String])

        public var description: String {
            switch self {
            case .exceeded(let vm2, let budget, let requested, let bridges):
                "VM2 '\(vm2)' would need \(ByteCount(requested)) of BAR space for bridges \(bridges.joined(separator: ", ")); its budget is \(ByteCount(budget))"
            }
        }
    }

    /// Checks every VM2 with a budget; VM2s without one are unlimited.
    /// Sums saturate, so a hostile total cannot wrap past the budget.
    public static func check(_ requests: [Request], budgets: [String: UInt64]) throws(Failure) {
        var totals: [String: (UInt64, [String])] = [:]
        for r in requests {
            var entry = totals[r.vm2] ?? (0, [])
            let (sum, overflow) = entry.0.addingReportingOverflow(r.barSize)
            entry.0 = overflow ? UInt64.max : sum
            entry.1.append(r.bridge)
            totals[r.vm2] = entry
        }
        for vm2 in totals.keys.sorted() {
            guard let budget = budgets[vm2], let (total, bridges) = totals[vm2] else { continue }
            if total > budget { throw .exceeded(vm2: vm2, budget: budget, requested: total, bridges: bridges) }
        }
    }
}

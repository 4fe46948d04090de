import ArgumentParser
import BridgeCore
import Foundation

struct LookupBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lookup",
        abstract: "Bus address → mapping lookup: AddressSpace (a B-tree search over the mappings' ends) versus a linear scan, in one run."
    )

    @Option(help: "Comma-separated mapping counts.")
    var sizes: String = "1000,10000,100000"

    @Option(help: "Lookups timed per size for the binary search.")
    var lookups: Int = 1_000_000

    @Option(help: "Upper bound on mapping comparisons spent on the linear baseline per size.")
    var linearBudget: Int = 400_000_000

    @Flag(help: "Print one JSON object instead of a table.")
    var json = false

    struct Row: Codable {
        var mappings: Int
        var binaryNsPerLookup: Double
        var linearNsPerLookup: Double
        var speedup: Double
    }

    func run() throws {
        let counts = sizes.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !counts.isEmpty, counts.allSatisfy({ $0 > 0 }) else {
            throw ValidationError("--sizes needs positive integers, e.g. 1000,10000")
        }
        var rows: [Row] = []
        for n in counts {
            if !json { FileHandle.standardError.write("building \(n) mappings…\n".data(using: .utf8)!) }
            let workload = try LookupWorkload(mappings: n, probes: lookups)
            let space = workload.space
            precondition(space.mappings.count == n, "workload coalesced unexpectedly")
            let clock = ContinuousClock()
            var hits = 0
            // Warm-up, untimed: one pass of each over the probes it is timed
            // on (1 M lookups take ~40 ms, and a cold start weighed on them).
            for p in workload.probes where space.lookup(p) != nil { hits += 1 }
            let linearCount = max(1000, min(workload.probes.count, linearBudget / n))
            let mappings = space.mappings
            for p in workload.probes.prefix(linearCount / 10) where LookupWorkload.linearLookup(mappings, p) != nil { hits += 1 }
            let binary = clock.measure {
                for p in workload.probes where space.lookup(p) != nil { hits += 1 }
            }
            var linearHits = 0
            let linear = clock.measure {
                for p in workload.probes.prefix(linearCount) where LookupWorkload.linearLookup(mappings, p) != nil { linearHits += 1 }
            }
            // Both must agree on the probes they share (a benchmark of a wrong answer is worthless).
            let agree = workload.probes.prefix(linearCount).allSatisfy { space.lookup($0) == LookupWorkload.linearLookup(mappings, $0) }
            guard agree else { throw ValidationError("binary and linear lookups disagree at \(n) mappings") }
            let bns = binary / .nanoseconds(1) / Double(workload.probes.count)
            let lns = linear / .nanoseconds(1) / Double(linearCount)
            rows.append(Row(mappings: n, binaryNsPerLookup: bns, linearNsPerLookup: lns, speedup: lns / bns))
            _ = hits + linearHits
        }
        if json {
            try printJSON(["lookup": rows])
        } else {
            print("\(lookups) lookups per size at random addresses (90 % hits), timed after one untimed pass over the same addresses; the linear scan is timed on as many as a budget of comparisons allows.\n")
            print("| mappings | AddressSpace.lookup ns | linear scan ns | linear / lookup |")
            print("|---:|---:|---:|---:|")
            for r in rows {
                print(String(format: "| %d | %.1f | %.1f | %.0f× |", r.mappings, r.binaryNsPerLookup, r.linearNsPerLookup, r.speedup))
            }
        }
    }
}

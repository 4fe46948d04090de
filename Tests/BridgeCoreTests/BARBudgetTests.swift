import Testing
import TestSupport
@testable import BridgeCore

@Suite struct BARBudgetTests {
    @Test func bridgesSharingAVM2MustFitItsBudget() {
        let ok = [BARBudget.Request(bridge: "a", vm2: "x", barSize: TiB), BARBudget.Request(bridge: "b", vm2: "x", barSize: TiB)]
        #expect((try? BARBudget.check(ok, budgets: ["x": 2 * TiB])) != nil) // exactly at the budget
        let over = ok + [BARBudget.Request(bridge: "c", vm2: "x", barSize: 4096)]
        do {
            try BARBudget.check(over, budgets: ["x": 2 * TiB])
            Issue.record("accepted")
        } catch {
            #expect(error == .exceeded(vm2: "x", budget: 2 * TiB, requested: 2 * TiB + 4096, bridges: ["a", "b", "c"]))
            #expect(error.description.contains("budget is 2 TiB"))
        }
    }

    @Test func vm2WithoutABudgetIsUnlimitedAndSumsSaturate() {
        let huge = [BARBudget.Request(bridge: "a", vm2: "y", barSize: UInt64.max), BARBudget.Request(bridge: "b", vm2: "y", barSize: UInt64.max)]
        #expect((try? BARBudget.check(huge, budgets: [:])) != nil)
        #expect((try? BARBudget.check(huge, budgets: ["y": UInt64.max - 1])) == nil)
    }
}

@testable import BridgeDaemon
import Testing

/// The link bookkeeping both relay engines share, on values: what each event
/// counts (saturating), and a link's life through retargets and removals.
@Suite struct RelayLinks {
    @Test func eachEventCountsWhatItSays() {
        var s = RelayLinkStatistics()
        s.count(.took(5))
        #expect(s.notifications == 5 && s.wakeups == 1 && s.coalesced == 4)
        s.count(.took(0))
        #expect(s.notifications == 5 && s.wakeups == 2 && s.coalesced == 4)
        s.count(.relayed)
        #expect(s.relayed == 1)
        s.count(.coalesced(3))
        #expect(s.coalesced == 7)
        s.count(.dropped(2))
        #expect(s.dropped == 2 && s.errors == 0)
        s.count(.writeFailed(dropping: 4))
        #expect(s.dropped == 6 && s.errors == 1)
        s.count(.sourceFailed)
        #expect(s.errors == 2 && s.notifications == 5 && s.relayed == 1)
    }

    @Test func countsSaturateOnAPeersValues() {
        var s = RelayLinkStatistics()
        s.count(.took(.max - 1))
        s.count(.took(.max - 1))
        #expect(s.notifications == .max && s.coalesced == .max && s.wakeups == 2)
        s.count(.dropped(.max))
        s.count(.writeFailed(dropping: 1))
        #expect(s.dropped == .max && s.errors == 1)
    }

    @Test func anActiveLinkResumesWhenSettled() {
        var life = RelayLinkLife<String>.active
        #expect(life.isActive)
        #expect(life.settle() == .resume)
        #expect(life == .active)
        #expect(life.pendingTarget == nil)
    }

    @Test func aRetargetWaitsForTheSettleThenTheLinkIsActiveAgain() {
        var life = RelayLinkLife<String>.active
        #expect(life.retarget(to: "new") == nil)
        #expect(!life.isActive && life.pendingTarget == "new")
        #expect(life.settle() == .retarget("new"))
        #expect(life == .active)
        #expect(life.retarget(to: nil) == nil)
        #expect(life.settle() == .retarget(nil))
    }

    @Test func aSecondRetargetSupersedesTheFirst() {
        var life = RelayLinkLife<String>.active
        _ = life.retarget(to: "first")
        #expect(life.retarget(to: "second") == "first")
        #expect(life.settle() == .retarget("second"))
    }

    @Test func aRemovalClosesAPendingRetargetAndEndsInClose() {
        var life = RelayLinkLife<String>.active
        _ = life.retarget(to: "pending")
        #expect(life.remove() == "pending")
        #expect(life == .removing && !life.isActive && life.pendingTarget == nil)
        #expect(life.settle() == .close)
        var plain = RelayLinkLife<String>.active
        #expect(plain.remove() == nil)
        #expect(plain.settle() == .close)
    }

    @Test func aRetargetOfALinkBeingRemovedIsHandedBack() {
        var life = RelayLinkLife<String>.removing
        #expect(life.retarget(to: "late") == "late")
        #expect(life == .removing)
        #expect(life.remove() == nil)
        #expect(life.settle() == .close)
    }
}

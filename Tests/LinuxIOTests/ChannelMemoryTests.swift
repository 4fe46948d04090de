import Testing
import SystemPackage
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

extension LinuxIOTests {
    /// The revocation channel's memory: what the creator promises (sealed,
    /// zeroed), what an adopter refuses (too small, not sealed against
    /// shrinking, not a memory file), and words that stay inside it.
    @Suite struct ChannelMemoryTests {
        @Test func theCreatorSealsItAndBothSidesSeeTheSameWords() throws {
            try expectNoFDLeak("channel") {
                let daemon = try ChannelMemory(creating: "test-channel", size: 8192)
                let seals = try Memfd(adopting: daemon.fd).seals
                #expect(seals.contains([.shrink, .grow, .seal]) && !seals.contains(.write))
                #expect(ftruncate(daemon.fd.rawValue, 0) == -1 && errno == EPERM)
                let copy = OwnedFileDescriptor(adopting: dup(daemon.fd.rawValue))
                let vm2 = try ChannelMemory(adopting: copy, size: 8192)
                #expect(vm2.loadAcquire64(at: 64) == 0, "zeroed")
                daemon.storeRelease64(0x0102_0304_0506_0708, at: 64)
                #expect(vm2.loadAcquire64(at: 64) == 0x0102_0304_0506_0708)
                vm2.storeRelease32(7, at: 192)
                #expect(daemon.loadAcquire32(at: 192) == 7)
                #expect(vm2.fetchAdd32(1, at: 320) == 0 && daemon.loadAcquire32(at: 320) == 1)
                #expect(daemon.write([1, 2, 3], at: 4096) && vm2.read(3, at: 4096) == [1, 2, 3])
            }
        }

        @Test func wordsOutsideOrMisalignedReadZeroAndWriteNothing() throws {
            let m = try ChannelMemory(creating: "test-channel", size: 4096)
            m.storeRelease64(1, at: 4096)     // past the end
            m.storeRelease64(1, at: 4092)     // straddles the end
            m.storeRelease64(1, at: 12)       // misaligned
            m.storeRelease32(1, at: -4)
            #expect(m.loadAcquire64(at: 4096) == 0 && m.loadAcquire64(at: 12) == 0 && m.loadAcquire32(at: Int.max - 3) == 0)
            #expect(m.read(4096, at: 0)?.allSatisfy { $0 == 0 } == true, "nothing was written")
            #expect(!m.write([1], at: 4096) && !m.write([1, 2], at: 4095) && m.read(2, at: 4095) == nil && m.read(-1, at: 0) == nil)
            #expect(!m.wait(at: 4096, whileEqualTo: 0, until: .now.advanced(by: .seconds(10))), "no futex outside the mapping")
        }

        @Test func aWaitEndsAtItsDeadlineOrWhenTheWordChanges() throws {
            let m = try ChannelMemory(creating: "test-channel", size: 4096)
            #expect(!m.wait(at: 320, whileEqualTo: 0, until: .now.advanced(by: .milliseconds(5))), "timed out")
            #expect(m.wait(at: 320, whileEqualTo: 9, until: .now.advanced(by: .seconds(10))), "the word differs: no sleep")
            #expect(!m.wait(at: 320, whileEqualTo: 0, until: .now.advanced(by: .milliseconds(-1))), "a deadline already passed")
        }

        @Test func anAdopterRefusesWhatCouldHurtIt() throws {
            try expectNoFDLeak("adopt") {
                // Too small for what CHANNEL says.
                let small = try Memfd(name: "small", size: 4096)
                try small.addSeals([.shrink, .grow])
                #expect(throws: SystemCallError.self) { try ChannelMemory(adopting: OwnedFileDescriptor(adopting: dup(small.fd.rawValue)), size: 8192) }
                // Not sealed against shrinking: a truncate would SIGBUS the reader.
                let unsealed = try Memfd(name: "unsealed", size: 8192)
                #expect(throws: SystemCallError.self) { try ChannelMemory(adopting: OwnedFileDescriptor(adopting: dup(unsealed.fd.rawValue)), size: 8192) }
                // Not a memory file at all (a pipe).
                var p: [Int32] = [-1, -1]
                #expect(pipe(&p) == 0)
                let read = OwnedFileDescriptor(adopting: p[0]), write = OwnedFileDescriptor(adopting: p[1])
                #expect(throws: SystemCallError.self) { try ChannelMemory(adopting: read, size: 8192) }
                try? write.close()
                #expect(throws: SystemCallError.self) { try ChannelMemory(creating: "empty", size: 0) }
            }
        }
    }
}

import BridgeCore
import CLinuxShim
import Foundation
import Testing
import TestSupport
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif

/// VmFlags of every VMA of this process that lies inside [start, end).
private func vmFlags(inside start: UInt, _ end: UInt) -> [(UInt, [String])] {
    guard let file = fopen("/proc/self/smaps", "r") else { return [] }
    defer { fclose(file) }
    var lines: [String] = []
    var buffer = [CChar](repeating: 0, count: 4096)
    while fgets(&buffer, Int32(buffer.count), file) != nil {
        lines.append(String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }
    var result: [(UInt, [String])] = []
    var current: UInt?
    for line in lines {
        if let dash = line.firstIndex(of: "-"), let a = UInt(line[line.startIndex..<dash], radix: 16),
           line.split(separator: " ").count >= 5, !line.hasPrefix("VmFlags") {
            current = (a >= start && a < end) ? a : nil
        } else if line.hasPrefix("VmFlags:"), let a = current {
            result.append((a, line.dropFirst(8).split(separator: " ").map(String.init)))
        }
    }
    return result
}

extension LinuxIOTests {
    @Suite struct Hardening {
        /// Guest memory never lands in a core dump: the reservation, every
        /// mapped range and every revoked hole carry MADV_DONTDUMP ("dd").
        @Test func everyWindowRangeIsExcludedFromCoreDumps() throws {
            let window = try BARWindow(size: 1 << 30)
            let memfd = try Memfd(name: "dd", size: 1 << 20)
            try window.map(bus: BusAddress(0x10_0000), length: 0x4000, permission: .readWrite, fd: memfd.fd.rawValue, fdOffset: 0)
            try window.map(bus: BusAddress(0x20_0000), length: 0x1000, permission: .read, fd: memfd.fd.rawValue, fdOffset: 0x1000)
            try window.revoke(bus: BusAddress(0x10_1000), length: 0x1000)
            let base = UInt(bitPattern: window.baseAddress)
            let vmas = vmFlags(inside: base, base + UInt(window.size))
            #expect(vmas.count >= 5, "the window should be split into several VMAs, found \(vmas.count)")
            for (address, flags) in vmas {
                #expect(flags.contains("dd"), "VMA at \(String(address, radix: 16)) lacks dd: \(flags)")
            }
        }

        @Test func theWindowStartsOnAGibibyteBoundary() throws {
            for size: UInt64 in [1 << 21, 1 << 30, 3 << 30] {
                let window = try BARWindow(size: size)
                #expect(UInt(bitPattern: window.baseAddress) % UInt(BARWindow.alignment) == 0)
            }
        }

        /// The kind of an fd comes from the kernel, whatever a peer claims.
        @Test func fileKindsAreReadFromTheKernel() throws {
            try expectNoFDLeak("kinds") {
                let event = try EventFD()
                #expect(event.fd.kind() == .eventfd)
                let memfd = try Memfd(name: "k", size: 4096)
                #expect(memfd.fd.kind() == .regularFile)
                let (a, b) = try UnixSocket.pair()
                #expect(a.fd.kind() == .socket)
                try b.fd.close()
                var ends: [Int32] = [0, 0]
                #expect(pipe(&ends) == 0)
                let r = OwnedFileDescriptor(adopting: ends[0]), w = OwnedFileDescriptor(adopting: ends[1])
                #expect(r.kind() == .pipe && w.kind() == .pipe)
                let dir = OwnedFileDescriptor(adopting: open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC))
                #expect(dir.kind() == .other("a directory"))
                let poller = OwnedFileDescriptor(adopting: shim_epoll_create())
                #expect(poller.kind() == .other("anon_inode:[eventpoll]"))
                let closed = OwnedFileDescriptor(adopting: -1)
                #expect(closed.kind() == .unknown)
            }
        }

        /// With SIGPIPE ignored, writing to a pipe whose reader is gone is an
        /// EPIPE error, not the death of the process (and of every bridge).
        @Test func aDeadPipeIsAnErrorNotASignal() throws {
            Signals.ignoreBrokenPipe()
            var ends: [Int32] = [0, 0]
            #expect(pipe(&ends) == 0)
            close(ends[0])
            var byte: UInt8 = 1
            let n = write(ends[1], &byte, 1)
            let e = errno
            close(ends[1])
            #expect(n == -1 && e == EPIPE)
        }

        /// glibc raises its mmap threshold to the size of each large buffer
        /// freed, so a 12 MiB buffer freed after a 24 MiB one stays in its
        /// heap, resident. With the threshold fixed (the daemon does this at
        /// start) both go back to the kernel.
        @Test(.disabled(if: sanitizerAllocator, "a sanitizer's allocator replaces glibc's and ignores mallopt"))
        func largeFreedBuffersGoBackToTheKernel() {
            #expect(MemoryAllocator.returnLargeBuffersToTheKernel())
            let before = residentKiB(field: "RssAnon:")
            for size in [24 << 20, 12 << 20] {
                let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
                buffer.initializeMemory(as: UInt8.self, repeating: 0xA5, count: size)
                buffer.deallocate()
            }
            let after = residentKiB(field: "RssAnon:")
            #expect(after < before + 6 * 1024, "anonymous RSS went from \(before) KiB to \(after) KiB after freeing 36 MiB")
        }

        @Test func openFilesLimitIsRaisedToTheHardLimit() throws {
            let (soft, hard) = ResourceLimits.openFiles
            defer { try? ResourceLimits.setOpenFilesSoftLimit(soft) }
            try ResourceLimits.setOpenFilesSoftLimit(min(soft, 512))
            let raised = try ResourceLimits.raiseOpenFiles()
            #expect(raised == hard && ResourceLimits.openFiles.soft == hard)
            #expect(ResourceLimits.maxMapCount().map { $0 > 1000 } == true)
            #expect(ResourceLimits.mapCount() > 10)
        }
    }
}
